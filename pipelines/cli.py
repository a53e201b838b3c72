"""``ditcache generate``: images (or one video) with caching, timed, optionally against the uncached run."""

from __future__ import annotations

import argparse
import inspect
import time

import numpy as np
import torch

from .toca_pipeline import ToCaPipeline

OFFLINE_NOTE = (
    "no --model given: using ditcache's reference FLUX model trained on handwritten digits "
    "(eval/reference_models/digits-flux, 32x32, prompts like 'a handwritten digit seven'; default: all ten digits)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id or local folder of a supported diffusers pipeline (default: the offline reference FLUX model)")
    parser.add_argument("--prompt", nargs="+", help="one or more prompts (one image each); for DiT label names (ImageNet's, "
                        "or the reference DiT's digit names) or class indices (default with no --model: the ten digits)")
    parser.add_argument("--cache-interval", type=int, help="N: a full step every N steps (default: the model's preset)")
    parser.add_argument("--cache-ratio", type=float, help="R: fraction of tokens reused on partial steps (default: preset)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 28; 20 for the reference model; a video pipeline's own)")
    parser.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    parser.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    parser.add_argument("--frames", type=int, help="video pipelines (OpenSora): frames to generate (default: the pipeline's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="ditcache.png", help="where to write the cached image (a row of images for "
                        "several prompts; with --compare the uncached row above the cached one); for a video, "
                        ".gif or .mp4 (each frame: uncached above cached with --compare) or .png (the frames in a row)")
    parser.add_argument("--compare", action="store_true", help="also run uncached: time ratio and PSNR")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def is_video(pipe) -> bool:
    """Whether ``pipe`` generates videos (its call takes ``num_frames``)."""
    return "num_frames" in inspect.signature(type(pipe).__call__).parameters


def _call_arguments(pipe, args, defaults: dict) -> dict:
    call = {"output_type": "pil", **defaults}
    if args.steps is not None:
        call["num_inference_steps"] = args.steps
    if not is_video(pipe):  # video pipelines keep their own default (OpenSora: 30)
        call.setdefault("num_inference_steps", 28)
    if hasattr(pipe, "get_label_ids"):  # DiT: class-conditional, by label name or class index
        call["class_labels"] = [int(p) if p.isdigit() else pipe.get_label_ids([p])[0] for p in args.prompt]
    else:
        call["prompt"] = list(args.prompt)
        call |= {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
        if isinstance(call.get("negative_prompt"), str):  # one negative prompt per prompt
            call["negative_prompt"] = [call["negative_prompt"]] * len(args.prompt)
    if args.frames is not None:
        call["num_frames"] = args.frames
    return call


def image_grid(rows: list[list]):
    """Images of one size laid out row by row (e.g. an uncached row above a cached one)."""
    from PIL import Image

    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(row) for row in rows), height * len(rows)))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * width, y * height))
    return grid


def _timed(pipe, call, args, **cache):
    generator = torch.Generator(args.device).manual_seed(args.seed)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    output = pipe(generator=generator, **call, **cache)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    images = output.frames[0] if hasattr(output, "frames") else output.images  # a video: its frames
    return images, time.perf_counter() - start


def _psnr(images: list, references: list) -> float:
    """PSNR (dB) of the cached images against the uncached ones, over all of them."""
    errors = [np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32) for a, b in zip(images, references)]
    mse = float(np.mean([np.mean(e**2) for e in errors]))
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def generate(args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    model, defaults = args.model, {}
    if model is None:
        from ditcache.eval import digits

        print(OFFLINE_NOTE)
        model, defaults = digits.reference_pipeline_path(digits.TEXT_MODEL), dict(digits.TEXT_MODEL_CALL)
        args.prompt = args.prompt or [digits.prompt(label) for label in range(10)]
    if not args.prompt:
        raise SystemExit("ditcache generate: give --prompt with --model.")
    pipe = ToCaPipeline.from_pretrained(model, cache_interval=args.cache_interval, cache_ratio=args.cache_ratio, dtype=dtype).to(args.device)
    pipe.set_progress_bar_config(disable=args.quiet)
    video = is_video(pipe)
    if video and len(args.prompt) > 1:
        raise SystemExit("ditcache generate: a video pipeline takes one --prompt.")
    if args.frames is not None and not video:
        raise SystemExit("ditcache generate: --frames needs a video pipeline (OpenSora).")
    call = _call_arguments(pipe, args, defaults)

    references = None
    if args.compare:  # uncached first: it also warms up what both runs share
        references, uncached_time = _timed(pipe, call, args, cache=False)
    images, cached_time = _timed(pipe, call, args)
    if video and args.out.lower().endswith((".gif", ".mp4")):
        from .opensora import export

        frames = images if references is None else [image_grid([[r], [f]]) for f, r in zip(images, references)]
        export(frames, args.out)
    else:
        image_grid([images] if references is None else [references, images]).save(args.out)
    layout = " (top row uncached, bottom row cached)" if references is not None else ""
    stats = pipe.cache_stats
    print(f"cached:   {cached_time:.3f} s  -> {args.out}{layout}")
    print(
        f"stats:    {stats.full_steps} full + {stats.partial_steps} partial steps, recompute {stats.recompute_fraction:.3f}, "
        f"FLOPs {stats.flops / 1e12:.3f} T of {stats.flops_full / 1e12:.3f} T ({stats.flops_speedup:.2f}x fewer), "
        f"cache {stats.cache_bytes / 2**20:.1f} MiB"
    )
    if references is not None:
        print(f"uncached: {uncached_time:.3f} s  speedup {uncached_time / cached_time:.2f}x  PSNR vs uncached {_psnr(images, references):.1f} dB")
