"""``ditcache generate``: images (or one video) with caching; with ``--compare`` against uncached, timed fairly.

Everything the arguments decide (the method and its settings, the output's format and writer, the model
path) is checked before the model loads, and mistakes end in one line (``CommandError``).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .cli import CommandError, hide_loading_bars, resolve_device, steady_cpu_allocator
from .pipelines.toca_pipeline import ToCaPipeline, resolve_config
from .timing import Clock

OFFLINE_NOTE = (
    "no --model given: using ditcache's reference FLUX model trained on handwritten digits "
    "(eval/reference_models/digits-flux, 32x32, prompts like 'a handwritten digit seven'; default: all ten digits)."
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".gif", ".mp4", ".png")
SHORTEST_SIDE = 128  # small images are enlarged (nearest neighbour) to at least this many pixels, to be seen


def is_video(pipe) -> bool:
    """Whether ``pipe`` generates videos (its call takes ``num_frames``)."""
    return "num_frames" in inspect.signature(type(pipe).__call__).parameters


def _check_output(path: str) -> None:
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        raise CommandError(f"--out must end in one of {', '.join(sorted(set(IMAGE_SUFFIXES + VIDEO_SUFFIXES)))}, got {path!r}")
    if suffix == ".mp4" and not all(importlib.util.find_spec(name) for name in ("imageio", "imageio_ffmpeg")):
        raise CommandError("--out *.mp4 needs imageio and imageio-ffmpeg: pip install 'ditcache[video]' (or write a .gif)")
    if not Path(path).expanduser().resolve().parent.is_dir():
        raise CommandError(f"--out {path}: the folder {Path(path).parent} does not exist")


def _cache_settings(args: argparse.Namespace) -> dict:
    """``ToCaPipeline.from_pretrained``'s cache keywords, checked now. Without ``--method``, a folder's
    saved ``ditcache_config.json`` applies, else the model's ToCa preset."""
    from ditcache import preset

    settings = {"cache_interval": args.cache_interval, "cache_ratio": args.cache_ratio}
    try:
        if args.method is not None:
            settings["cache_config"] = preset(args.method)
        resolve_config(**settings)
    except ValueError as error:
        raise CommandError(str(error)) from None
    return settings


def _load(model: str, settings: dict, dtype: torch.dtype, quiet: bool) -> ToCaPipeline:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if quiet:  # the loading bars too, not only the sampling bar
        hide_loading_bars()
    path = Path(model).expanduser()
    if path.exists() and not (path / "model_index.json").is_file():
        raise CommandError(f"--model {model}: not a diffusers pipeline folder (it has no model_index.json)")
    if not path.exists():
        try:
            validate_repo_id(model)
        except HFValidationError:
            raise CommandError(f"--model {model}: no such folder, and not a hub id (owner/name)") from None
    try:
        return ToCaPipeline.from_pretrained(str(path) if path.exists() else model, **settings, dtype=dtype)
    except (OSError, ValueError) as error:  # not on the hub, offline, unreadable files, a malformed saved config
        raise CommandError(f"--model {model}: {str(error).splitlines()[0]}") from None


