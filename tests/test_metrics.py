"""FID/KID, CLIP score and fidelity metrics: closed forms, torchmetrics' formula, weights handling."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from ditcache.eval import builders, metrics, weights


class LogitFeatures(nn.Module):
    """Reads back the Gaussian features that :func:`encode` wrote into the pixels."""

    num_features = 6

    def forward(self, images):
        return torch.logit(images.flatten(1)[:, : self.num_features].double(), eps=1e-12)


def encode(features: torch.Tensor) -> torch.Tensor:
    """Features as images in (0, 1): the first pixels hold sigmoid(feature)."""
    images = torch.full((len(features), 3, 4, 4), 0.5, dtype=torch.float64)
    images.view(len(features), -1)[:, : features.shape[1]] = torch.sigmoid(features.double())
    return images


def closed_form_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def unbiased_polynomial_mmd(a: np.ndarray, b: np.ndarray) -> float:
    d, n = a.shape[1], len(a)
    kernel = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    k_aa, k_bb, k_ab = kernel(a, a), kernel(b, b), kernel(a, b)
    off = lambda k: (k.sum() - np.trace(k)) / (n * (n - 1))  # noqa: E731
    return float(off(k_aa) + off(k_bb) - 2 * k_ab.mean())


def test_fid_and_kid_equal_their_closed_forms_on_gaussian_features():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(400, 6, generator=generator, dtype=torch.float64)
    shifted = torch.randn(400, 6, generator=generator, dtype=torch.float64) * 1.3 + torch.tensor([1.0, 0, 0, 0, 0, 0.5])
    result = metrics.feature_distances(encode(shifted), encode(real), feature=LogitFeatures(), kid_subset_size=400)

    assert result["fid"] == pytest.approx(closed_form_fid(shifted.numpy(), real.numpy()), rel=1e-3)
    # Two independent samples of N(m, 1.69 I) and N(0, I): the population FID is |m|^2 + 6 (1.3 - 1)^2.
    assert result["fid"] == pytest.approx(1.25 + 6 * 0.09, abs=0.3)
    # One subset of all samples: KID is the unbiased polynomial-kernel MMD^2 itself, with no spread.
    assert result["kid_mean"] == pytest.approx(unbiased_polynomial_mmd(shifted.numpy(), real.numpy()), rel=1e-3)
    assert result["kid_std"] == pytest.approx(0.0, abs=1e-9)


def test_fid_of_a_set_against_itself_is_zero_and_a_shift_is_seen():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(64, 3, 4, 4, generator=generator, dtype=torch.float64) * 0.8 + 0.1
    same = metrics.feature_distances(images, images, feature=LogitFeatures(), kid_subset_size=32)
    moved = metrics.feature_distances((images + 0.05).clamp(0, 1), images, feature=LogitFeatures(), kid_subset_size=32)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert moved["fid"] > 0.01 and moved["kid_mean"] > same["kid_mean"]


def test_inception_fid_without_weights_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("DITCACHE_INCEPTION_WEIGHTS", str(tmp_path / "absent.pth"))
    with pytest.raises(weights.MissingWeightsError, match="absent.pth.*weights-inception-2015-12-05"):
        metrics.feature_distances(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))


@pytest.fixture(scope="module")
def clip_scorer(tmp_path_factory):
    return metrics.CLIPScorer.from_pretrained(builders.clip_model(tmp_path_factory.mktemp("clip")))


def test_clip_score_equals_torchmetrics_formula(clip_scorer):
    from torchmetrics.multimodal.clip_score import CLIPScore

    class TensorFeatures(nn.Module):
        """The transformers-4 interface torchmetrics 1.9 expects: features as tensors."""

        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            return self.model.get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return self.model.get_text_features(*args, **kwargs).pooler_output

    images = torch.randint(0, 256, (3, 3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    prompts = ["a red fox in snow", "a cat", "an astronaut riding a horse"]
    reference = CLIPScore(model_name_or_path=lambda: (TensorFeatures(clip_scorer.model), clip_scorer.processor))
    reference.update(images, prompts)

    cosines = clip_scorer.cosines(images.float() / 255, prompts)
    assert cosines.shape == (3,)
    assert clip_scorer.aggregate(cosines) == pytest.approx(float(reference.compute()), abs=1e-4)
    # Per image: 100 * cos of the two normalised embeddings.
    with torch.no_grad():
        pixels = clip_scorer.processor(images=list(images), return_tensors="pt")["pixel_values"]
        text = clip_scorer.processor(text=prompts[:1], return_tensors="pt", padding=True)
        image_embed = clip_scorer.model.get_image_features(pixel_values=pixels[:1]).pooler_output
        text_embed = clip_scorer.model.get_text_features(**text).pooler_output
    expected = 100 * (image_embed / image_embed.norm()) @ (text_embed / text_embed.norm()).T
    assert float(cosines[0]) == pytest.approx(float(expected), abs=1e-4)


def test_clip_score_aggregate_is_clamped_at_zero():
    assert metrics.CLIPScorer.aggregate(torch.tensor([-30.0, 10.0])) == 0.0
    assert metrics.CLIPScorer.aggregate(torch.tensor([30.0, 10.0])) == pytest.approx(20.0)


def test_clip_score_needs_one_prompt_per_image(clip_scorer):
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_scorer.cosines(torch.rand(2, 3, 32, 32), ["only one"])


def test_psnr_and_ssim_per_image():
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(2, 3, 32, 32, generator=generator)
    noisy = (reference + 0.05 * torch.randn(reference.shape, generator=generator)).clamp(0, 1)
    mse = ((noisy - reference) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(metrics.psnr(noisy, reference), 10 * torch.log10(1 / mse))
    assert torch.allclose(metrics.ssim(reference, reference), torch.ones(2))
    assert (metrics.ssim(noisy, reference) < 0.99).all()
    # uint8 and float inputs agree.
    torch.testing.assert_close(metrics.psnr(metrics.as_uint8(noisy), metrics.as_uint8(reference)),
                               metrics.psnr(metrics.as_uint8(noisy).float() / 255, metrics.as_uint8(reference).float() / 255))


def test_lpips_loads_the_alexnet_file_it_is_given(tmp_path):
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.alexnet(weights=None).state_dict()
    torch.save(state, tmp_path / "alexnet.pth")
    lpips = metrics.LPIPS(tmp_path / "alexnet.pth")
    torch.testing.assert_close(getattr(lpips.lpips.net.slice2, "3").weight, state["features.3.weight"])
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lpips(images, images), torch.zeros(2), atol=1e-6)
    assert (lpips(images, images.flip(-1)) > 0).all()


def test_lpips_without_weights_says_where_to_put_them(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(weights.MissingWeightsError, match="alexnet-owt-7be5be79.pth"):
        metrics.LPIPS()


def test_weights_are_found_from_env_and_hub_cache_and_never_downloaded(monkeypatch, tmp_path):
    from huggingface_hub import constants

    file = tmp_path / "inception.pth"
    file.write_bytes(b"")
    monkeypatch.setenv("DITCACHE_INCEPTION_WEIGHTS", str(file))
    assert weights.require_weights("inception") == file
    with pytest.raises(weights.MissingWeightsError, match="other.pth does not exist"):
        weights.require_weights("inception", tmp_path / "other.pth")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert weights.find_weights("dino-vitb16") is None
    repo = tmp_path / "hub" / "models--facebook--dino-vitb16"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abc")
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    (repo / "snapshots" / "0123abc" / "config.json").write_text("{}")
    assert weights.find_weights("dino-vitb16") == repo / "snapshots" / "0123abc"
    listed = dict((spec.name, path) for spec, path in weights.check())
    assert listed["inception"] == file and listed["dino-vitb16"] == repo / "snapshots" / "0123abc"
    assert listed["clip-vit-large-patch14"] is None


def test_eval_check_command_lists_missing_weights(tmp_path):
    import os
    import subprocess
    import sys

    env = os.environ | {"HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub"),
                        "DITCACHE_LPIPS_WEIGHTS": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "ditcache", "eval", "check"], env=env, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr  # weights are missing
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "MISSING" in lines["inception"] and str(tmp_path / "hub" / "checkpoints") in lines["inception"]
    assert lines["lpips-alexnet"].rstrip().endswith(str(tmp_path))
    assert "6 of 7 missing" in result.stdout
