"""Is a per-channel correction of the stale tokens, fitted on the fresh ones, worth keeping? A measurement,
not a feature: on ToCa's partial steps, before the fresh rows are written in, the whole branch's cached value
(or forecast) ``P`` is corrected per sample and channel by the fresh rows' residuals ``F - P``:

- ``bias``: ``P + mean(F - P)``;
- ``affine=L``: ``a P + b`` by least squares on the fresh rows, the gain shrunk towards 1 by ``L`` times the
  mean variance (``a = (cov + L v) / (var + L v)``).

    python -m ditcache.eval.correction_check --model digits-flux --steps 50

The correction is applied by wrapping the adapters' ``measure`` (called with exactly those tensors) for the
duration of this script only; ditcache itself has no such option, because it did not help (eval/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import torch

from ditcache import ToCaConfig, apply_cache, cache_stats, remove_cache
from ditcache.adapters import base
from ditcache.eval import metrics
from ditcache.eval.control_check import MODELS, reference_images

CORRECTIONS = ("none", "bias", "affine=1", "affine=0.1")


def correct(cached: torch.Tensor, rows: torch.Tensor, fresh: torch.Tensor, correction: str) -> None:
    """Correct ``cached`` (batch, tokens, channels) in place from its ``rows`` gathered where ``fresh`` was computed."""
    predicted, fresh = rows.float(), fresh.float()
    if correction == "bias":
        cached.add_((fresh - predicted).mean(1, keepdim=True).to(cached.dtype))
        return
    shrink = float(correction.partition("=")[2])
    predicted_mean, fresh_mean = predicted.mean(1, keepdim=True), fresh.mean(1, keepdim=True)
    covariance = ((predicted - predicted_mean) * (fresh - fresh_mean)).mean(1, keepdim=True)
    variance = (predicted - predicted_mean).square().mean(1, keepdim=True)
    gain = (covariance + shrink * variance.mean()) / (variance + shrink * variance.mean())
    cached.mul_(gain.to(cached.dtype)).add_((fresh_mean - gain * predicted_mean).to(cached.dtype))


@contextmanager
def corrected(correction: str):
    measure = base.BlockAdapter.measure

    def measure_corrected(self, run, cached, selection, fresh):
        if correction != "none" and not run.is_full:
            correct(cached, base.gather_rows(cached, selection), fresh, correction)
        return measure(self, run, cached, selection, fresh)

    base.BlockAdapter.measure = measure_corrected
    try:
        yield
    finally:
        base.BlockAdapter.measure = measure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="digits-flux")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    pipe, images = reference_images(args.model, args.steps)
    print(f"{args.model}, {args.steps} steps, ToCa cache ratio 0.9, constant schedule; PSNR (dB) against uncached\n")
    print(f"| N | order | score | FLOPs x | {' | '.join(CORRECTIONS)} |\n|---|---|---|---|{'---|' * len(CORRECTIONS)}")
    with torch.no_grad():
        uncached = images()
        for interval in (3, 5):
            for order in (0, 1):
                for score in ("v_norm", "random"):
                    cells = []
                    for correction in CORRECTIONS:
                        apply_cache(pipe, ToCaConfig(cache_interval=interval, cache_ratio=0.9, schedule="constant", score=score,
                                                     forecast_order=order))
                        with corrected(correction):
                            cached = images()
                        speedup = cache_stats(pipe).flops_speedup
                        remove_cache(pipe)
                        cells.append(f"{float(metrics.psnr(cached, uncached).mean()):.2f}")
                    print(f"| {interval} | {order} | {score} | {speedup:.2f} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
