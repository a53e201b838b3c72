"""Cache memory known before the run: ``estimate_cache_bytes`` (a dry run on a meta copy) against the bytes a
real run measures, on every registered family, and at released sizes without allocating a weight."""

import inspect
import math

import pytest
import torch
from test_generic import FAMILIES, build, timesteps

from ditcache import FORAConfig, ToCaConfig, apply_cache, cache_stats, estimate_cache_bytes, preset
from ditcache.specs import SPECS
from eval import builders

STEPS = 9  # more than the preset's min_steps
VALUE_SHAPED = {"mochi"}  # its attention keeps the prompt tokens its mask's values select (torch.nonzero)
GENERIC_CONFIGS = {  # a bare transformer's run does not know its step count, so the preset's min_steps is off here
    "fora": FORAConfig(cache_interval=3),
    "float8": preset("ditcache", cache_precision="float8", min_steps=0),
    "forecast": FORAConfig(cache_interval=3, forecast_order=2),
    "ditcache": preset("ditcache", min_steps=0),
}


def first_call(model):
    """Records the arguments of the model's next call, by name."""
    calls, signature = [], inspect.signature(model.forward)

    def record(_module, args, kwargs):
        if not calls:
            calls.append(signature.bind(*args, **kwargs).arguments)

    return calls, model.register_forward_pre_hook(record, with_kwargs=True)


