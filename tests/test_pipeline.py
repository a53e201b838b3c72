"""ToCaPipeline: loading, per-call options, saving, and coexistence with plain pipelines and hooks."""

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxImg2ImgPipeline, FluxPipeline

import ditcache
from ditcache import FORAConfig, ToCaConfig, ToCaPipeline
from ditcache.hooks import BLOCK_HOOK, STEP_HOOK

FOLDERS = ["dit", "pixart_alpha", "pixart_sigma", "flux"]


def ditcache_hooks(module):
    registries = [m._diffusers_hook for m in module.modules() if hasattr(m, "_diffusers_hook")]
    return [name for registry in registries for name in registry.hooks if name in (STEP_HOOK, BLOCK_HOOK)]


def call_kwargs(folder, **extra):
    if folder == "dit":
        return {"class_labels": [0, 1], "num_inference_steps": 6} | extra
    kwargs = {"prompt": "a red fox in snow", "num_inference_steps": 6, "height": 16, "width": 16}
    if folder.startswith("pixart"):
        kwargs |= {"clean_caption": False, "use_resolution_binning": False}
    else:
        kwargs |= {"max_sequence_length": 16}
    return kwargs | extra


def generate(pipe, folder, **extra):
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=torch.Generator().manual_seed(0), output_type="np", **call_kwargs(folder, **extra)).images


@pytest.mark.parametrize("folder", FOLDERS)
def test_interval_one_reproduces_the_plain_pipeline(saved_pipelines, folder):
    plain = DiffusionPipeline.from_pretrained(saved_pipelines / folder)
    cached = ToCaPipeline.from_pretrained(saved_pipelines / folder, cache_interval=1)
    assert isinstance(cached, type(plain)) and isinstance(cached, ToCaPipeline)
    assert type(cached).__name__ == type(plain).__name__
    np.testing.assert_array_equal(generate(cached, folder), generate(plain, folder))
    assert cached.cache_stats.steps == 6 and cached.cache_stats.partial_steps == 0
    assert ditcache_hooks(plain.transformer) == []  # the other pipeline of the class stays plain


def test_call_keeps_the_original_signature(saved_pipelines):
    pipe = ToCaPipeline.from_pretrained(saved_pipelines / "flux")
    original = inspect.signature(FluxPipeline.__call__).parameters
    parameters = inspect.signature(pipe.__call__).parameters
    assert list(parameters)[: len(original) - 1] == list(original)[1:]
    assert {"cache_interval", "cache_ratio", "cache"} <= set(parameters)
    assert FluxPipeline.__call__ is inspect.getattr_static(FluxPipeline, "__call__")  # the class is untouched


def test_per_call_options_do_not_leak(saved_pipelines):
    plain = generate(FluxPipeline.from_pretrained(saved_pipelines / "flux"), "flux", num_inference_steps=10)
    pipe = ToCaPipeline.from_pretrained(saved_pipelines / "flux", cache_ratio=0.8)
    default = generate(pipe, "flux", num_inference_steps=10)
    assert not np.array_equal(default, plain)
    np.testing.assert_array_equal(generate(pipe, "flux", num_inference_steps=10, cache_interval=1), plain)
    np.testing.assert_array_equal(generate(pipe, "flux", num_inference_steps=10, cache=False), plain)
    assert pipe.cache_stats is None
    np.testing.assert_array_equal(generate(pipe, "flux", num_inference_steps=10), default)
    assert pipe.cache_config == ToCaConfig(cache_ratio=0.8)
    other = generate(pipe, "flux", num_inference_steps=10, cache_ratio=0.5)
    assert not np.array_equal(other, default) and pipe.cache_stats.recompute_fraction > 0
    np.testing.assert_array_equal(generate(pipe, "flux", num_inference_steps=10), default)


@pytest.mark.parametrize("folder", ["flux", "pixart_alpha"])
def test_several_images_per_prompt_and_size_changes(saved_pipelines, folder):
    pipe = ToCaPipeline.from_pretrained(saved_pipelines / folder)
    assert generate(pipe, folder, num_images_per_prompt=2).shape[0] == 2
    assert generate(pipe, folder, height=24, width=16).shape[1:3] == (24, 16)
    assert generate(pipe, folder).shape[1:3] == (16, 16)


