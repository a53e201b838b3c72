"""Image metrics in the project's environment: FID and KID, CLIP score, and fidelity (PSNR, SSIM, LPIPS).

Input format everywhere: images as a ``(N, 3, H, W)`` tensor, float in ``[0, 1]`` (uint8 in ``[0, 255]`` is
accepted too), and for the text metrics one prompt per image. Weights are found through
:mod:`ditcache.eval.weights`, never downloaded here, and loaded with ``weights_only=True``, also those that
torchmetrics and torch-fidelity would unpickle in full.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import nn

from .weights import load_checkpoint, require_weights


def as_float(images: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` float in [0, 1], whatever the input's dtype."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W); got shape {tuple(images.shape)}")
    return images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` uint8, rounding float images the way PIL export does."""
    return images if images.dtype == torch.uint8 else (as_float(images) * 255).round().to(torch.uint8)


# -- distribution metrics --------------------------------------------------------------------------
class InceptionFeatures(nn.Module):
    """torchmetrics' Inception-v3 features of float images in [0, 1], from weights loaded with ``weights_only=True``.

    torch-fidelity, which builds the network, unpickles its weights file in full (``weights_only=False``), and
    torchmetrics' KID takes no weights file at all (it downloads or reads the torch hub cache the same way): a
    pickle planted where the weights are looked up would run its code. Here the file is loaded safely and
    torch-fidelity reads back only those tensors, serialized again in memory. Images are quantised with
    ``(images * 255).byte()`` as torchmetrics does for its own Inception, so FID and KID given this module as
    ``feature`` compute what they compute with ``feature=<int>`` and the same weights.

    Args:
        feature: the feature layer, 64, 192, 768 or 2048.
        weights_path: explicit path of the Inception weights (else found as ``inception``).
    """

    def __init__(self, feature: int = 2048, weights_path: str | os.PathLike | None = None):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        serialized = io.BytesIO()
        torch.save(load_checkpoint(require_weights("inception", weights_path)), serialized)
        serialized.seek(0)
        self.inception = NoTrainInceptionV3("inception-v3-compat", [str(feature)], feature_extractor_weights_path=serialized)
        self.num_features = feature  # read by FID instead of running a dummy image

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inception((images * 255).byte())


def feature_distances(
    images: torch.Tensor,
    references: torch.Tensor,
    feature: int | nn.Module = 2048,
    weights_path: str | os.PathLike | None = None,
    kid_subset_size: int = 1000,
    batch_size: int = 64,
) -> dict[str, float]:
    """FID and KID between two image sets, through torchmetrics.

    Args:
        images, references: the generated and the reference images (any counts; KID's subsets are
            capped at the smaller one).
        feature: an Inception-v3 feature layer (64, 192, 768 or 2048, weights found as ``inception``) or
            any ``nn.Module`` that maps float images in [0, 1] to ``(N, d)`` features; results computed
            with a custom module must not be called FID without saying which features.
        weights_path: explicit path of the Inception weights (see :class:`InceptionFeatures`).
        kid_subset_size: KID's subset size (torchmetrics' default 1000).

    Returns:
        ``{"fid", "kid_mean", "kid_std"}``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if isinstance(feature, int):
        feature = InceptionFeatures(feature, weights_path)  # one network, safely loaded, for both metrics
    subset = min(kid_subset_size, len(images), len(references))
    # The whole sets are on this process (a sweep's main process): no gathering from other ranks
    fid = FrechetInceptionDistance(feature=feature, normalize=True, sync_on_compute=False)
    kid = KernelInceptionDistance(feature=feature, normalize=True, subset_size=subset, sync_on_compute=False)
    for metric in (fid, kid):
        metric.eval()
        with torch.no_grad():
            for start in range(0, len(references), batch_size):
                metric.update(as_float(references[start : start + batch_size]), real=True)
            for start in range(0, len(images), batch_size):
                metric.update(as_float(images[start : start + batch_size]), real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


# -- CLIP score ------------------------------------------------------------------------------------
def _embedding(output) -> torch.Tensor:
    """transformers 5 returns an output object whose ``pooler_output`` is the projected embedding;
    earlier versions return the tensor itself (the difference that breaks torchmetrics 1.9)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPScorer:
    """CLIP score as torchmetrics defines it, ``max(100 * cos(E_I, E_C), 0)`` averaged, on any
    transformers version.

    Images go through the CLIP processor as uint8, as torchmetrics passes them, and captions are cut at
    the text model's maximum length.
    """

    def __init__(self, model: nn.Module, processor):
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> "CLIPScorer":
        """CLIP from a local folder (default: ``openai/clip-vit-large-patch14`` in the caches)."""
        from transformers import CLIPModel, CLIPProcessor

        folder = require_weights("clip-vit-large-patch14", path)
        return cls(CLIPModel.from_pretrained(folder).to(device), CLIPProcessor.from_pretrained(folder))

    @torch.no_grad()
    def cosines(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``100 * cos`` per image, unclamped, shape ``(N,)``."""
        if len(prompts) != len(images):
            raise ValueError(f"one prompt per image: got {len(prompts)} prompts for {len(images)} images")
        device = next(self.model.parameters()).device
        pixels = self.processor(images=list(as_uint8(images).cpu()), return_tensors="pt")["pixel_values"]
        max_length = self.model.config.text_config.max_position_embeddings
        text = self.processor(text=prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        image_embeds = _embedding(self.model.get_image_features(pixel_values=pixels.to(device)))
        text_embeds = _embedding(
            self.model.get_text_features(input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device))
        )
        cos = nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
        return 100 * cos.cpu()

    @staticmethod
    def aggregate(cosines: torch.Tensor) -> float:
        """torchmetrics' reduction: the mean of ``100 * cos``, clamped at 0."""
        return max(float(cosines.mean()), 0.0)


# -- fidelity against the uncached output ----------------------------------------------------------
def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image pair, ``(N,)``, on [0, 1] images."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(as_float(images), as_float(references), data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """SSIM per image pair, ``(N,)`` (Gaussian window 11, sigma 1.5)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(as_float(images), as_float(references), data_range=1.0, reduction="none")


class LPIPS(nn.Module):
    """LPIPS (AlexNet) with torchmetrics' linear heads and the AlexNet weights from a local file.

    torchmetrics would fetch the AlexNet weights itself; here they come from ``weights_path``, the
    ``DITCACHE_LPIPS_WEIGHTS`` variable or the torch hub cache. Both they and the heads, which torchmetrics
    would load with torch's default ``weights_only`` (False before torch 2.6), load with ``weights_only=True``.
    ``random_backbone=True`` keeps a random backbone (tests only).
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, random_backbone: bool = False):
        super().__init__()
        from torchmetrics.functional.image import lpips

        self.lpips = lpips._LPIPS(pretrained=False, net="alex", pnet_rand=True).eval()
        # the file holds only the heads (`lin{k}.model.1.weight`), hence strict=False, as in torchmetrics
        self.lpips.load_state_dict(load_checkpoint(Path(lpips.__file__).with_name("lpips_models") / "alex.pth"), strict=False)
        if not random_backbone:
            state = load_checkpoint(require_weights("lpips-alexnet", weights_path))
            # torchmetrics splits AlexNet's `features.{i}` into slices that keep the index: `slice{k}.{i}`.
            backbone = self.lpips.net
            backbone.load_state_dict({key: state["features." + key.split(".", 1)[1]] for key in backbone.state_dict()})

    @torch.no_grad()
    def forward(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """LPIPS per image pair, ``(N,)``; 0 for identical images."""
        return self.lpips(as_float(images), as_float(references), normalize=True).flatten()