def _call_arguments(pipe, args: argparse.Namespace, defaults: dict) -> dict:
    parameters = inspect.signature(type(pipe).__call__).parameters
    call = {"output_type": "pil", **defaults}
    if args.steps is not None:
        call["num_inference_steps"] = args.steps
    if not is_video(pipe):  # video pipelines keep their own default (OpenSora: 30)
        call.setdefault("num_inference_steps", 28)
    if args.guidance_scale is not None:  # true guidance where the call already uses it (the reference model)
        call["true_cfg_scale" if "true_cfg_scale" in call else "guidance_scale"] = args.guidance_scale
    if args.negative_prompt is not None:
        if "negative_prompt" not in parameters:
            raise CommandError(f"--negative-prompt: {type(pipe).__mro__[1].__name__} takes no negative prompt")
        call["negative_prompt"] = args.negative_prompt
    if hasattr(pipe, "get_label_ids"):  # DiT: class-conditional, by label name or class index
        try:
            call["class_labels"] = [int(p) if p.isdigit() else pipe.get_label_ids([p])[0] for p in args.prompt]
        except ValueError as error:
            raise CommandError(f"--prompt: {error}") from None
        classes = pipe.transformer.config.num_embeds_ada_norm
        if classes is not None and any(label >= classes for label in call["class_labels"]):
            raise CommandError(f"--prompt {' '.join(args.prompt)}: a class index must be in 0..{classes - 1} for this model")
    else:
        call["prompt"] = list(args.prompt)
        call |= {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
        if isinstance(call.get("negative_prompt"), str):  # one negative prompt per prompt
            call["negative_prompt"] = [call["negative_prompt"]] * len(args.prompt)
    if args.frames is not None:
        call["num_frames"] = args.frames
    return call


def labelled_grid(rows: list[list[Image.Image]], labels: list[str] | None = None) -> Image.Image:
    """Images of one size, row by row (e.g. uncached above cached), each row with its label on the left;
    images smaller than ``SHORTEST_SIDE`` are enlarged by a whole factor (nearest neighbour)."""
    width, height = rows[0][0].size
    scale = max(1, -(-SHORTEST_SIDE // min(width, height)))
    cell_width, cell_height = width * scale, height * scale
    font = ImageFont.load_default(size=max(12, min(20, cell_height // 7)))
    label_width = 0
    if labels:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_width = 16 + max(probe.multiline_textbbox((0, 0), label, font=font)[2] for label in labels)
    grid = Image.new("RGB", (label_width + cell_width * max(len(row) for row in rows), cell_height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for y, row in enumerate(rows):
        if labels:
            draw.multiline_text((8, y * cell_height + cell_height // 2), labels[y], fill="black", font=font, anchor="lm")
        for x, image in enumerate(row):
            grid.paste(image.resize((cell_width, cell_height), Image.Resampling.NEAREST), (label_width + x * cell_width, y * cell_height))
    return grid


def psnr_text(images: list, references: list) -> str:
    """PSNR of the cached images against the uncached ones, over all of them; ``identical`` when equal."""
    errors = [np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32) for a, b in zip(images, references)]
    mse = float(np.mean([np.mean(e**2) for e in errors]))
    return "identical" if mse == 0 else f"{10 * np.log10(255.0**2 / mse):.1f} dB"


def _timed_call(pipe, clock: Clock, call: dict, seed: int, times: dict[str, list[float]], **cache) -> list:
    """One timed call: its images (a video: its frames); its seconds, and those inside the transformer,
    appended to ``times``."""
    generator = torch.Generator(clock.device).manual_seed(seed)
    output, seconds = clock.timed(lambda: pipe(generator=generator, **call, **cache), inner=pipe.transformer)
    name = "uncached" if cache.get("cache") is False else "cached"
    times[name].append(seconds)
    times[f"{name} transformer"].append(clock.inner)
    return output.frames[0] if hasattr(output, "frames") else output.images


def generate(args: argparse.Namespace) -> None:
    """Run ``ditcache generate`` with parsed arguments (see ``ditcache generate --help``)."""
    device = resolve_device(args.device)
    steady_cpu_allocator(device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    _check_output(args.out)
    settings = _cache_settings(args)
    model, defaults = args.model, {}
    if model is None:
        from ditcache.eval import digits

        print(OFFLINE_NOTE)
        model, defaults = str(digits.reference_pipeline_path(digits.TEXT_MODEL)), dict(digits.TEXT_MODEL_CALL)
        args.prompt = args.prompt or [digits.prompt(label) for label in range(10)]
    if not args.prompt:
        raise CommandError("give --prompt with --model")
    pipe = _load(model, settings, dtype, args.quiet).to(device)
    pipe.set_progress_bar_config(disable=args.quiet)
    video, suffix = is_video(pipe), Path(args.out).suffix.lower()
    if video and len(args.prompt) > 1:
        raise CommandError("a video pipeline takes one --prompt")
    if args.frames is not None and not video:
        raise CommandError("--frames needs a video pipeline (OpenSora)")
    if suffix not in (VIDEO_SUFFIXES if video else IMAGE_SUFFIXES):
        raise CommandError(f"--out {args.out}: a {'video' if video else 'image'} pipeline writes "
                           f"{', '.join(VIDEO_SUFFIXES if video else IMAGE_SUFFIXES)}")
    call = _call_arguments(pipe, args, defaults)

    clock = Clock(device)
    run = lambda **cache: _timed_call(pipe, clock, call, args.seed, times, **cache)  # noqa: E731
    references, times = None, {"uncached": [], "cached": [], "uncached transformer": [], "cached transformer": []}
    if args.compare:
        # Both warm up first (the first call of each pays one-off costs), then they alternate and the
        # medians are compared: a single first call measures the warm-up, not the cache.
        run(cache=False)
        run()
        times = {name: [] for name in times}
    for _ in range(args.repeats if args.compare else 1):
        if args.compare:
            references = run(cache=False)
        images = run()
    median = {name: statistics.median(values) for name, values in times.items() if values}
    cached_time = median["cached"]
    stats = pipe.cache_stats
    labels, method = None, f" ({args.method})" if args.method else ""
    if references is not None:
        uncached_time = median["uncached"]
        labels = [f"uncached\n{uncached_time:.2f} s", f"cached{method}\n{cached_time:.2f} s, {uncached_time / cached_time:.2f}x\n"
                  f"FLOPs {stats.flops_speedup:.2f}x fewer\nPSNR {psnr_text(images, references)}"]
    rows = [images] if references is None else [references, images]
    if video and suffix in (".gif", ".mp4"):
        from .pipelines.opensora import export

        export([labelled_grid([[frame] for frame in frames], labels) for frames in zip(*rows)], args.out)
    else:
        labelled_grid(rows, labels or [f"cached{method}\n{cached_time:.2f} s"]).save(args.out)
    layout = " (top row uncached, bottom row cached)" if references is not None else ""
    timing = f"median of {args.repeats} warm runs" if references is not None else "one run, warm-up included"
    print(f"cached:   {cached_time:.3f} s ({timing})  -> {args.out}{layout}")
    print(
        f"stats:    {stats.full_steps} full + {stats.partial_steps} partial steps, recompute {stats.recompute_fraction:.3f}, "
        f"FLOPs {stats.flops / 1e12:.3f} T of {stats.flops_full / 1e12:.3f} T ({stats.flops_speedup:.2f}x fewer), "
        f"cache {stats.cache_bytes / 2**20:.1f} MiB"
    )
    if references is not None:
        print(f"uncached: {uncached_time:.3f} s (median of {args.repeats} warm runs, alternating with the cached ones)")
        transformer_speedup = median["uncached transformer"] / median["cached transformer"]
        print(f"speedup:  {uncached_time / cached_time:.2f}x in time per call ({transformer_speedup:.2f}x inside the transformer), "
              f"{stats.flops_speedup:.2f}x in transformer FLOPs; PSNR vs uncached {psnr_text(images, references)}")
