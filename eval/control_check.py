"""Forecasters and error control against fixed intervals on a reference model, in one process: a quick table
of PSNR against uncached and FLOPs speedup, with the full steps each run took.

    python -m ditcache.eval.control_check --model digits-flux --steps 50
    python -m ditcache.eval.control_check --model digits-dit --steps 20 --methods fora:4:order=1 fora:4:order=2:fc=bdf2_heun
    python -m ditcache.eval.control_check --model digits-dit --steps 20 --start-grid [--scheduler multistep]

Methods are sweep specs (``ditcache.eval.speed.parse_method``). The sweeps (``ditcache sweep``) give the full
comparison with the judges and peers; this is the fast look that chooses their grids.
"""

from __future__ import annotations

import argparse
import math

import torch

from ditcache import cache_stats
from ditcache.eval import digits, metrics, scenes, train_scenes
from ditcache.eval.gaps import at
from ditcache.eval.speed import parse_method

FORECASTS = ("order=0", "order=1", "order=2", "order=1:fc=hermite", "order=2:fc=hermite", "order=2:fc=bdf2_heun")
DEFAULT_METHODS = tuple(f"fora:{n}:{forecast}" for n in (3, 5, 8) for forecast in FORECASTS) + tuple(
    f"fora:3:{forecast}:tol={t}:max=12" for forecast in ("order=0", "order=1", "order=1:fc=hermite", "order=2:fc=bdf2_heun") for t in (0.1, 0.2, 0.4, 0.8)
)
MODELS = ("digits-flux", "digits-dit", train_scenes.NAME)


SCHEDULERS = {"multistep": "DPMSolverMultistepScheduler"}  # another solver than the reference's own, by --scheduler


def reference_images(name: str, steps: int, with_call: bool = False, scheduler: str | None = None):
    """The reference model ``name`` and a function drawing its fixed evaluation batch (8 images; 4 scenes); with
    ``with_call``, also the call's arguments (MagCache calibrates on them); ``scheduler`` (``SCHEDULERS``) replaces
    the reference's own scheduler, built from its config."""
    import diffusers
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(digits.reference_pipeline_path(name))
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    if name == "digits-dit":
        call = dict(class_labels=list(range(8)), num_inference_steps=steps, guidance_scale=3.0, output_type="pt")
    elif name == "digits-flux":
        call = dict(digits.TEXT_MODEL_CALL, prompt=[digits.prompt(label) for label in range(8)], negative_prompt=[""] * 8,
                    num_inference_steps=steps, output_type="pt")
    else:
        _, captions = scenes.make_scenes(4, scenes.EVAL_SEED, held_out=True)
        call = dict(train_scenes.CALL, prompt=captions, negative_prompt=[""] * 4, num_inference_steps=steps, output_type="pt")

    def images():
        return pipe(**call, generator=torch.Generator().manual_seed(0)).images

    return (pipe, images, call) if with_call else (pipe, images)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="digits-flux")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="another solver than the reference's own")
    parser.add_argument("--budgets", nargs="*", type=float, default=[],
                        help="also run each of ditcache's methods with cache_memory at these fractions of what it held unbounded")
    parser.add_argument("--start-grid", action="store_true", help="instead of --methods: the preset at every first interval "
                        f"{START_INTERVALS} and tolerance {START_TOLERANCES}, and the start rules scaled by the step count")
    args = parser.parse_args(argv)
    if args.start_grid:
        args.methods = [f"ditcache:{t}:first={k}" for t in START_TOLERANCES for k in START_INTERVALS]
    methods = [parse_method(spec) for spec in args.methods]  # every spec checked before any run
    pipe, images = reference_images(args.model, args.steps, scheduler=args.scheduler)
    with torch.no_grad():
        uncached = images()
        print(f"{args.model}, {args.steps} steps, {type(pipe.scheduler).__name__}, seed 0\n")
        print("| method | PSNR (dB) | FLOPs speedup | estimate (% of FLOPs) | cache KiB | layout | full steps |\n|---|---|---|---|---|---|---|")
        pending, points = list(methods), {}
        while pending:
            method = pending.pop(0)
            method.apply(pipe, args.steps)
            cached = images()
            stats = cache_stats(pipe)
            method.remove(pipe)
            psnr = float(metrics.psnr(cached, uncached).mean())
            points[method.spec] = (stats.flops_speedup, psnr)
            share = 100 * stats.estimate_flops / stats.flops if stats.flops else 0.0
            print(f"| `{method.spec}` | {psnr:.2f} | {stats.flops_speedup:.2f} | {share:.2f} | {stats.cache_bytes / 1024:.0f} | "
                  f"{stats.cache_layout} | {list(stats.full_step_indices)} |", flush=True)
            if method.config is not None and not isinstance(method.config, list) and method.config.cache_memory is None:
                spec = method.spec.replace(":memory=none", "")
                pending[:0] = [parse_method(f"{spec}:memory={int(fraction * stats.cache_bytes)}") for fraction in args.budgets]
    if args.start_grid:
        print(start_report(points, args.steps))


START_TOLERANCES = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
START_INTERVALS = (1, 2, 3, 4, 5)
START_EXPONENTS = (0.0, 0.5, 1.0)  # the first interval scaled by (steps / 50) ** p; 0: the preset's rule as it is
START_SPEEDUPS = (2, 2.5, 3, 3.5, 4)


def start_report(points: dict[str, tuple[float, float]], steps: int) -> str:
    """The grid of first interval against tolerance, and each start rule's PSNR at ``START_SPEEDUPS``: the first
    interval ``round(2 sqrt(tolerance / 0.2) (steps / 50) ** p)`` (at most the grid's largest) at each tolerance,
    its points joined as ``eval/gaps.py`` joins a method's."""
    lines = ["", "| first interval | " + " | ".join(f"tol {t}" for t in START_TOLERANCES) + " |",
             "|---|" + "---|" * len(START_TOLERANCES)]
    for k in START_INTERVALS:
        cells = [points[f"ditcache:{t}:first={k}"] for t in START_TOLERANCES]
        lines.append(f"| {k} | " + " | ".join(f"{psnr:.2f} @ {speed:.2f}x" for speed, psnr in cells) + " |")
    lines += ["", "| start rule | " + " | ".join(f"{x}x" for x in START_SPEEDUPS) + " |", "|---|" + "---|" * len(START_SPEEDUPS)]
    for p in START_EXPONENTS:
        rule = [points[f"ditcache:{t}:first={min(max(round(2 * math.sqrt(t / 0.2) * (steps / 50) ** p), 1), START_INTERVALS[-1])}"]
                for t in START_TOLERANCES]
        values = [at(rule, x) for x in START_SPEEDUPS]
        lines.append(f"| (steps / 50) ** {p} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
