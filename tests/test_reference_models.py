"""The committed reference models (eval/reference_models): they load with diffusers, draw the asked digit,
and ditcache runs on them with measurable quality."""

import json

import pytest
import torch
import yaml

from ditcache import FORAConfig, ToCaConfig, apply_cache, cache_stats, remove_cache
from ditcache.eval import digits, metrics, sweep


def test_digits_data_and_prompts():
    images, labels = digits.load_images()
    assert images.shape == (1797, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert sorted(labels.unique().tolist()) == list(range(10))
    test_images, _ = digits.split(images, labels, test=True)
    assert len(test_images) == 360
    assert digits.label_of("7") == 7 and digits.label_of("a handwritten digit Seven") == 7
    assert digits.label_of(digits.prompt(3, template=2)) == 3
    with pytest.raises(ValueError, match="names no single digit"):
        digits.label_of("a cat")


def test_reference_models_fit_the_size_budget_and_have_cards():
    files = [p for p in digits.REFERENCE_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 35 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")], "weights are stored as safetensors only"
    for name in ("digits-dit", "digits-flux", "digits-scenes"):
        folder = digits.reference_pipeline_path(name)
        assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 25 * 2**20, name
        card = (folder / "README.md").read_text()
        assert "final loss" in card and "python -m ditcache.eval.train_reference" in card and "minutes" in card


@pytest.fixture(scope="module")
def classifier():
    return digits.DigitClassifier.from_pretrained()


def test_classifier_reads_held_out_digits(classifier):
    images, labels = digits.split(*digits.load_images(), test=True)
    assert digits.accuracy(classifier, images, labels) >= 0.95


SAMPLES = 100  # ten of each digit, one batch


def _dit_images(pipe, labels):
    generator = torch.Generator().manual_seed(0)
    return pipe(class_labels=labels.tolist(), num_inference_steps=20, guidance_scale=3.0, generator=generator, output_type="pt").images


def _flux_images(pipe, labels):
    generator = torch.Generator().manual_seed(0)
    call = dict(digits.TEXT_MODEL_CALL, negative_prompt=[""] * len(labels))
    return pipe([digits.prompt(int(label)) for label in labels], generator=generator, output_type="pt", **call).images


# name: (generate, the method bars: (config, least PSNR in dB against uncached, least FLOPs speedup)).
# Bars sit a few dB under the measured values in eval/BENCHMARKS.md (100 samples, seed 0).
QUALITY_BARS = {  # bars 3 dB and ~0.15x under the measurements in eval/BENCHMARKS.md ("Test bars")
    "digits-dit": (_dit_images, [
        (ToCaConfig(cache_interval=3, cache_ratio=0.9, schedule="constant", score="v_norm"), 27.0, 2.3),
        (FORAConfig(cache_interval=3), 26.5, 2.6),
        (ToCaConfig(cache_interval=3, cache_ratio=0.9, schedule="constant", score="v_norm", forecast_order=1), 35.0, 2.3),
    ]),
    "digits-flux": (_flux_images, [
        (ToCaConfig(cache_interval=3, cache_ratio=0.9, schedule="constant", score="v_norm"), 34.0, 2.0),
        (FORAConfig(cache_interval=3), 34.0, 2.3),
        (ToCaConfig(cache_interval=3, cache_ratio=0.9, schedule="constant", score="v_norm", forecast_order=1), 32.0, 2.0),
    ]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", QUALITY_BARS)
def test_reference_models_draw_the_asked_digit_and_cache_with_quality(name, classifier):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(digits.reference_pipeline_path(name))
    pipe.set_progress_bar_config(disable=True)
    generate, bars = QUALITY_BARS[name]
    labels = torch.arange(SAMPLES) % 10
    with torch.no_grad():
        uncached, few = generate(pipe, labels), generate(pipe, labels[:10])
        cached = []
        for config, *_ in bars:
            apply_cache(pipe, config)
            cached.append((generate(pipe, labels), cache_stats(pipe).flops_speedup))
        remove_cache(pipe)
        torch.testing.assert_close(generate(pipe, labels[:10]), few, rtol=0, atol=0)  # removed: exactly the original model

    accuracy = digits.accuracy(classifier, uncached, labels)
    assert accuracy >= 0.9
    for (config, least_psnr, least_speedup), (images, speedup) in zip(bars, cached):
        psnr = float(metrics.psnr(images, uncached).mean())
        assert speedup >= least_speedup and least_psnr <= psnr < 60, (config, speedup, psnr)
        assert digits.accuracy(classifier, images, labels) >= accuracy - 0.03, config  # within 3 points


@pytest.mark.slow
def test_digits_quality_sweep_on_the_reference_dit(tmp_path):
    config = {
        "pipeline": str(digits.reference_pipeline_path("digits-dit")),
        "steps": 10, "guidance_scale": 3.0, "seeds": [0], "prompts": [str(i) for i in range(10)],
        "methods": ["toca:3:0.9:random"], "metrics": ["psnr", "digits_accuracy", "digits_fid"], "grid_prompts": 1,
        "plot_x": "flops_speedup",
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    rows = sweep.run(sweep.load_config(tmp_path / "sweep.yaml"), tmp_path / "out", "cpu", quiet=True)
    uncached, toca = rows
    assert uncached["digits_accuracy"] >= 0.8 and 0 <= toca["digits_accuracy"] <= 1
    assert uncached["digits_fid"] > 0 and toca["digits_fid"] > 0 and toca["psnr"] > 15
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == json.loads(json.dumps(rows))
