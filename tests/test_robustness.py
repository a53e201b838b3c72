"""Faults under stress: aborted runs, a removed cache under a ToCaPipeline, two threads on one pipeline."""

import threading

import numpy as np
import pytest
import torch

from ditcache import ToCaConfig, apply_cache, cache_config, cache_stats, remove_cache
from ditcache.eval.builders import opensora_pipeline
from ditcache.pipelines import ToCaPipeline


class Abort(Exception):
    """Raised between steps, as a callback or a user's Ctrl-C would."""


def run(family, pipe, **kwargs):
    generator = torch.Generator().manual_seed(0)
    if family == "dit":
        return pipe(class_labels=[1, 2], num_inference_steps=6, generator=generator, output_type="np", **kwargs).images
    if family == "pixart":
        return pipe("a red fox", num_inference_steps=6, generator=generator, output_type="np", clean_caption=False,
                    use_resolution_binning=False, **kwargs).images
    if family == "flux":
        return pipe("a red fox", num_inference_steps=6, height=32, width=32, max_sequence_length=16,
                    generator=generator, output_type="np", **kwargs).images
    return pipe("a red fox", num_frames=5, height=16, width=24, num_inference_steps=6, generator=generator,
                output_type="np", **kwargs).frames


@pytest.fixture(scope="module")
def opensora_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("opensora") / "pipe"
    opensora_pipeline(path)
    return path


@pytest.fixture
def family_pipe(request, saved_pipelines, opensora_folder):
    from diffusers import DiffusionPipeline

    from ditcache.pipelines.opensora import OpenSoraPipeline

    family = request.param
    folder = {"dit": saved_pipelines / "dit", "pixart": saved_pipelines / "pixart_alpha", "flux": saved_pipelines / "flux"}
    pipe = OpenSoraPipeline.from_pretrained(opensora_folder) if family == "opensora" else DiffusionPipeline.from_pretrained(folder[family])
    pipe.set_progress_bar_config(disable=True)
    return family, pipe


def abort_in_scheduler(pipe, at_step: int, error: type[BaseException]):
    """Make the scheduler raise ``error`` on its ``at_step``-th step (outside the transformer)."""
    original, calls = pipe.scheduler.step, []

    def step(*args, **kwargs):
        calls.append(None)
        if len(calls) == at_step + 1:
            raise error()
        return original(*args, **kwargs)

    pipe.scheduler.step = step
    return lambda: pipe.scheduler.__dict__.pop("step")


@pytest.mark.parametrize("family_pipe", ["dit", "pixart", "flux", "opensora"], indirect=True)
@pytest.mark.parametrize("at_step", [0, 1])
@pytest.mark.parametrize("error", [KeyboardInterrupt, Abort])
def test_an_aborted_run_does_not_change_the_next_one(family_pipe, at_step, error):
    family, pipe = family_pipe
    apply_cache(pipe, ToCaConfig(cache_interval=2, cache_ratio=0.5, schedule="constant", full_steps_at_start=1))
    fresh = run(family, pipe)
    restore = abort_in_scheduler(pipe, at_step, error)
    with pytest.raises(error):
        run(family, pipe)
    restore()
    np.testing.assert_array_equal(run(family, pipe), fresh)


@pytest.mark.parametrize("at_step", [0, 1])
def test_a_callback_that_raises_does_not_change_the_next_run(flux_pipe, at_step):
    apply_cache(flux_pipe, ToCaConfig(cache_interval=2, cache_ratio=0.5, schedule="constant", full_steps_at_start=1))
    fresh = run("flux", flux_pipe)

    def callback(pipe, step, timestep, tensors):
        if step == at_step:
            raise Abort()
        return tensors

    with pytest.raises(Abort):
        run("flux", flux_pipe, callback_on_step_end=callback)
    np.testing.assert_array_equal(run("flux", flux_pipe), fresh)


