"""Scenes of several coloured digits with captions that name each one, and the judge that checks them.

A scene is a 64 x 64 RGB canvas whose four quadrants hold 2-4 of scikit-learn's handwritten digits, each
at a sampled size and position inside its quadrant, in one of five colours, on a dark plain or striped
background. The caption names every digit, its colour and its place, in reading order:
"a red 3 at the top left and a blue 7 at the bottom right". Scenes are made from a seed alone, so a
dataset is reproducible anywhere; evaluation scenes use only the held-out digits (``digits.split``).

The judge reads an image against its caption with no trained judge of the whole image: for each named
object, the named quadrant's brightest strokes are cut out to a square and read by the digits classifier
(``digits.DigitClassifier``), and their mean colour is matched to the palette. It reports per-object and
whole-prompt accuracy; ``cut_outs`` gives those cut-outs, whose Frechet distance in the classifier's
features to real scenes' is scenes-FID.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from . import digits

CANVAS = 64
QUADRANT = CANVAS // 2
PLACES = ("top left", "top right", "bottom left", "bottom right")  # reading order; quadrant (row, column)
COLOURS = {
    "red": (1.0, 0.15, 0.1),
    "green": (0.15, 0.9, 0.15),
    "blue": (0.2, 0.4, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "white": (1.0, 1.0, 1.0),
}
DIGIT_SIZES = (18, 28)  # side of a digit in pixels, inclusive range
WORDS = tuple(dict.fromkeys(("a", "at", "the", "and", *(word for place in PLACES for word in place.split()), *COLOURS, *map(str, range(10)))))
TEXT_TOKENS = 32
EVAL_SEED = 1_000_000  # evaluation scenes: seeds from here, with the held-out digits
_OBJECT = re.compile(r"an? (\w+) (\d) at the (top left|top right|bottom left|bottom right)")


@dataclass(frozen=True)
class SceneObject:
    digit: int
    colour: str
    place: str


def caption(objects: list[SceneObject]) -> str:
    """``"a red 3 at the top left, a green 1 at the top right and a blue 7 at the bottom right"``."""
    parts = [f"a {o.colour} {o.digit} at the {o.place}" for o in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def parse(text: str) -> list[SceneObject]:
    """The objects a caption names (the inverse of ``caption``)."""
    objects = [SceneObject(int(digit), colour, place) for colour, digit, place in _OBJECT.findall(text.lower())]
    if not objects or any(o.colour not in COLOURS for o in objects):
        raise ValueError(f"caption {text!r} names no '<colour> <digit> at the <place>' objects")
    return objects


def _background(generator: torch.Generator) -> torch.Tensor:
    """A dark canvas: plain, or with faint stripes at a sampled angle and period."""
    tint = torch.rand(3, generator=generator) * 0.15
    canvas = tint[:, None, None].expand(3, CANVAS, CANVAS).clone()
    if torch.rand((), generator=generator) < 0.5:
        angle, period = torch.rand((), generator=generator) * torch.pi, 4 + torch.rand((), generator=generator) * 8
        y, x = torch.meshgrid(torch.arange(CANVAS), torch.arange(CANVAS), indexing="ij")
        stripes = torch.sin((x * torch.cos(angle) + y * torch.sin(angle)) * 2 * torch.pi / period)
        canvas = canvas + 0.06 * stripes
    return canvas.clamp(0, 1)


def make_scene(seed: int, held_out: bool = False) -> tuple[torch.Tensor, list[SceneObject]]:
    """One scene ``(3, 64, 64)`` in [0, 1] and its objects, from ``seed`` alone; ``held_out`` draws the
    digits from the held-out fifth of scikit-learn's set."""
    images, labels = _digit_bank(held_out)
    generator = torch.Generator().manual_seed(seed)
    canvas = _background(generator)
    count = int(torch.randint(2, 5, (), generator=generator))
    quadrants = sorted(torch.randperm(4, generator=generator)[:count].tolist())
    colours = list(COLOURS)
    objects = []
    for quadrant in quadrants:
        index = int(torch.randint(len(images), (), generator=generator))
        size = int(torch.randint(DIGIT_SIZES[0], DIGIT_SIZES[1] + 1, (), generator=generator))
        top, left = (int(v) for v in torch.randint(0, QUADRANT - size + 1, (2,), generator=generator))
        colour = colours[int(torch.randint(len(colours), (), generator=generator))]
        stroke = nn.functional.interpolate(images[index][None, None], size=(size, size), mode="bilinear", align_corners=False)[0]
        row, column = divmod(quadrant, 2)
        y, x = row * QUADRANT + top, column * QUADRANT + left
        region = canvas[:, y : y + size, x : x + size]
        alpha = stroke.clamp(0, 1)
        canvas[:, y : y + size, x : x + size] = region * (1 - alpha) + torch.tensor(COLOURS[colour])[:, None, None] * alpha
        objects.append(SceneObject(int(labels[index]), colour, PLACES[quadrant]))
    return canvas, objects


