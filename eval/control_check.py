"""Forecasters and error control against fixed intervals on a reference model, in one process: a quick table
of PSNR against uncached and FLOPs speedup, with the full steps each run took.

    python -m ditcache.eval.control_check --model digits-flux --steps 50
    python -m ditcache.eval.control_check --model digits-dit --steps 20 --methods fora:4:order=1 fora:4:order=2:fc=bdf2_heun

Methods are sweep specs (``ditcache.eval.speed.parse_method``). The sweeps (``ditcache sweep``) give the full
comparison with the judges and peers; this is the fast look that chooses their grids.
"""

from __future__ import annotations

import argparse

import torch

from ditcache import cache_stats
from ditcache.eval import digits, metrics, scenes, train_scenes
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
    args = parser.parse_args(argv)
    methods = [parse_method(spec) for spec in args.methods]  # every spec checked before any run
    pipe, images = reference_images(args.model, args.steps, scheduler=args.scheduler)
    with torch.no_grad():
        uncached = images()
        print(f"{args.model}, {args.steps} steps, {type(pipe.scheduler).__name__}, seed 0\n")
        print("| method | PSNR (dB) | FLOPs speedup | estimate (% of FLOPs) | cache KiB | layout | full steps |\n|---|---|---|---|---|---|---|")
        pending = list(methods)
        while pending:
            method = pending.pop(0)
            method.apply(pipe, args.steps)
            cached = images()
            stats = cache_stats(pipe)
            method.remove(pipe)
            psnr = float(metrics.psnr(cached, uncached).mean())
            share = 100 * stats.estimate_flops / stats.flops if stats.flops else 0.0
            print(f"| `{method.spec}` | {psnr:.2f} | {stats.flops_speedup:.2f} | {share:.2f} | {stats.cache_bytes / 1024:.0f} | "
                  f"{stats.cache_layout} | {list(stats.full_step_indices)} |", flush=True)
            if method.config is not None and not isinstance(method.config, list) and method.config.cache_memory is None:
                spec = method.spec.replace(":memory=none", "")
                pending[:0] = [parse_method(f"{spec}:memory={int(fraction * stats.cache_bytes)}") for fraction in args.budgets]


if __name__ == "__main__":
    main()