def test_img2img_after_an_abort_at_lower_strength_is_not_taken_for_a_resolution_change(flux_pipe):
    from diffusers import FluxImg2ImgPipeline

    img2img = FluxImg2ImgPipeline.from_pipe(flux_pipe)
    img2img.set_progress_bar_config(disable=True)
    apply_cache(img2img, ToCaConfig(cache_interval=2, cache_ratio=0.5, schedule="constant", full_steps_at_start=1))
    image = np.random.default_rng(0).random((1, 32, 32, 3)).astype(np.float32)
    call = dict(prompt="a red fox", image=image, num_inference_steps=8, height=32, width=32, max_sequence_length=16,
                output_type="np")
    restore = abort_in_scheduler(img2img, 1, Abort)
    with pytest.raises(Abort):
        img2img(strength=0.9, generator=torch.Generator().manual_seed(0), **call)
    restore()
    img2img(strength=0.5, generator=torch.Generator().manual_seed(0), num_images_per_prompt=2, **{**call})


# -- a removed cache under a ToCaPipeline ------------------------------------------------------
def test_a_toca_pipeline_whose_cache_was_removed_fails_before_any_work(dit_pipe):
    cached = ToCaPipeline.from_pipe(dit_pipe, cache_interval=2)
    remove_cache(dit_pipe)
    calls = []
    handle = dit_pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(None))
    for kwargs in ({}, {"cache_ratio": 0.8}, {"cache_interval": 3}):
        with pytest.raises(RuntimeError, match="removed"):
            run("dit", cached, **kwargs)
        assert calls == [] and cache_config(dit_pipe) is None  # nothing ran, nothing was cached again
    uncached = run("dit", cached, cache=False)
    handle.remove()
    assert cache_config(dit_pipe) is None
    np.testing.assert_array_equal(uncached, run("dit", dit_pipe))


def test_a_per_call_setting_leaves_the_shared_transformer_as_it_was(dit_pipe):
    first = ToCaPipeline.from_pipe(dit_pipe, cache_interval=2)
    second = ToCaPipeline.from_pipe(dit_pipe, cache_interval=4)  # the shared transformer now carries N=4
    carried = cache_config(dit_pipe)
    run("dit", first, cache_ratio=0.8)
    assert cache_config(dit_pipe) == carried
    first_stats = first.cache_stats
    run("dit", second)
    assert first_stats.full_step_indices != second.cache_stats.full_step_indices
    apply_cache(dit_pipe, ToCaConfig(cache_interval=2, cache_ratio=0.8))
    run("dit", dit_pipe)
    assert first_stats == cache_stats(dit_pipe)  # the call ran with first's settings and its own change


# -- threads ---------------------------------------------------------------------------------------
def test_a_second_thread_inside_the_transformer_is_refused_and_the_first_is_unharmed(dit_pipe):
    apply_cache(dit_pipe, ToCaConfig(cache_interval=2))
    expected = run("dit", dit_pipe)
    inside, refused, errors = threading.Event(), threading.Event(), []

    def hold(_module, _args):
        if threading.current_thread().name == "first" and not inside.is_set():
            inside.set()
            refused.wait(timeout=60)

    handle = dit_pipe.transformer.transformer_blocks[0].register_forward_pre_hook(hold)
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", run("dit", dit_pipe)), name="first")
    first.start()
    inside.wait(timeout=60)
    try:
        run("dit", dit_pipe)
    except RuntimeError as error:
        errors.append(error)
    refused.set()
    first.join()
    handle.remove()
    assert errors and "one call at a time" in str(errors[0])
    np.testing.assert_array_equal(results["first"], expected)


