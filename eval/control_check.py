"""Error control against fixed intervals on the 64-token FLUX reference, in one process: a quick table of PSNR
against uncached and FLOPs speedup, with the full steps each run took.

    python -m ditcache.eval.control_check --steps 50

The sweeps (``ditcache sweep``, methods ``fora:N:tol=T``) give the full comparison with the judges and peers;
this is the fast look that chooses their tolerance grid.
"""

from __future__ import annotations

import argparse

import torch

from ditcache import FORAConfig, apply_cache, cache_stats, remove_cache
from ditcache.eval import digits, metrics

INTERVALS = (3, 5, 8)
TOLERANCES = (0.1, 0.2, 0.4, 0.8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--max-interval", type=int, default=12)
    args = parser.parse_args(argv)
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(digits.reference_pipeline_path(digits.TEXT_MODEL))
    pipe.set_progress_bar_config(disable=True)
    prompts = [digits.prompt(label) for label in range(8)]
    call = dict(digits.TEXT_MODEL_CALL, negative_prompt=[""] * len(prompts), num_inference_steps=args.steps, output_type="pt")

    def images():
        return pipe(prompts, generator=torch.Generator().manual_seed(0), **call).images

    with torch.no_grad():
        uncached = images()
        configs = [FORAConfig(cache_interval=n, forecast_order=k) for n in INTERVALS for k in (0, 1)]
        configs += [FORAConfig(tolerance=t, forecast_order=k, max_interval=args.max_interval) for k in (0, 1) for t in TOLERANCES]
        print(f"{args.steps} steps, {len(prompts)} prompts, seed 0\n")
        print("| method | PSNR (dB) | FLOPs speedup | full steps |\n|---|---|---|---|")
        for config in configs:
            apply_cache(pipe, config)
            cached = images()
            stats = cache_stats(pipe)
            remove_cache(pipe)
            name = f"fora:{config.cache_interval}" if config.tolerance is None else f"fora:tol={config.tolerance}:max={config.max_interval}"
            psnr = float(metrics.psnr(cached, uncached).mean())
            print(f"| {name}:order={config.forecast_order} | {psnr:.2f} | {stats.flops_speedup:.2f} | {list(stats.full_step_indices)} |", flush=True)


if __name__ == "__main__":
    main()
