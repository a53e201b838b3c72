"""OpenSora 1.2 (STDiT3) in diffusers form, and caching on it."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ditcache import FORAConfig, ToCaConfig, ToMeConfig, apply_cache, cache_stats, remove_cache
from ditcache.adapters import transformer_adapter
from ditcache.models import STDiT3Model
from ditcache.state import CallSignature, RunState
from ditcache.store import BlockCache

DATA = Path(__file__).parent / "data"
TINY = dict(hidden_size=64, depth=2, num_heads=4, caption_channels=32, model_max_length=8, input_sq_size=64)


def tiny_stdit3(seed: int = 0) -> STDiT3Model:
    torch.manual_seed(seed)
    model = STDiT3Model(**TINY).eval()
    with torch.no_grad():  # zero-initialised layers would hide mistakes: every parameter random
        for parameter in model.parameters():
            parameter.normal_(std=0.05)
    return model


def call_inputs(batch: int = 2, frames: int = 3, height: int = 8, width: int = 10, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, TINY["model_max_length"], dtype=torch.long)
    mask[:, :5] = 1
    return dict(
        x=torch.randn(batch, 4, frames, height, width, generator=generator),
        y=torch.randn(batch, 1, TINY["model_max_length"], TINY["caption_channels"], generator=generator),
        mask=mask, fps=torch.full((batch,), 24.0), height=torch.full((batch,), 64.0), width=torch.full((batch,), 80.0),
    )


def sample(model, inputs, steps=(1000.0, 850.0, 700.0, 550.0, 400.0, 250.0)):
    """A guided Euler loop: the transformer sees [latents, latents] with [caption, empty caption]."""
    latents, batch = inputs["x"].clone(), inputs["x"].shape[0]
    text = torch.cat([inputs["y"], model.null_caption(batch)])
    extra = {k: torch.cat([inputs[k], inputs[k]]) for k in ("mask", "fps", "height", "width")}
    with torch.no_grad():
        for t in steps:
            out = model(torch.cat([latents, latents]), torch.full((2 * batch,), t), text, **extra).sample
            cond, uncond = out[:, :4].chunk(2)
            latents = latents - 0.15 * (uncond + 4.0 * (cond - uncond))
    return latents


def test_released_key_layout_loads_with_no_missing_or_unexpected_keys(tmp_path):
    lines = (DATA / "stdit3_depth2_keys.txt").read_text().splitlines()
    expected = [line for line in lines if line and not line.startswith("#")]  # the released names, depth 2
    model = tiny_stdit3()
    assert sorted(model.state_dict()) == sorted(expected)
    # The released folder: a transformers-style config.json and model.safetensors.
    released = tmp_path / "released"
    released.mkdir()
    config = {"architectures": ["STDiT3"], "model_type": "STDiT3", "input_size": [None, None, None],
              "patch_size": [1, 2, 2], "pred_sigma": True, "enable_flash_attn": False, **TINY}
    (released / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, released / "model.safetensors")
    loaded = STDiT3Model.from_pretrained(released)
    inputs = call_inputs()
    torch.testing.assert_close(sample(loaded, inputs), sample(model, inputs), rtol=0, atol=0)
    # diffusers round trip.
    model.save_pretrained(tmp_path / "diffusers")
    again = STDiT3Model.from_pretrained(tmp_path / "diffusers")
    torch.testing.assert_close(sample(again, inputs), sample(model, inputs), rtol=0, atol=0)


def test_forward_shapes_padding_and_conditioning_frames():
    model = tiny_stdit3()
    inputs = call_inputs(batch=1, frames=2, height=7, width=9)  # odd sizes: padded to whole patches, cropped back
    out = model(inputs["x"], torch.tensor([500.0]), inputs["y"], inputs["mask"], fps=inputs["fps"]).sample
    assert out.shape == (1, 8, 2, 7, 9) and torch.isfinite(out).all()
    # A conditioning frame (x_mask False) is modulated as at timestep 0, which changes the output.
    x_mask = torch.tensor([[False, True]])
    masked = model(inputs["x"], torch.tensor([500.0]), inputs["y"], inputs["mask"], x_mask=x_mask).sample
    plain = model(inputs["x"], torch.tensor([500.0]), inputs["y"], inputs["mask"]).sample
    assert not torch.allclose(masked, plain)


def test_caption_mask_hides_padding_tokens():
    model = tiny_stdit3()
    inputs = call_inputs(batch=1)
    changed = inputs["y"].clone()
    changed[:, :, 5:] += 10.0  # tokens outside the mask
    first = model(inputs["x"], torch.tensor([500.0]), inputs["y"], inputs["mask"]).sample
    second = model(inputs["x"], torch.tensor([500.0]), changed, inputs["mask"]).sample
    torch.testing.assert_close(first, second, rtol=0, atol=1e-6)


@pytest.mark.parametrize("temporal", [False, True])
@pytest.mark.parametrize("score", ["attention", "k_norm", "v_norm", "random", "cross_attention_entropy"])
def test_block_adapter_full_path_equals_the_block(temporal, score):
    model = tiny_stdit3()
    block = (model.temporal_blocks if temporal else model.spatial_blocks)[1]
    settings = ToCaConfig(cache_interval=3, cache_ratio=0.8, schedule="constant", score=score).resolve("opensora")
    adapter = transformer_adapter(model).block_adapters(settings)[3 if temporal else 2]
    assert adapter.block is block
    generator = torch.Generator().manual_seed(0)
    frames, per_frame = 3, 20
    x = torch.randn(2, frames * per_frame, 64, generator=generator)
    y = torch.randn(2, 8, 64, generator=generator)
    t = torch.randn(2, 6 * 64, generator=generator)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 6:] = False
    rope = model.rope if temporal else None
    expected = block(x, y, t, mask, None, None, frames, per_frame, rope=rope)
    run = RunState(settings)
    run.generator = torch.Generator().manual_seed(0)
    run.signature = CallSignature(2, (frames * 4, 5), torch.float32, torch.device("cpu"))
    run.plan.is_full, run.plan.step = True, 0
    cache = BlockCache()
    got = adapter.forward(run, cache, x, y, t, mask, None, None, frames, per_frame, rope)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert {key.branch for key in cache.entries} == {"attn", "cross_attn", "mlp"}
    assert cache.base_scores["image"].shape == (2, frames * per_frame)
    if score == "attention":  # the attention the block computed: qk norm, then rotary positions in time
        from ditcache import scores
        from ditcache.models.stdit3 import modulate

        shift, scale = block.modulation(t)[:2]
        groups = block.frames_to_groups(modulate(block.norm1(x), shift, scale), frames)
        q, k, _ = block.attn.qkv(groups).view(*groups.shape[:2], 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = block.attn.q_norm(q), block.attn.k_norm(k)
        if temporal:
            q, k = rope(q), rope(k)
        received = scores.attention_received(q, k, block.attn.scale)
        expected_score = block.groups_to_frames(received[..., None], 2, frames)[..., 0]
        torch.testing.assert_close(cache.base_scores["image"], expected_score, rtol=1e-5, atol=1e-6)


def test_cache_interval_one_reproduces_uncached_and_removal_restores():
    model = tiny_stdit3()
    inputs = call_inputs()
    reference = sample(model, inputs)
    apply_cache(model, ToCaConfig(cache_interval=1))
    torch.testing.assert_close(sample(model, inputs), reference, rtol=0, atol=1e-6)
    apply_cache(model, ToCaConfig())  # the OpenSora preset
    cached = sample(model, inputs)
    stats = cache_stats(model)
    remove_cache(model)
    torch.testing.assert_close(sample(model, inputs), reference, rtol=0, atol=0)
    assert not torch.equal(cached, reference) and float((cached - reference).abs().max()) < 0.5
    assert stats.full_step_indices == (0, 1, 2, 5) and stats.flops_speedup > 1.2


def test_opensora_preset_runs_cross_attention_every_other_full_step():
    settings = ToCaConfig().resolve("opensora")
    schedule = settings.schedule
    assert (schedule.cache_interval, settings.score, schedule.full_steps_at_start) == (3, "cross_attention_entropy", 3)
    assert schedule.recompute_fraction(0.5, 0.5, "mlp") == pytest.approx(0.15)
    assert schedule.recompute_fraction(0.5, 0.5, "cross_attn") == 0.0
    full_steps, since = [], 0
    for step in range(20):
        since += 1
        if schedule.is_full_step(step, since, step / 19):
            full_steps.append(step)
            since = 0
    assert full_steps == [0, 1, 2, 5, 8, 11, 14, 17]
    due = [schedule.branch_due("cross_attn", step, n + 1) for n, step in enumerate(full_steps)]
    assert due == [True, True, True, False, True, False, True, False]  # every 6 steps after the first 3


@pytest.mark.parametrize("config", [ToCaConfig(cache_interval=2, cache_ratio=0.7, schedule="constant", score="v_norm"),
                                    ToCaConfig(cache_interval=2, cache_ratio=0.7, schedule="constant", score="cross_attention_entropy"),
                                    ToCaConfig(cache_interval=2, cache_ratio=0.7, schedule="constant", score="attention"),
                                    FORAConfig(cache_interval=2), ToCaConfig(forecast_order=1),
                                    [ToCaConfig(cache_interval=2), ToMeConfig(ratio=0.5, merge_mlp=True, seed=0)]])
def test_engine_flops_match_flop_counter(config):
    from ditcache.flops import count_flops

    model = tiny_stdit3()
    inputs = call_inputs()
    apply_cache(model, config)
    _, counted = count_flops(lambda: sample(model, inputs), model)
    stats = cache_stats(model)
    remove_cache(model)
    if getattr(config, "forecast_order", 0):  # the forecast's element-wise arithmetic is counted by the engine only
        assert counted < stats.flops < 1.01 * counted
    else:
        assert stats.flops == pytest.approx(counted, rel=1e-3)


# -- the VAE ---------------------------------------------------------------------------------------
def test_vae_has_the_released_key_layout():
    from ditcache.models import OpenSoraVAE

    expected = {}
    for line in (DATA / "opensora_vae_keys.tsv").read_text().splitlines():  # built from the released code
        key, shape = line.split("\t")
        expected[key] = json.loads(shape)
    with torch.device("meta"):
        vae = OpenSoraVAE()
    assert {key: list(value.shape) for key, value in vae.state_dict().items()} == expected
    assert vae.latent_size(51, 240, 426) == (15, 30, 53) and vae.latent_size(102, 480, 854) == (30, 60, 106)
    assert [vae.latent_size(frames, 8, 8)[0] for frames in (1, 4, 5, 16, 17, 18, 34, 204)] == [1, 1, 2, 4, 5, 6, 10, 60]


def test_vae_round_trip_shapes_causality_and_save_load(tmp_path):
    from ditcache.eval.builders import tiny_opensora_vae
    from ditcache.models import OpenSoraVAE

    vae = tiny_opensora_vae()
    video = torch.rand(1, 3, 20, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(video)
        assert latents.shape == (1, 4, *vae.latent_size(20, 16, 24)) == (1, 4, 6, 8, 12)
        assert vae.decode(latents, num_frames=20).shape == video.shape
        later = video.clone()
        later[:, :, 17:] = 0.0  # 17-frame chunks are encoded independently: the first chunk's 5 latents keep
        changed = vae.encode(later)
        torch.testing.assert_close(changed[:, :, :5], latents[:, :, :5], rtol=0, atol=0)
        assert not torch.equal(changed[:, :, 5:], latents[:, :, 5:])
        vae.save_pretrained(tmp_path / "vae")
        again = OpenSoraVAE.from_pretrained(tmp_path / "vae")
        torch.testing.assert_close(again.decode(latents, 20), vae.decode(latents, 20), rtol=0, atol=0)


# -- the pipeline ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def opensora_folder(tmp_path_factory):
    from ditcache.eval.builders import opensora_pipeline

    path = tmp_path_factory.mktemp("opensora") / "pipe"
    opensora_pipeline(path)
    return path


VIDEO = dict(num_frames=5, height=16, width=24, num_inference_steps=8, output_type="np")


def test_pipeline_generates_frames_and_round_trips(opensora_folder, tmp_path):
    from ditcache.pipelines import OpenSoraPipeline, export

    pipe = OpenSoraPipeline.from_pretrained(opensora_folder)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(["a red fox in snow", "a cat"], generator=torch.Generator().manual_seed(0), **VIDEO).frames
    assert frames.shape == (2, 5, 16, 24, 3) and 0 <= frames.min() and frames.max() <= 1 and frames.std() > 0
    pipe.save_pretrained(tmp_path / "again")
    again = OpenSoraPipeline.from_pretrained(tmp_path / "again")
    again.set_progress_bar_config(disable=True)
    same = again(["a red fox in snow", "a cat"], generator=torch.Generator().manual_seed(0), **VIDEO).frames
    assert (same == frames).all()
    images = pipe("a dog", generator=torch.Generator().manual_seed(0), **{**VIDEO, "output_type": "pil"}).frames[0]
    assert len(images) == 5 and images[0].size == (24, 16)
    assert export(images, tmp_path / "dog.gif").stat().st_size > 0
    with pytest.raises(ValueError, match="height"):
        pipe("a dog", **{**VIDEO, "height": 3})
    with pytest.raises(ValueError, match="output_type"):
        pipe("a dog", **{**VIDEO, "output_type": "pt"})
    with pytest.raises(ValueError, match="latents"):
        pipe("a dog", latents=torch.zeros(2, 4, 2, 8, 12), **VIDEO)
    with pytest.raises(ValueError, match="num_frames"):
        pipe("a dog", **{**VIDEO, "num_frames": 0})


def test_pipeline_batches_long_clips_and_unguided_calls(opensora_folder):
    from ditcache.pipelines import OpenSoraPipeline

    pipe = OpenSoraPipeline.from_pretrained(opensora_folder)
    pipe.set_progress_bar_config(disable=True)
    video = {**VIDEO, "num_frames": 18, "num_inference_steps": 4}  # two VAE chunks (17 + 1 frames)
    latents = torch.randn(2, 4, *pipe.vae.latent_size(18, 16, 24), generator=torch.Generator().manual_seed(0))
    both = pipe(["a red fox in snow", "a cat"], latents=latents, **video).frames
    alone = pipe("a cat", latents=latents[1:], **video).frames
    assert both.shape == (2, 18, 16, 24, 3) and latents.shape[2] == 6
    assert abs(both[1] - alone[0]).max() < 1e-5  # a prompt's video does not depend on its batch
    unguided = pipe("a cat", latents=latents[1:], guidance_scale=1.0, **video).frames
    assert unguided.shape == alone.shape and abs(unguided - alone).max() > 0


def test_toca_pipeline_loads_opensora_and_interval_one_reproduces_uncached(opensora_folder):
    from ditcache import ToCaPipeline
    from ditcache.pipelines import OpenSoraPipeline

    pipe = ToCaPipeline.from_pretrained(opensora_folder, cache_interval=1)
    assert isinstance(pipe, OpenSoraPipeline)
    pipe.set_progress_bar_config(disable=True)
    run = lambda **kw: pipe("a red fox in snow", generator=torch.Generator().manual_seed(0), **VIDEO, **kw).frames
    uncached = run(cache=False)
    assert abs(run() - uncached).max() <= 1e-6
    cached = run(cache_interval=3)
    stats = pipe.cache_stats
    assert stats.full_step_indices == (0, 1, 2, 5) and stats.flops_speedup > 1.2
    assert 0 < abs(cached - uncached).max() < 0.5


def test_token_merging_per_frame_on_spatial_blocks():
    model = tiny_stdit3()
    inputs = call_inputs(frames=2, height=8, width=8)  # 4 x 4 patches per frame
    reference = sample(model, inputs)
    apply_cache(model, ToMeConfig(ratio=0.0))
    torch.testing.assert_close(sample(model, inputs), reference, rtol=0, atol=0)  # nothing merged: exact
    for config in (ToMeConfig(ratio=0.5, seed=0), ToMeConfig(ratio=0.5, merge_mlp=True, seed=0),
                   [ToCaConfig(cache_interval=2), ToMeConfig(ratio=0.5, seed=0)]):
        apply_cache(model, config)
        merged = sample(model, inputs)
        stats = cache_stats(model)
        remove_cache(model)
        assert stats.merged_fraction > 0 and stats.flops_speedup > 1.0, config
        assert 0 < float((merged - reference).abs().max()) < 1.0, config
    with pytest.raises(ValueError, match="merge_crossattn"):
        apply_cache(model, ToMeConfig(merge_crossattn=True))
    with pytest.raises(ValueError, match="score"):
        apply_cache(model, [ToCaConfig(score="v_norm"), ToMeConfig()])
    torch.testing.assert_close(sample(model, inputs), reference, rtol=0, atol=0)


def test_video_sweep_scores_vbench_temporal_flickering(tmp_path):
    import yaml
    from PIL import Image

    from ditcache.eval import sweep

    config = {
        "pipeline": "tiny-opensora", "steps": 4, "height": 16, "width": 24, "call": {"num_frames": 5},
        "seeds": [0], "prompts": ["a red fox in snow", "a cat"], "methods": ["toca:2:0.8:auto:auto"],
        "metrics": ["psnr", "temporal_flickering"], "grid_prompts": 1,
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    rows = sweep.run(sweep.load_config(tmp_path / "sweep.yaml"), tmp_path / "out", "cpu", quiet=True)
    assert [row["method"] for row in rows] == ["uncached", "toca:2:0.8:auto:auto"]
    for row in rows:
        assert row["images"] == 2 and 0 < row["temporal_flickering"] <= 1
    strip = next((tmp_path / "out" / "images").glob("uncached-*/p00000-s0.png"))
    assert Image.open(strip).size == (5 * 24, 16)  # five frames side by side
    assert json.loads(strip.with_suffix(".json").read_text())["frames"] == 5


def test_spatial_bonus_is_given_per_frame():
    from ditcache import record_selections

    model = tiny_stdit3()
    inputs = call_inputs(frames=3, height=8, width=10)  # 4 x 5 patches per frame: 2 x 3 cells of 2 x 2
    config = ToCaConfig(cache_interval=2, cache_ratio=0.75, schedule="constant", score="random",
                        spatial_bonus=0.5, spatial_grid=2, full_steps_at_start=1)
    apply_cache(model, config)
    with record_selections(model) as events:
        sample(model, inputs)
    remove_cache(model)
    assert events
    for event in events:
        boosted = (event.bonus != 0).view(event.bonus.shape[0], 3, 20).sum(-1)
        assert (boosted == 6).all()  # one token per cell in every frame, none spanning two frames


@pytest.mark.slow
def test_generate_command_writes_a_video(opensora_folder, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    command = [sys.executable, "-m", "ditcache", "generate", "--model", str(opensora_folder), "--prompt", "a cat",
               "--frames", "5", "--height", "16", "--width", "24", "--steps", "6", "--cache-interval", "2",
               "--out", "cat.gif", "--compare", "--quiet"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "speedup" in result.stdout and "PSNR" in result.stdout
    gif = Image.open(tmp_path / "cat.gif")
    # uncached above cached in every frame, each enlarged 8 times (16 px high), with a label column
    assert gif.n_frames == 5 and gif.height == 2 * 8 * 16 and gif.width > 8 * 24


def test_fps_per_prompt_and_bfloat16_sizes_condition_as_released():
    model = tiny_stdit3()
    inputs = call_inputs(batch=2)
    x, y = torch.cat([inputs["x"], inputs["x"]]), torch.cat([inputs["y"], model.null_caption(2)])
    t = torch.full((4,), 500.0)
    run = lambda **kw: model(x, t, y, inputs["mask"], **kw).sample
    per_row = run(fps=torch.tensor([24.0, 12.0, 24.0, 12.0]), height=torch.full((4,), 480.0), width=torch.full((4,), 848.0))
    per_prompt = run(fps=torch.tensor([24.0, 12.0]),  # one per prompt, repeated over the guidance halves
                     height=torch.full((2,), 480.0, dtype=torch.bfloat16), width=torch.full((2,), 848.0, dtype=torch.bfloat16))
    torch.testing.assert_close(per_prompt, per_row, rtol=0, atol=0)  # 480 x 848 in Python floats, not bf16