def test_a_thread_whose_run_was_taken_over_gets_an_error_not_a_wrong_image(dit_pipe):
    apply_cache(dit_pipe, ToCaConfig(cache_interval=2))
    expected = run("dit", dit_pipe)
    first_waiting, second_started, first_failed = threading.Event(), threading.Event(), threading.Event()
    original, results = dit_pipe.scheduler.step, {}

    def step(*args, **kwargs):
        name = threading.current_thread().name
        if name == "first" and not second_started.is_set():
            first_waiting.set()
            second_started.wait(timeout=60)  # the second thread starts its run between our steps 0 and 1
        if name == "second" and not second_started.is_set():
            second_started.set()
            first_failed.wait(timeout=60)
        return original(*args, **kwargs)

    dit_pipe.scheduler.step = step

    def first():
        try:
            run("dit", dit_pipe)
        except RuntimeError as error:
            results["first"] = error
        first_failed.set()

    threads = [threading.Thread(target=first, name="first"),
               threading.Thread(target=lambda: results.setdefault("second", run("dit", dit_pipe)), name="second")]
    threads[0].start()
    first_waiting.wait(timeout=60)  # the first thread is between steps, outside the transformer
    threads[1].start()
    for thread in threads:
        thread.join()
    del dit_pipe.scheduler.step
    assert isinstance(results["first"], RuntimeError) and "another thread" in str(results["first"])
    np.testing.assert_array_equal(results["second"], expected)


def test_the_last_step_of_a_true_guidance_run_stays_in_that_run(flux_pipe):
    """Two calls per step (cond, then uncond): the second call of the last step is not a new run."""
    apply_cache(flux_pipe, ToCaConfig(cache_interval=2, cache_ratio=0.5, schedule="constant", full_steps_at_start=1))
    run("flux", flux_pipe, negative_prompt="", true_cfg_scale=3.0)
    stats = cache_stats(flux_pipe)
    assert (stats.steps, stats.full_step_indices) == (6, (0, 2, 4))


def test_a_scheduler_reset_in_the_middle_of_a_run_gives_an_error_not_a_restarted_run(flux_pipe):
    """As another thread's call on the same pipeline would: new timesteps while this run goes on."""
    apply_cache(flux_pipe, ToCaConfig(cache_interval=2))

    def reset_at_step_two(pipe, step, _timestep, tensors):
        if step == 2:
            pipe.scheduler.set_timesteps(6)
        return tensors

    with pytest.raises(RuntimeError, match="set new timesteps in the middle of this thread's run"):
        run("flux", flux_pipe, callback_on_step_end=reset_at_step_two)
    expected = run("flux", flux_pipe)  # the next run is whole
    assert cache_stats(flux_pipe).steps == 6
    np.testing.assert_array_equal(run("flux", flux_pipe), expected)


def test_per_call_settings_from_several_threads_give_an_error_and_leave_the_shared_transformer_as_it_was(flux_pipe):
    first = ToCaPipeline.from_pipe(flux_pipe, cache_interval=2)
    first.set_progress_bar_config(disable=True)
    carried = cache_config(flux_pipe)
    expected = run("flux", first, cache_interval=4)
    inside, release, errors, results = threading.Event(), threading.Event(), [], {}

    def hold(pipe, step, _timestep, tensors):
        if threading.current_thread().name == "first" and step == 1:
            inside.set()
            release.wait(timeout=60)
        return tensors

    def call(name, **kwargs):
        try:
            results[name] = run("flux", first, callback_on_step_end=hold, **kwargs)
        except RuntimeError as error:
            errors.append((name, error))

    holder = threading.Thread(target=call, args=("first",), kwargs={"cache_interval": 4}, name="first")
    holder.start()
    inside.wait(timeout=60)
    others = [threading.Thread(target=call, args=(f"other{i}",), kwargs=kwargs, name=f"other{i}")
              for i, kwargs in enumerate([{"cache_interval": 3}, {}])]
    for thread in others:
        thread.start()
    for thread in others:
        thread.join()
    release.set()
    holder.join()
    assert sorted(name for name, _ in errors) == ["other0", "other1"]
    assert all("one pipeline call at a time" in str(error) for _, error in errors)
    np.testing.assert_array_equal(results["first"], expected)
    assert cache_config(flux_pipe) == carried