def test_save_pretrained_writes_a_plain_diffusers_folder(saved_pipelines, tmp_path):
    pipe = ToCaPipeline.from_pretrained(saved_pipelines / "flux", cache_config=FORAConfig(cache_interval=2))
    expected = generate(pipe, "flux")
    pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    plain = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(plain) is FluxPipeline and ditcache_hooks(plain.transformer) == []
    reloaded = ToCaPipeline.from_pretrained(tmp_path / "saved")
    assert reloaded.cache_config == FORAConfig(cache_interval=2)
    np.testing.assert_array_equal(generate(reloaded, "flux"), expected)


def test_push_to_hub_uploads_the_folder_with_its_ditcache_config(saved_pipelines, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from huggingface_hub import ModelCard

    from ditcache.pipelines import toca_pipeline

    uploaded = {}

    def upload_folder(repo_id, folder_path, **kwargs):  # what the hub would receive, at the moment of the upload
        uploaded.update(repo_id=repo_id, files=sorted(p.name for p in folder_path.iterdir()), kwargs=kwargs)
        uploaded["config"] = json.loads((folder_path / "ditcache_config.json").read_text())

    monkeypatch.setattr(toca_pipeline, "create_repo", lambda repo_id, **kwargs: SimpleNamespace(repo_id=f"me/{repo_id}"))
    monkeypatch.setattr(toca_pipeline, "load_or_create_model_card", lambda *args, **kwargs: ModelCard("---\n---\n# a card"))
    monkeypatch.setattr(toca_pipeline, "upload_folder", upload_folder)
    pipe = ToCaPipeline.from_pretrained(saved_pipelines / "flux", cache_config=FORAConfig(cache_interval=2))
    pipe.save_pretrained(tmp_path / "fox", push_to_hub=True, commit_message="fox", token="t")
    assert uploaded["repo_id"] == "me/fox" and uploaded["kwargs"]["commit_message"] == "fox" and uploaded["kwargs"]["token"] == "t"
    assert {"ditcache_config.json", "model_index.json", "transformer", "README.md"} <= set(uploaded["files"])
    assert uploaded["config"]["method"] == "fora" and uploaded["config"]["cache_interval"] == 2


def test_save_pretrained_takes_numpy_values_and_writes_the_config_atomically(saved_pipelines, tmp_path):
    config = ToCaConfig(cache_interval=np.int64(3), cache_ratio=np.float32(0.5), seed=np.uint64(7))
    pipe = ToCaPipeline.from_pretrained(saved_pipelines / "dit", cache_config=config)
    pipe.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "ditcache_config.json").read_text())
    assert saved["cache_interval"] == 3 and saved["seed"] == 7
    reloaded = ToCaPipeline.from_pretrained(tmp_path / "saved")
    assert reloaded.cache_config == ToCaConfig(cache_interval=3, cache_ratio=0.5, seed=7)
    assert not list((tmp_path / "saved").glob("*.tmp"))


def test_a_failed_save_leaves_no_folder_claiming_a_config(saved_pipelines, tmp_path, monkeypatch):
    pipe = ToCaPipeline.from_pretrained(saved_pipelines / "dit", cache_interval=2)
    object.__setattr__(pipe.cache_config, "seed", object())  # not JSON: refused before any weight is written
    with pytest.raises(TypeError, match="JSON serializable"):
        pipe.save_pretrained(tmp_path / "unsaved")
    assert not (tmp_path / "unsaved").exists()

    pipe = ToCaPipeline.from_pretrained(saved_pipelines / "dit", cache_interval=2)
    pipe.save_pretrained(tmp_path / "saved")

    def fail(self, save_directory, *args, **kwargs):
        (tmp_path / "saved" / "model_index.json").write_text("{")  # half-written
        raise OSError("disk full")

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "ditcache_config.json").exists()


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{not json", "Expecting property name"),
        ('{"method": "tocaa"}', "`method` must be one of"),
        ('{"method": "toca", "cache_interval": 0}', "`cache_interval` must be an integer in"),
        ('{"method": "toca", "cache_interval": "3"}', "`cache_interval` must be an integer in"),
        ('{"method": "toca", "interval": 3}', "unknown field"),
        ('{"method": "tome", "use_rand": "no"}', "`use_rand` must be True or False"),
        ("[]", "give one config"),
        ("3", "must be an object"),
    ],
)
def test_malformed_saved_config_names_the_file(tmp_path, text, problem):
    path = tmp_path / "ditcache_config.json"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        ToCaPipeline.from_pretrained(tmp_path)
    assert str(path) in str(error.value) and problem in str(error.value)


