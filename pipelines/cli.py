"""``ditcache generate``: one image with caching, timed, optionally against the uncached run."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from .toca_pipeline import ToCaPipeline

OFFLINE_NOTE = (
    "no --model given: using ditcache's reference DiT trained on handwritten digits "
    "(eval/reference_models/digits-dit, 32x32; the prompt is a digit's name, 'zero' to 'nine')."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id or local folder of a supported diffusers pipeline (default: the offline reference PixArt)")
    parser.add_argument("--prompt", default="seven", help="text prompt; for DiT a label name (ImageNet's, or the reference DiT's digit names) or class index")
    parser.add_argument("--cache-interval", type=int, help="N: a full step every N steps (default: the model's preset)")
    parser.add_argument("--cache-ratio", type=float, help="R: fraction of tokens reused on partial steps (default: preset)")
    parser.add_argument("--steps", type=int, default=28, help="denoising steps")
    parser.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    parser.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="ditcache.png", help="where to write the cached image")
    parser.add_argument("--compare", action="store_true", help="also run uncached and print the time ratio")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _call_arguments(pipe, args) -> dict:
    call = {"num_inference_steps": args.steps, "output_type": "pil"}
    if hasattr(pipe, "get_label_ids"):  # DiT: class-conditional, by label name or class index
        call["class_labels"] = [int(args.prompt)] if args.prompt.isdigit() else pipe.get_label_ids([args.prompt])
    else:
        call["prompt"] = args.prompt
        call |= {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    return call


def _timed(pipe, call, args, **cache):
    generator = torch.Generator(args.device).manual_seed(args.seed)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    image = pipe(generator=generator, **call, **cache).images[0]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return image, time.perf_counter() - start


def generate(args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    model = args.model
    if model is None:
        from ditcache.eval.digits import reference_pipeline_path

        print(OFFLINE_NOTE)
        model = reference_pipeline_path("digits-dit")
    pipe = ToCaPipeline.from_pretrained(model, cache_interval=args.cache_interval, cache_ratio=args.cache_ratio, dtype=dtype).to(args.device)
    pipe.set_progress_bar_config(disable=args.quiet)
    call = _call_arguments(pipe, args)

    if args.compare:  # uncached first: it also warms up what both runs share
        reference, uncached_time = _timed(pipe, call, args, cache=False)
    image, cached_time = _timed(pipe, call, args)
    image.save(args.out)
    stats = pipe.cache_stats
    print(f"cached:   {cached_time:.3f} s  -> {args.out}")
    print(
        f"stats:    {stats.full_steps} full + {stats.partial_steps} partial steps, recompute {stats.recompute_fraction:.3f}, "
        f"FLOPs {stats.flops / 1e12:.3f} T of {stats.flops_full / 1e12:.3f} T ({stats.flops_speedup:.2f}x fewer), "
        f"cache {stats.cache_bytes / 2**20:.1f} MiB"
    )
    if args.compare:
        error = np.abs(np.asarray(image, dtype=np.float32) - np.asarray(reference, dtype=np.float32))
        psnr = 10 * np.log10(255.0**2 / max(float((error**2).mean()), 1e-12))
        print(f"uncached: {uncached_time:.3f} s  speedup {uncached_time / cached_time:.2f}x  PSNR vs uncached {psnr:.1f} dB")
