"""VBench's temporal flickering, subject consistency and background consistency, computed natively on
video tensors, plus an adapter that runs the official ``vbench`` package on video files.

The formulas, preprocessing and aggregation follow the official VBench 0.1.5 (Vchitect/VBench; the
files named below are identical at v0.1.5 and on master in 2026):

* ``vbench/temporal_flickering.py``: every frame of the video, the mean absolute difference of
  consecutive uint8 frames (over pixels and channels), averaged over the frame pairs; the video
  scores ``(255 - mae) / 255``. The dimension's score is the mean over videos.
* ``vbench/subject_consistency.py``: DINO ViT-B/16 features of each frame, L2-normalised; frame
  ``i >= 1`` scores the mean of its cosine similarity to the previous and to the first frame, each
  clamped at 0; the video scores the mean over its ``T - 1`` frames.
* ``vbench/background_consistency.py``: the same formula on CLIP ViT-B/32 image features.
* ``vbench/utils.py``: ``dino_transform(224)`` resizes the shorter side to 224 (bilinear,
  ``antialias=False``, aspect kept, no crop) on the uint8 frames, then divides by 255 and normalises
  with the ImageNet mean and std; ``clip_transform(224)`` resizes the same way but bicubic, takes the
  central 224 x 224 and normalises with CLIP's mean and std.

The two consistency dimensions are aggregated by VBench as the sum of all frames' scores over the
number of frames scored, so for videos of one length (a tensor batch) their score is the mean of the
per-video scores returned here, as for temporal flickering.

Where ditcache differs:

* Videos are tensors, not decoded MP4 files: VBench sees the video after a lossy codec, so the
  scores of the same video saved and read back differ slightly.
* VBench evaluates temporal flickering only on videos that its ``static_filter.py`` (RAFT optical
  flow) finds static; here the caller chooses the videos.
* VBench runs DINO one frame at a time; here a video's frames go through the model as one batch,
  which changes the features only by float rounding.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .weights import require_weights

VBENCH_INPUT_SIZE = 224  # the n_px VBench passes to dino_transform and clip_transform
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
DINO_LAYER_NORM_EPS = 1e-6  # DINO's ViT; the converted facebook/dino-vitb16 config says 1e-12
# dimensions that VBench refuses in custom_input mode: they need the prompts' auxiliary information
CUSTOM_INPUT_UNSUPPORTED = (
    "object_class",
    "multiple_objects",
    "scene",
    "appearance_style",
    "color",
    "spatial_relationship",
)


def _uint8_videos(videos: torch.Tensor) -> torch.Tensor:
    """Checks the (N, T, 3, H, W) layout and returns uint8 frames, the values VBench works on.

    Float videos in [0, 1] are rounded to ``round(255 * x)``; uint8 videos are used as they are.
    """
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must have shape (N, T, 3, H, W), got {tuple(videos.shape)}")
    if videos.shape[1] < 2:
        raise ValueError("VBench's temporal dimensions compare frames: videos need at least 2 frames")
    if videos.dtype == torch.uint8:
        return videos
    if not videos.is_floating_point():
        raise ValueError(f"videos must be float in [0, 1] or uint8, got {videos.dtype}")
    return (videos.clamp(0, 1) * 255).round().to(torch.uint8)


def temporal_flickering(videos: torch.Tensor) -> torch.Tensor:
    """VBench's temporal flickering of each video: 1 for a still video, lower the more frames change.

    Args:
        videos: (N, T, 3, H, W), float in [0, 1] or uint8.

    Returns:
        (N,) float64 scores in [0, 1]. VBench's dimension score is their mean, over static videos only.
    """
    scores = []
    for frames in _uint8_videos(videos):
        differences = (frames[1:].to(torch.int16) - frames[:-1].to(torch.int16)).abs()
        mae_per_pair = differences.flatten(1).mean(dim=1, dtype=torch.float64)
        scores.append((255.0 - mae_per_pair.mean()) / 255.0)
    return torch.stack(scores).cpu()


def _first_and_previous_similarity(features: torch.Tensor) -> torch.Tensor:
    """VBench's consistency of one video from its (T, D) frame features.

    Normalising and comparing stay in the features' dtype (VBench's CLIP features are float16 on CUDA);
    only the average is taken in float64, as VBench sums Python floats.
    """
    features = F.normalize(features, dim=-1, p=2)
    to_previous = F.cosine_similarity(features[:-1], features[1:], dim=-1).clamp(min=0)
    to_first = F.cosine_similarity(features[:1], features[1:], dim=-1).clamp(min=0)
    return ((to_previous.double() + to_first.double()) / 2).mean()


def _consistency_scores(features_of, videos: torch.Tensor) -> torch.Tensor:
    """(N,) float64 scores of (N, T, 3, H, W) videos, given a map from one video's uint8 frames to features."""
    return torch.stack([_first_and_previous_similarity(features_of(frames)) for frames in _uint8_videos(videos)]).cpu()


