"""The committed reference models (eval/reference_models): they load with diffusers, draw the asked digit,
and ditcache runs on them with measurable quality."""

import json

import pytest
import torch
import yaml

from ditcache import FORAConfig, ToCaConfig, apply_cache, remove_cache
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
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")], "weights are stored as safetensors only"
    for name in ("digits-dit", "digits-pixart"):
        card = (digits.reference_pipeline_path(name) / "README.md").read_text()
        assert "final loss" in card and "python -m ditcache.eval.train_reference" in card


@pytest.fixture(scope="module")
def classifier():
    return digits.DigitClassifier.from_pretrained()


def test_classifier_reads_held_out_digits(classifier):
    images, labels = digits.split(*digits.load_images(), test=True)
    assert digits.accuracy(classifier, images, labels) >= 0.95


def _dit_images(pipe, seed=0, steps=20):
    generator = torch.Generator().manual_seed(seed)
    return pipe(class_labels=list(range(10)), num_inference_steps=steps, guidance_scale=3.0, generator=generator, output_type="pt").images


def _pixart_images(pipe, seed=0, steps=20):
    generator = torch.Generator().manual_seed(seed)
    prompts = [digits.prompt(label) for label in range(10)]
    images = pipe(prompts, height=32, width=32, num_inference_steps=steps, guidance_scale=3.0, generator=generator,
                  use_resolution_binning=False, max_sequence_length=16, clean_caption=False, output_type="pt").images
    return images


@pytest.mark.parametrize("name", ["digits-dit", "digits-pixart"])
def test_reference_models_draw_the_asked_digit_and_cache_with_quality(name, classifier):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(digits.reference_pipeline_path(name))
    pipe.set_progress_bar_config(disable=True)
    generate = _dit_images if name == "digits-dit" else _pixart_images
    labels = torch.arange(10)
    with torch.no_grad():
        uncached = generate(pipe)
        if name == "digits-dit":  # the PixArt reference does not follow its prompts yet (see its model card)
            assert digits.accuracy(classifier, uncached, labels) >= 0.8

        apply_cache(pipe, ToCaConfig(cache_interval=3, cache_ratio=0.9, schedule="constant", score="random"))
        toca = generate(pipe)
        apply_cache(pipe, FORAConfig(cache_interval=3))
        fora = generate(pipe)
        remove_cache(pipe)
        torch.testing.assert_close(generate(pipe), uncached, rtol=0, atol=0)  # removed: exactly the original model

    toca_psnr, fora_psnr = float(metrics.psnr(toca, uncached).mean()), float(metrics.psnr(fora, uncached).mean())
    # A trained model's features drift between steps: caching costs fidelity, but the digits stay readable.
    assert 15 < toca_psnr < 60 and 10 < fora_psnr < 60
    if name == "digits-dit":
        assert digits.accuracy(classifier, toca, labels) >= 0.7


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