def make_scenes(count: int, seed: int, held_out: bool = False) -> tuple[torch.Tensor, list[str]]:
    """``count`` scenes ``(count, 3, 64, 64)`` and their captions, scene ``i`` from seed ``seed + i``."""
    scenes = [make_scene(seed + i, held_out) for i in range(count)]
    return torch.stack([image for image, _ in scenes]), [caption(objects) for _, objects in scenes]


_BANKS: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}


def _digit_bank(held_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 x 8 digits (one channel, [0, 1]) of the training or the held-out split."""
    if held_out not in _BANKS:
        images, labels = digits.load_images(size=8)
        images, labels = digits.split(images[:, :1], labels, test=held_out)
        _BANKS[held_out] = (images[:, 0], labels)
    return _BANKS[held_out]


# -- the judge -----------------------------------------------------------------------------------------
def _quadrant(image: torch.Tensor, place: str) -> torch.Tensor:
    row, column = divmod(PLACES.index(place), 2)
    return image[:, row * QUADRANT : (row + 1) * QUADRANT, column * QUADRANT : (column + 1) * QUADRANT]


def cut_out(image: torch.Tensor, place: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The named quadrant's strokes as the classifier sees digits, white on black in a tight square
    ``(3, 32, 32)``, and their intensity-weighted mean colour ``(3,)``.

    Strokes are what stands out of the background: each pixel's brightest channel minus the quadrant's
    median, scaled so the strongest stroke is 1."""
    region = _quadrant(image.float().clamp(0, 1), place)
    brightness = region.max(dim=0).values
    strokes = (brightness - brightness.median()).clamp_min(0)
    strokes = strokes / strokes.max().clamp_min(1e-6)
    colour = (region * strokes).sum(dim=(1, 2)) / strokes.sum().clamp_min(1e-6)
    rows, columns = (strokes > 0.3).nonzero(as_tuple=True)
    if len(rows) == 0:
        return torch.zeros(3, digits.IMAGE_SIZE, digits.IMAGE_SIZE), colour
    top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(columns.min()), int(columns.max()) + 1
    side = max(bottom - top, right - left)
    square = torch.zeros(side, side)
    y, x = (side - (bottom - top)) // 2, (side - (right - left)) // 2
    square[y : y + bottom - top, x : x + right - left] = strokes[top:bottom, left:right]
    square = nn.functional.interpolate(square[None, None], size=(digits.IMAGE_SIZE, digits.IMAGE_SIZE), mode="bilinear",
                                       antialias=True, align_corners=False)[0]
    return square.expand(3, -1, -1), colour


def colour_name(colour: torch.Tensor) -> str:
    """The palette colour nearest to ``colour`` in brightness-normalised RGB."""
    unit = colour / colour.max().clamp_min(1e-6)
    palette = torch.tensor(list(COLOURS.values()))
    return list(COLOURS)[int((palette - unit).pow(2).sum(-1).argmin())]


@dataclass(frozen=True)
class Verdict:
    object_accuracy: float  # named objects with the right digit in the right colour at their place
    prompt_accuracy: float  # images with every named object right
    digit_accuracy: float  # named objects with the right digit (any colour)
    colour_accuracy: float  # named objects in the right colour (any digit)


@torch.no_grad()
def read(images: torch.Tensor, captions: list[str], classifier: digits.DigitClassifier | None = None) -> list[list[tuple[bool, bool]]]:
    """For each image, for each object its caption names: (right digit, right colour) at the named place."""
    classifier = classifier or digits.DigitClassifier.from_pretrained()
    wanted = [parse(text) for text in captions]
    squares, colours = [], []
    for image, objects in zip(images, wanted):
        for o in objects:
            square, colour = cut_out(image.cpu(), o.place)
            squares.append(square)
            colours.append(colour_name(colour))
    device = next(classifier.parameters()).device
    digits_read = iter(classifier(torch.stack(squares).to(device)).argmax(-1).tolist())
    colours_read = iter(colours)
    return [[(next(digits_read) == o.digit, next(colours_read) == o.colour) for o in objects] for objects in wanted]


def judge(images: torch.Tensor, captions: list[str], classifier: digits.DigitClassifier | None = None) -> Verdict:
    """Read ``images`` ``(n, 3, 64, 64)`` in [0, 1] against their captions."""
    readings = read(images, captions, classifier)
    flat = [pair for objects in readings for pair in objects]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return Verdict(mean([d and c for d, c in flat]), mean([all(d and c for d, c in objects) for objects in readings]),
                   mean([d for d, _ in flat]), mean([c for _, c in flat]))


def cut_outs(images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Every named object's cut-out ``(objects, 3, 32, 32)`` in [0, 1]: scenes-FID's inputs (through the
    classifier's features, ``digits.DigitFeatures``)."""
    return torch.stack([cut_out(image, o.place)[0] for image, text in zip(images, captions) for o in parse(text)])