def _resize_shorter_side(frames: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """torchvision's ``Resize(size, antialias=False)`` on uint8 frames, as VBench's transforms apply it.

    torchvision computes the longer side as ``int(size * long / short)``, interpolates in float32,
    clamps, rounds and casts back to uint8, and returns the frames untouched when the size is unchanged.
    """
    height, width = frames.shape[-2:]
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_height, new_width = (new_long, size) if width <= height else (size, new_long)
    if (new_height, new_width) == (height, width):
        return frames
    resized = F.interpolate(
        frames.float(), size=(new_height, new_width), mode=mode, align_corners=False, antialias=False
    )
    return resized.clamp(0, 255).round().to(torch.uint8)


def _normalise(frames: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 frames to the float input of a model, in the order of VBench's transforms."""
    mean_tensor = torch.tensor(mean, device=frames.device).view(3, 1, 1)
    std_tensor = torch.tensor(std, device=frames.device).view(3, 1, 1)
    return frames.float().div(255.0).sub(mean_tensor).div(std_tensor)


def dino_pixels(frames: torch.Tensor) -> torch.Tensor:
    """VBench's ``dino_transform(224)`` of (T, 3, H, W) uint8 frames: the whole frame, shorter side 224."""
    return _normalise(_resize_shorter_side(frames, VBENCH_INPUT_SIZE, "bilinear"), IMAGENET_MEAN, IMAGENET_STD)


def clip_pixels(frames: torch.Tensor) -> torch.Tensor:
    """VBench's ``clip_transform(224)`` of (T, 3, H, W) uint8 frames: the central 224 x 224 of a bicubic resize."""
    resized = _resize_shorter_side(frames, VBENCH_INPUT_SIZE, "bicubic")
    height, width = resized.shape[-2:]
    top = round((height - VBENCH_INPUT_SIZE) / 2.0)  # torchvision's CenterCrop, Python's rounding
    left = round((width - VBENCH_INPUT_SIZE) / 2.0)
    cropped = resized[..., top : top + VBENCH_INPUT_SIZE, left : left + VBENCH_INPUT_SIZE]
    return _normalise(cropped, CLIP_MEAN, CLIP_STD)


def _default_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def dino_position_embeddings(
    position_embeddings: torch.Tensor, patch_size: int, height: int, width: int
) -> torch.Tensor:
    """DINO's ``interpolate_pos_encoding`` for a ``height`` x ``width`` input.

    DINO keeps the embeddings for square inputs of the trained grid; otherwise it resamples the grid
    bicubically with ``scale_factor = (patches + 0.1) / grid``, not to the target size as transformers'
    ViT does, which gives slightly different embeddings for the non-square frames VBench feeds it.
    """
    patches = position_embeddings.shape[1] - 1
    if (height // patch_size) * (width // patch_size) == patches and height == width:
        return position_embeddings
    grid = math.sqrt(patches)
    side, dim = int(grid), position_embeddings.shape[-1]
    patch_grid = position_embeddings[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    rows, columns = height // patch_size + 0.1, width // patch_size + 0.1
    patch_grid = F.interpolate(patch_grid, scale_factor=(rows / grid, columns / grid), mode="bicubic")
    return torch.cat((position_embeddings[:, :1], patch_grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


@contextmanager
def _dino_position_interpolation(model):
    """Makes a transformers ViT interpolate its position embeddings as DINO does, for the duration."""
    embeddings = model.embeddings
    embeddings.interpolate_pos_encoding = lambda tokens, height, width: dino_position_embeddings(
        embeddings.position_embeddings, model.config.patch_size, height, width
    )
    try:
        yield
    finally:
        del embeddings.interpolate_pos_encoding


def load_dino_vitb16(path: str | os.PathLike | None = None, device: str | torch.device | None = None):
    """DINO ViT-B/16 as a transformers ``ViTModel`` (``facebook/dino-vitb16`` or a folder in that format).

    Without a pooler, since DINO's features are the CLS token, and with DINO's LayerNorm epsilon.
    """
    from transformers import ViTModel

    model = ViTModel.from_pretrained(
        require_weights("dino-vitb16", path), add_pooling_layer=False, layer_norm_eps=DINO_LAYER_NORM_EPS
    )
    return model.eval().to(_default_device(device))


class SubjectConsistency:
    """VBench's subject consistency: DINO features of each frame against the first and the previous frame.

    VBench loads ``torch.hub.load("facebookresearch/dino:main", "dino_vitb16")``, whose forward returns
    the CLS token after the final LayerNorm. transformers' ``facebook/dino-vitb16`` holds the same
    weights (converted from that hub model), and ``ViTModel.last_hidden_state[:, 0]`` is the same CLS
    token after the same final LayerNorm; DINO's epsilon (:data:`DINO_LAYER_NORM_EPS`) and its
    position-embedding interpolation are restored here, so the features match up to float rounding.

    Args:
        model: a transformers ``ViTModel``, or a folder to load one from; None finds the
            ``dino-vitb16`` weights (:func:`ditcache.eval.weights.require_weights`).
        device: where a loaded model runs (CUDA when available); a given model stays where it is.
    """

    def __init__(self, model=None, device: str | torch.device | None = None):
        self.model = model if isinstance(model, torch.nn.Module) else load_dino_vitb16(model, device)

    @torch.no_grad()
    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """(T, D) DINO features of (T, 3, H, W) uint8 frames."""
        parameter = next(self.model.parameters())
        pixels = dino_pixels(frames.to(parameter.device)).to(parameter.dtype)
        with _dino_position_interpolation(self.model):
            output = self.model(pixel_values=pixels, interpolate_pos_encoding=True)
        return output.last_hidden_state[:, 0]

    def __call__(self, videos: torch.Tensor) -> torch.Tensor:
        """(N,) float64 scores in [0, 1] of (N, T, 3, H, W) videos, float in [0, 1] or uint8."""
        return _consistency_scores(self.features, videos)


def load_clip_vitb32(
    path: str | os.PathLike | None = None, device: str | torch.device | None = None, dtype: torch.dtype | None = None
):
    """CLIP ViT-B/32's image tower and projection, from ``openai/clip-vit-base-patch32`` or a folder.

    ``dtype`` defaults to what VBench's ``clip.load`` gives: float16 on CUDA, float32 on the CPU.
    """
    from transformers import AutoConfig, CLIPConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging as transformers_logging

    folder = require_weights("clip-vit-base-patch32", path)
    config = AutoConfig.from_pretrained(folder)
    if isinstance(config, CLIPConfig):  # a full CLIP checkpoint: the projection size lives at the top level
        config.vision_config.projection_dim = config.projection_dim
        config = config.vision_config
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the text tower's weights are skipped on purpose
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(folder, config=config)
    finally:
        transformers_logging.set_verbosity(verbosity)
    device = _default_device(device)
    return model.eval().to(device=device, dtype=dtype or (torch.float16 if device.type == "cuda" else torch.float32))


class BackgroundConsistency:
    """VBench's background consistency: CLIP ViT-B/32 image features against the first and the previous frame.

    VBench uses OpenAI's ``clip`` package, whose ``encode_image`` projects the final-LayerNorm CLS
    token; transformers' ``CLIPVisionModelWithProjection.image_embeds`` and
    ``CLIPModel.get_image_features`` compute the same from the same weights. ``clip.load`` casts the
    model to float16 on CUDA, and so does :func:`load_clip_vitb32` by default.

    Args:
        model: a transformers ``CLIPVisionModelWithProjection`` or ``CLIPModel``, or a folder to load one
            from; None finds the ``clip-vit-base-patch32`` weights.
        device: where a loaded model runs (CUDA when available); a given model stays where it is.
        dtype: of a loaded model; see :func:`load_clip_vitb32`.
    """

    def __init__(self, model=None, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.model = model if isinstance(model, torch.nn.Module) else load_clip_vitb32(model, device, dtype)

    @torch.no_grad()
    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """(T, D) projected CLIP image features of (T, 3, H, W) uint8 frames."""
        parameter = next(self.model.parameters())
        pixels = clip_pixels(frames.to(parameter.device)).to(parameter.dtype)
        if hasattr(self.model, "get_image_features"):
            output = self.model.get_image_features(pixel_values=pixels)
            # transformers 5 returns an output object whose pooler_output is the projection, 4.x a tensor
            return output if isinstance(output, torch.Tensor) else output.pooler_output
        return self.model(pixel_values=pixels).image_embeds

    def __call__(self, videos: torch.Tensor) -> torch.Tensor:
        """(N,) float64 scores in [0, 1] of (N, T, 3, H, W) videos, float in [0, 1] or uint8."""
        return _consistency_scores(self.features, videos)


class OfficialScore(NamedTuple):
    """One dimension's result from the official VBench: its aggregate score and each video's score."""

    score: float
    per_video: dict[str, float]


_VBENCH_MISSING = 3
# Runs in the interpreter that has vbench, which may not have ditcache.
_OFFICIAL_RUNNER = f"""
import importlib.util, json, os, sys
if importlib.util.find_spec("vbench") is None:
    sys.exit({_VBENCH_MISSING})
import vbench
args = json.loads(sys.argv[1])
full_info = os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")  # unread in custom_input mode
vbench.VBench(args["device"], full_info, args["output_dir"]).evaluate(
    videos_path=args["videos_dir"], name=args["name"], dimension_list=args["dimensions"], mode="custom_input"
)
"""


def run_official_vbench(
    videos_dir: str | os.PathLike,
    dimensions: list[str],
    output_dir: str | os.PathLike,
    *,
    python: str | os.PathLike | None = None,
    device: str = "cuda",
    name: str = "ditcache",
) -> dict[str, OfficialScore]:
    """Scores the ``.mp4``/``.gif`` files in ``videos_dir`` with the official ``vbench`` package.

    It runs ``VBench(device, ..., output_dir).evaluate(..., mode="custom_input")`` (prompts read from
    the file names) in a child process of ``python``, and reads back ``{output_dir}/{name}_eval_results.json``.
    VBench and its dependencies load their checkpoints with ``torch.load``, some with ``weights_only=False``; the
    child runs with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, so torch loads them all with ``weights_only=True``, as
    ditcache does, and a checkpoint holding other pickled objects fails instead of running their code.
    vbench pins ``transformers==4.33.2`` and ``numpy<2``, so it normally lives in its own environment:
    pass that environment's interpreter as ``python`` (the default is this one).

    Raises:
        ImportError: ``python`` cannot import vbench; the message says how to install it.
        ValueError: a dimension VBench does not score in custom_input mode.
        RuntimeError: vbench failed (its output went to this process's stdout and stderr), also when it
            met a checkpoint that ``weights_only=True`` refuses.
    """
    unsupported = sorted(set(dimensions) & set(CUSTOM_INPUT_UNSUPPORTED))
    if unsupported:
        raise ValueError(f"VBench scores {', '.join(unsupported)} on its prompt suite only, not in custom_input mode")
    python = str(python or sys.executable)
    args = {
        "videos_dir": str(videos_dir),
        "output_dir": str(output_dir),
        "dimensions": list(dimensions),
        "device": device,
        "name": name,
    }
    env = os.environ | {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}  # overrides weights_only=False at any torch.load call
    returncode = subprocess.run([python, "-c", _OFFICIAL_RUNNER, json.dumps(args)], env=env, check=False).returncode
    if returncode == _VBENCH_MISSING:
        raise ImportError(
            f"The official VBench (`vbench` on PyPI) is not installed for {python}. It pins transformers==4.33.2 "
            "and numpy<2, so give it its own environment: `python -m venv vbench-env`, install a CUDA build of "
            "torch and torchvision there (VBench's setup.py refuses to install without CUDA), then "
            "`vbench-env/bin/pip install vbench`, and call run_official_vbench(..., python='vbench-env/bin/python')."
        )
    if returncode != 0:
        raise RuntimeError(f"vbench exited with status {returncode}; its output is above")
    results = json.loads((Path(output_dir) / f"{name}_eval_results.json").read_text())
    scores = {}
    for dimension in dimensions:
        score, per_video = results[dimension]
        by_video = {video["video_path"]: float(video["video_results"]) for video in per_video}
        scores[dimension] = OfficialScore(float(score), by_video)
    return scores