def test_from_pipe_shares_components_and_switches_task(saved_pipelines):
    source = FluxPipeline.from_pretrained(saved_pipelines / "flux")
    img2img = ToCaPipeline.from_pipe(source, pipeline_class=FluxImg2ImgPipeline, cache_interval=2)
    assert isinstance(img2img, FluxImg2ImgPipeline) and isinstance(img2img, ToCaPipeline)
    assert img2img.transformer is source.transformer  # shared: the source now runs cached as well
    image = np.full((16, 16, 3), 128, dtype=np.uint8)
    img2img.set_progress_bar_config(disable=True)
    out = img2img("a red fox in snow", image=image, strength=0.9, num_inference_steps=10, height=16, width=16,
                  max_sequence_length=16, output_type="np").images
    assert out.shape == (1, 16, 16, 3) and img2img.cache_stats.partial_steps > 0
    same_task = ToCaPipeline.from_pipe(img2img)
    assert type(same_task).__name__ == "FluxImg2ImgPipeline" and same_task.cache_config == img2img.cache_config


def test_unsupported_pipelines_and_direct_construction_are_refused(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8), norm_num_groups=8,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, layers_per_block=1)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(TypeError, match="supported pipelines: DiTPipeline, PixArtAlphaPipeline"):
        ToCaPipeline.from_pretrained(tmp_path / "ddpm")
    with pytest.raises(TypeError, match="from_pretrained"):
        ToCaPipeline()
    with pytest.raises(ValueError, match="cache_ratio"):
        ToCaPipeline.from_pretrained(tmp_path / "ddpm", cache_ratio=1.5)


def test_composes_with_layerwise_casting(saved_pipelines):
    plain = FluxPipeline.from_pretrained(saved_pipelines / "flux")
    plain.transformer.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    expected = generate(plain, "flux")
    ditcache.apply_cache(plain, ToCaConfig(cache_interval=1))
    np.testing.assert_array_equal(generate(plain, "flux"), expected)
    ditcache.apply_cache(plain, ToCaConfig(cache_interval=3, cache_ratio=0.5))
    generate(plain, "flux")
    assert ditcache.cache_stats(plain).partial_steps > 0
    ditcache.remove_cache(plain)
    casting = [m for m in plain.transformer.modules() if hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks]
    assert casting and ditcache_hooks(plain.transformer) == []
    np.testing.assert_array_equal(generate(plain, "flux"), expected)


def run_cli(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "ditcache", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_generate_runs_offline_without_a_model(tmp_path):
    result = run_cli("generate", "--out", "digits.png", "--compare", "--repeats", "1", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "reference FLUX" in result.stdout and "speedup" in result.stdout and "PSNR" in result.stdout
    from PIL import Image

    from ditcache.eval import digits

    grid = torch.from_numpy(np.asarray(Image.open(tmp_path / "digits.png"))).permute(2, 0, 1).float() / 255
    assert grid.shape[1] == 2 * 128  # uncached above cached, each 32 x 32 image enlarged 4 times
    grid = grid[:, ::4, -10 * 128 :: 4]  # the ten digits side by side, right of the labels, at their size
    rows = grid.unflatten(1, (2, 32)).unflatten(3, (10, 32)).permute(1, 3, 0, 2, 4)  # (row, digit, 3, 32, 32)
    classifier = digits.DigitClassifier.from_pretrained()
    for row in rows:  # each digit drawn as asked, cached and uncached
        assert digits.accuracy(classifier, row, torch.arange(10)) >= 0.8


@pytest.mark.slow
def test_generate_with_a_local_model(saved_pipelines, tmp_path):
    result = run_cli("generate", "--model", str(saved_pipelines / "dit"), "--prompt", "one", "--steps", "4",
                     "--cache-interval", "2", "--out", "one.png", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 partial steps" in result.stdout and (tmp_path / "one.png").exists()
    bad = run_cli("generate", "--model", str(saved_pipelines / "dit"), "--prompt", "one", "--cache-ratio", "2", cwd=tmp_path)
    assert bad.returncode != 0 and "cache_ratio" in bad.stderr


@pytest.mark.parametrize("folder", ["flux", "pixart_alpha"])
def test_bfloat16_pipelines_run_cached(saved_pipelines, folder):
    pipe = ToCaPipeline.from_pretrained(saved_pipelines / folder, cache_ratio=0.5, dtype=torch.bfloat16)
    images = generate(pipe, folder, num_inference_steps=8)
    assert np.isfinite(images).all() and pipe.cache_stats.partial_steps > 0
    assert pipe.transformer.dtype == torch.bfloat16
