"""ditcache at the memory its peers hold: on a reference model, in one process with the same seeds, each peer's
PSNR against uncached, FLOPs speedup and the memory it really holds (``eval/held_memory.py``); then
``preset("ditcache", cache_memory=B)`` at several tolerances, B the most any peer held, and the gap between the
preset and the peers' envelope at matched FLOPs.

    python -m ditcache.eval.equal_memory --model digits-flux --steps 50 --plot eval/plots/digits-flux-memory-50.png

The preset runs unbounded, at its default budget (16 H), at a quarter of what it held unbounded, and at B.

FLOPs are counted by ``FlopCounterMode`` on the same runs for every method. The envelope at x: the best PSNR any
peer reaches at x, each peer's points joined linearly in PSNR against FLOPs speedup along its Pareto front, and
never below its best point that saves at least x (no extrapolation beyond its fastest point).
"""

from __future__ import annotations

import argparse

import torch

from ditcache import cache_stats
from ditcache.eval import metrics
from ditcache.eval.control_check import MODELS, reference_images
from ditcache.eval.gaps import format_gaps, gap_rows, method_family
from ditcache.eval.held_memory import held_bytes, live_bytes_at_calls
from ditcache.eval.speed import parse_method
from ditcache.flops import count_flops

PEER_METHODS = ("fbc:0.05", "fbc:0.1", "fbc:0.2", "fbc:0.3", "magcache:0.06", "magcache:0.12", "magcache:0.24",
                "dbcache:0.08", "dbcache:0.16", "dbcache:0.3", "dbcache:0.5",
                "dbcache:0.08:1", "dbcache:0.16:1", "dbcache:0.3:1", "dbcache:0.5:1")
TOLERANCES = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
SPEEDUPS = (2, 3, 4, 5, 6)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="digits-flux")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--peers", nargs="+", default=list(PEER_METHODS))
    parser.add_argument("--tolerances", nargs="+", type=float, default=list(TOLERANCES))
    parser.add_argument("--plot", help="write PSNR against FLOPs speedup, every method labelled with its memory, here (PNG)")
    args = parser.parse_args(argv)
    peers = [parse_method(spec) for spec in args.peers]
    pipe, images, call = reference_images(args.model, args.steps, with_call=True)
    every = max(args.steps // 10, 1)

    def measured(method):
        if method is not None:
            method.apply(pipe, args.steps, call)
        try:
            with live_bytes_at_calls(pipe, every) as samples:
                output, flops = count_flops(images, pipe.transformer)
            stats = cache_stats(pipe) if method is not None and method.config is not None else None
        finally:
            if method is not None:
                method.remove(pipe)
        return output, flops, samples, stats

    with torch.no_grad():
        uncached, flops_full, _, _ = measured(None)
        _, _, base, _ = measured(None)  # sampled while the uncached images are alive, as they are in every later run
        print(f"{args.model}, {args.steps} steps, seed 0; held memory sampled every {every} transformer calls\n")
        print("| method | PSNR (dB) | FLOPs speedup | held KiB | ditcache's count KiB | layout |\n|---|---|---|---|---|---|")

        def row(spec: str) -> tuple[float, float, int]:
            output, flops, samples, stats = measured(parse_method(spec))
            psnr, speed, held = float(metrics.psnr(output, uncached).mean()), flops_full / flops, held_bytes(samples, base)
            counted = f"{stats.cache_bytes / 1024:.0f}" if stats else "-"
            print(f"| `{spec}` | {psnr:.2f} | {speed:.2f} | {held / 1024:.0f} | {counted} | {stats.cache_layout if stats else '-'} |",
                  flush=True)
            return speed, psnr, held

        rows = {method.spec: row(method.spec) for method in peers if method.unavailable() is None}
        budget = max(held for _, _, held in rows.values())
        presets = {"unbounded": [row(f"ditcache:{t}:memory=none") for t in args.tolerances]}
        quarter = min(held for *_, held in presets["unbounded"]) // 4
        presets["default (16H)"] = [row(f"ditcache:{t}") for t in args.tolerances]
        presets["a quarter of unbounded"] = [row(f"ditcache:{t}:memory={quarter}") for t in args.tolerances]
        presets["B"] = [row(f"ditcache:{t}:memory={budget}") for t in args.tolerances]
    families = {method_family(spec) for spec in rows}
    at_b = max(held for *_, held in presets["B"])
    print(f"\nB = {budget / 1024:.0f} KiB (the most a peer held); the preset at B held at most {at_b / 1024:.0f} KiB; "
          f"a quarter of unbounded: {quarter / 1024:.0f} KiB\n")
    points = {family: [(s, p) for spec, (s, p, _) in rows.items() if method_family(spec) == family] for family in families}
    ours = [f"preset, {name}" for name in presets]
    points |= {mine: [(s, p) for s, p, _ in values] for mine, values in zip(ours, presets.values())}
    print(format_gaps(gap_rows(points, ours, SPEEDUPS), ours))
    if args.plot:
        _plot(args, rows, presets, families)


def _plot(args, rows: dict, presets: dict, families: set) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5.5))
    for family in sorted(families):
        points = sorted((s, p, h) for spec, (s, p, h) in rows.items() if method_family(spec) == family)
        axes.plot([s for s, _, _ in points], [p for _, p, _ in points], "o--", label=f"{family} (held {max(h for *_, h in points) / 1024:.0f} KiB)")
    for name, points in presets.items():
        points = sorted(points)
        axes.plot([s for s, _, _ in points], [p for _, p, _ in points], "s-", linewidth=2,
                  label=f"preset, {name} (held {max(h for *_, h in points) / 1024:.0f} KiB)")
    axes.set_xlabel("FLOPs speedup")
    axes.set_ylabel("PSNR against uncached (dB)")
    axes.set_title(f"{args.model}, {args.steps} steps: quality against FLOPs, with each method's held memory")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