@pytest.mark.parametrize("config", sorted(GENERIC_CONFIGS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_estimate_is_what_a_run_holds_on_every_generic_family(family, config):
    model, config = build(family), GENERIC_CONFIGS[config]
    call = FAMILIES[family][1]() | {SPECS[type(model).__name__].timestep_argument: timesteps(family)[0]}
    apply_cache(model, config)
    with torch.no_grad():
        for t in timesteps(family):
            model(**(call | {SPECS[type(model).__name__].timestep_argument: t}))
    measured = cache_stats(model).cache_bytes
    if family in VALUE_SHAPED:
        with pytest.raises(ValueError, match=r"reads its inputs' values .*aten.nonzero.*cache_stats"):
            estimate_cache_bytes(model, config, num_inference_steps=len(timesteps(family)), **call)
        return
    estimate = estimate_cache_bytes(model, config, num_inference_steps=len(timesteps(family)), **call)
    assert measured > 0 and estimate == pytest.approx(measured, rel=0.05)


PIPELINES = {  # the block adapters' families, run by their pipelines (per-step tables need the schedule)
    "dit": (builders.dit_pipeline, {"class_labels": [1, 2]}),
    "pixart": (builders.pixart_pipeline, {"prompt": "a red fox", "use_resolution_binning": False, "clean_caption": False}),
    "flux": (builders.flux_pipeline, {"prompt": "a red fox", "height": 32, "width": 32, "max_sequence_length": 16}),
    "opensora": (builders.opensora_pipeline, {"prompt": "a red fox", "num_frames": 5, "height": 16, "width": 24}),
}
BLOCK_CONFIGS = {
    "fora": FORAConfig(cache_interval=3),
    "toca": ToCaConfig(cache_interval=3, cache_ratio=0.7),
    "ditcache": preset("ditcache"),
    "float8": ToCaConfig(cache_interval=3, cache_ratio=0.7, forecast_order=1, cache_precision="float8"),
}


@pytest.mark.parametrize("config", sorted(BLOCK_CONFIGS))
@pytest.mark.parametrize("family", sorted(PIPELINES))
def test_the_estimate_is_what_a_pipeline_run_holds_on_the_block_adapters(family, config):
    make, arguments = PIPELINES[family]
    pipe, config = make(), BLOCK_CONFIGS[config]
    pipe.set_progress_bar_config(disable=True)
    calls, handle = first_call(pipe.transformer)
    apply_cache(pipe, config)
    pipe(**arguments, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent")
    handle.remove()
    measured, call = cache_stats(pipe).cache_bytes, calls[0]
    if family == "opensora":  # STDiT3 reads the size's values (its position scale), on which no size depends
        with pytest.raises(ValueError, match="reads its inputs' values"):
            estimate_cache_bytes(pipe.transformer, config, num_inference_steps=STEPS, **call)
        call = call | {"height": None, "width": None}
    estimate = estimate_cache_bytes(pipe.transformer, config, num_inference_steps=STEPS, **call)
    assert measured > 0 and estimate == pytest.approx(measured, rel=0.05)


def test_two_calls_per_step_hold_two_streams():
    model, config = build("wan"), FORAConfig(cache_interval=3)
    call = FAMILIES["wan"][1]() | {"timestep": timesteps("wan")[0]}
    one = estimate_cache_bytes(model, config, num_inference_steps=STEPS, **call)
    assert estimate_cache_bytes(model, config, num_inference_steps=STEPS, calls_per_step=2, **call) == 2 * one


def test_a_released_size_is_estimated_on_a_meta_model_without_allocating_it():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(builders.flux_transformer().config)
    call = {"hidden_states": torch.empty(1, 64, 16, device="meta"), "encoder_hidden_states": torch.empty(1, 8, 32, device="meta"),
            "pooled_projections": torch.empty(1, 32, device="meta"), "timestep": torch.empty(1, device="meta"),
            "img_ids": torch.empty(64, 3, device="meta"), "txt_ids": torch.empty(8, 3, device="meta"),
            "guidance": torch.empty(1, device="meta")}
    fora = estimate_cache_bytes(model, FORAConfig(cache_interval=3), **call)
    assert fora > 0 and all(p.is_meta for p in model.parameters())
    assert estimate_cache_bytes(model, FORAConfig(cache_interval=3), dtype=torch.bfloat16, **call) < fora
    assert estimate_cache_bytes(model, FORAConfig(cache_interval=1), **call) == 0  # nothing cached


def test_float8_rows_round_trip_within_their_stated_error():
    from ditcache.codecs import FLOAT8_MAX, FLOAT8_RELATIVE_ERROR, Float8Rows

    generator = torch.Generator().manual_seed(0)
    value = torch.randn(3, 40, 64, generator=generator) * torch.logspace(-8, 3, 40)[:, None]  # rows of every size
    value[0, 0, :32] *= 1e-6  # tiny entries beside large ones in a row
    stored = Float8Rows.encode(value)
    error, largest = (stored.decode() - value).abs(), value.abs().amax(dim=-1, keepdim=True)
    normal = value.abs() >= largest * 2.0**-6 / FLOAT8_MAX
    assert (error[normal] <= FLOAT8_RELATIVE_ERROR * value.abs()[normal]).all()
    assert (error[~normal] <= (largest * 2.0**-10 / FLOAT8_MAX).expand_as(value)[~normal]).all() and (~normal).any()
    flat = torch.tensor([0, 41, 119])
    torch.testing.assert_close(stored.rows(flat), stored.decode().view(-1, 64)[flat], rtol=0, atol=0)
    assert stored.nbytes() == value.numel() + 4 * 3 * 40


def test_float8_storage_holds_half_of_bf16_and_stays_close(saved_pipelines):
    """The preset with its cache in float8 on bf16 FLUX: about half the bytes, the same steps, close images."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(saved_pipelines / "flux", torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    images, sizes = {}, {}
    for precision in ("model", "float8"):
        apply_cache(pipe, preset("ditcache", tolerance=0.4, cache_precision=precision, cache_memory=None))
        images[precision] = pipe("a red fox", num_inference_steps=20, height=64, width=64, max_sequence_length=8,
                                 generator=torch.Generator().manual_seed(0), output_type="latent").images.float()
        sizes[precision] = cache_stats(pipe)
    assert sizes["float8"].full_step_indices == sizes["model"].full_step_indices and sizes["model"].partial_steps
    blocks = sizes["model"].cache_bytes
    assert 0.5 * blocks < sizes["float8"].cache_bytes < 0.65 * blocks
    assert (images["float8"] - images["model"]).abs().max() < 0.1 * images["model"].abs().max()


@pytest.mark.parametrize(("argument", "value", "message"), [
    ("num_inference_steps", 0, "`num_inference_steps` must be an integer >= 1"),
    ("calls_per_step", 0, "`calls_per_step` must be an integer >= 1"),
])
def test_bad_estimate_arguments_are_named(argument, value, message):
    with pytest.raises(ValueError, match=message):
        estimate_cache_bytes(build("wan"), FORAConfig(cache_interval=3), **{argument: value})


COMMAND_PIPELINES = {  # the pipeline's arguments at a size, and the same size for `ditcache memory`
    "flux": (dict(prompt="a red fox", height=64, width=48, max_sequence_length=8), ["--height", "64", "--width", "48", "--text-tokens", "8"]),
    "dit": (dict(class_labels=[1]), ["--height", "16", "--width", "16"]),
    "pixart_sigma": (dict(prompt="a red fox", height=16, width=24, max_sequence_length=8, use_resolution_binning=False,
                          clean_caption=False), ["--height", "16", "--width", "24", "--text-tokens", "8"]),
    "wan": (dict(prompt="a red fox", height=16, width=16, num_frames=5, max_sequence_length=8),
            ["--height", "16", "--width", "16", "--frames", "5", "--text-tokens", "8"]),
}


@pytest.mark.parametrize("family", sorted(COMMAND_PIPELINES))
def test_the_memory_command_at_a_pipelines_size_is_what_its_run_holds(family, saved_pipelines, tmp_path, capsys):
    """The call ``ditcache memory`` builds for a size is the one the family's pipeline makes: the same cache, and H
    one hidden-state tensor of that call (guidance batched by DiT and PixArt, two calls by Wan)."""
    from diffusers import DiffusionPipeline

    from ditcache import memory
    from ditcache.cli import build_parser

    folder = saved_pipelines / family
    if family == "wan":
        builders.wan_pipeline(folder := tmp_path / "wan")
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    calls, handle = first_call(pipe.transformer)
    apply_cache(pipe, preset("ditcache"))
    arguments, size = COMMAND_PIPELINES[family]
    pipe(**arguments, num_inference_steps=STEPS, output_type="latent")
    handle.remove()
    args = build_parser().parse_args(["memory", "--model", str(folder), *size, "--steps", str(STEPS), "--dtype", "float32",
                                      "--methods", "ditcache", "fora:3"])
    (name, size, in_h, _), _ = memory.run(args)
    assert name == "ditcache" and size == pytest.approx(cache_stats(pipe).cache_bytes, rel=0.05)
    hidden = calls[0]["hidden_states"]
    tokens = hidden.shape[1] if hidden.ndim == 3 else math.prod(hidden.shape[2:]) // math.prod(pipe.transformer.config.patch_size
                                                                                              if family == "wan" else (2, 2))
    text = calls[0]["encoder_hidden_states"].shape[1] if family == "flux" else 0  # joint attention: text tokens too
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    assert in_h == pytest.approx(size / (hidden.shape[0] * (tokens + text) * width * 4))
    assert "H = " in capsys.readouterr().out


def test_every_released_config_builds_its_pipelines_call():
    """Each released config shipped (``ditcache/models/configs``) on the meta device, at a small size: the call its
    pipeline makes runs the model dry, and the cache is known."""
    from ditcache import memory

    for config in sorted(memory.RELEASED_CONFIGS.glob("*.json")):
        transformer = memory.meta_transformer(memory.load_config(config.stem))
        call = memory.call_at_size(transformer, 256, 256, 9, 1, None, torch.bfloat16)
        size, _ = memory.estimate_cache(transformer, FORAConfig(cache_interval=3), num_inference_steps=STEPS,
                                        calls_per_step=call.calls_per_step, dtype=torch.bfloat16, **call.arguments)
        assert size > 0 and all(p.is_meta for p in transformer.parameters()), config.stem


@pytest.mark.parametrize(("model", "size", "limit"), [
    ("flux1-dev", ["--height", "1024", "--width", "1024"], 2 * 2**30),
    ("wan2.1-t2v-14b", ["--height", "720", "--width", "1280", "--frames", "81"], 12 * 2**30),
])
def test_the_presets_default_budget_fits_the_released_models_at_their_sizes(model, size, limit):
    """The released configs shipped as data, built on the meta device: the preset's cache without its budget, and
    with its default one (16 H), which the issue bounds at 2 GiB for FLUX.1-dev and 12 GiB for Wan 2.1 14B."""
    from ditcache import memory
    from ditcache.cli import build_parser

    args = build_parser().parse_args(["memory", "--model", model, *size, "--methods", "ditcache"])
    [(name, bounded, in_h, layout)] = memory.run(args)
    assert bounded <= limit and in_h <= 16 and layout.span > 0 and layout.order == 2


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "nope"], "neither a released name (cogvideox-5b, dit-xl-2-256, flux1-dev, hunyuanvideo"),
    (["--model", "flux1-dev", "--methods", "fbc:0.1"], "estimates ditcache's own methods"),
    (["--model", "flux1-dev", "--methods", "fora:0"], "cache_interval"),
])
def test_memory_command_mistakes_are_one_line(argv, message, capsys):
    from ditcache.cli import main

    assert main(["memory", *argv]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
