"""The handwritten-digits world of ditcache's reference models: data, prompts, the classifier that judges
generated digits, and where the trained models live.

Data: scikit-learn's 1797 labelled 8 x 8 digits (bundled with the package, no download), scaled to [0, 1]
and upsampled to 32 x 32 RGB (white strokes on black). Every fifth image is held out as the test set.
The classifier gives the conditional accuracy of generated digits and, from its penultimate layer, the
features of **digits-FID** (a Fréchet distance in this classifier's feature space: comparable between
methods on these models, never to Inception FID).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

IMAGE_SIZE = 32
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_TEMPLATES = ("a handwritten digit {word}", "the digit {word}", "a handwritten {word}", "the number {word}")
REFERENCE_DIR = Path(__file__).parent / "reference_models"
TEXT_MODEL = "digits-flux"  # the text-conditional reference; "digits-dit" is the class-conditional one
TEXT_MODEL_CALL = {  # how the text-conditional reference is called (true classifier-free guidance)
    "negative_prompt": "", "true_cfg_scale": 3.0, "height": IMAGE_SIZE, "width": IMAGE_SIZE, "max_sequence_length": 16,
    "num_inference_steps": 20,
}


def load_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as ``(1797, 3, size, size)`` float in [0, 1] and their labels ``(1797,)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
    images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1).expand(-1, 3, -1, -1).contiguous(), torch.tensor(digits.target)


def split(images: torch.Tensor, labels: torch.Tensor, test: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every fifth image is the test set; the rest train."""
    mask = (torch.arange(len(images)) % 5 == 0) == test
    return images[mask], labels[mask]


def prompt(label: int, template: int = 0) -> str:
    return PROMPT_TEMPLATES[template % len(PROMPT_TEMPLATES)].format(word=DIGIT_WORDS[label])


def label_of(text: str) -> int:
    """The digit a prompt asks for: a class index (``"7"``, as DiT takes it) or a digit word."""
    if text.strip().isdigit():
        return int(text)
    words = [w for w in re.findall(r"[a-z]+", text.lower()) if w in DIGIT_WORDS]
    if len(words) != 1:
        raise ValueError(f"prompt {text!r} names no single digit (zero ... nine)")
    return DIGIT_WORDS.index(words[0])


class DigitClassifier(nn.Module):
    """A small CNN: float images in [0, 1] (any size, resized to 32) to 10 logits; ``features`` gives the
    64-dimensional penultimate activations used by digits-FID."""

    num_features = 64

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, self.num_features, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(self.num_features, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = nn.functional.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @classmethod
    def from_pretrained(cls, path: str | Path = REFERENCE_DIR / "digits-classifier.safetensors") -> "DigitClassifier":
        from safetensors.torch import load_model

        model = cls()
        load_model(model, str(path))
        return model.eval()


class DigitFeatures(nn.Module):
    """The classifier's features as a torchmetrics FID feature extractor (float images in [0, 1])."""

    def __init__(self, classifier: DigitClassifier | None = None):
        super().__init__()
        self.classifier = classifier or DigitClassifier.from_pretrained()
        self.num_features = DigitClassifier.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images).double()


@torch.no_grad()
def accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images the classifier reads as their label."""
    return float((classifier(images).argmax(-1) == labels).float().mean())


def reference_pipeline_path(name: str) -> Path:
    """Folder of a committed reference pipeline: ``digits-dit``, ``digits-flux`` or ``digits-scenes``."""
    path = REFERENCE_DIR / name
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"no reference model {name!r} in {REFERENCE_DIR}; train it with python -m ditcache.eval.train_reference")
    return path
