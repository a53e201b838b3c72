"""``ditcache sweep CONFIG.yaml --output DIR``: a grid of caching methods on one pipeline, evaluated.

For every method of the config and every (prompt, seed) it writes an image, then for every method the
configured metrics, and finally ``results.csv``, ``results.json``, a speed-versus-quality plot and an
image grid per prompt (the first ``grid_prompts`` prompts). Layout of ``DIR``::

    manifest.json                  the resolved configuration; a different one is refused
    images/<method>-<hash>/        p00000-s0.png + p00000-s0.json (prompt, seed, latency) per image
    metrics/<method>-<hash>.json   finished metric values, keyed by what they depend on
    results.csv, results.json, speed_quality.png, grids/prompt-00000.png
    gaps.md                        with ``ours``: their gaps to the others' envelope at matched FLOPs

Resumable: every file is written to a temporary name and renamed, an image counts as done when its
sidecar JSON exists, and finished metrics are kept, so rerunning the command after a crash or
``kill -9`` does only what is missing. Data parallel: under ``accelerate launch --num_processes N`` (GPUs)
or ``torchrun --nproc_per_node N`` (CPU) the processes share the images, a batch at a time; the main
process computes the metrics and writes the results. Each image is generated from its own seed, in a
batch fixed by the config, so neither the split nor a resume changes any pixel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ditcache import cli

from .sweep_config import SweepConfig, expand_methods, load_config, load_prompts
from .sweep_generation import batches, check_manifest, generate, is_done, load_pipeline, units
from .sweep_metrics import Evaluator, ImageFiles, evaluate
from .sweep_report import TIMING_COLUMNS, format_results, plot_grids, plot_speed_quality, write_gaps, write_results

__all__ = ["SweepConfig", "load_config", "load_prompts", "expand_methods", "Evaluator", "ImageFiles", "TIMING_COLUMNS",
           "format_results", "run", "main", "run_from_arguments"]


def run(config: SweepConfig, output: Path, device: str, allow_changed: bool = False, quiet: bool = False) -> list[dict] | None:
    """Run (or resume) a sweep; returns the result rows on the main process, None on the others."""
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    output.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        check_manifest(output, config, allow_changed)
    state.wait_for_everyone()
    pipe = load_pipeline(config, device)
    pipe.set_progress_bar_config(disable=True)
    pending = [batch for batch in batches(config) if not all(is_done(output, u, config.prompts[u.index]) for u in batch)]
    missing = sum(not is_done(output, u, config.prompts[u.index]) for batch in pending for u in batch)
    state.wait_for_everyone()  # every process has read what is done before any writes
    with state.split_between_processes(pending) as mine:
        with torch.inference_mode():
            generate(pipe, config, output, mine, device, quiet, state.process_index)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    with torch.inference_mode():
        rows = evaluate(pipe, config, output, device, quiet)
    write_results(output, rows)
    gaps = write_gaps(output, rows, config)
    plot_speed_quality(output, rows, config.plot_x)
    plot_grids(output, config)
    if not quiet:
        print(format_results(rows))
        if gaps is not None:
            print(gaps)
        for spec, why in config.skipped.items():
            print(f"skipped {spec}: {why}")
        print(f"{missing} images generated now, {len(units(config)) - missing} already there; results in {output}")
    return rows


def main(argv: list[str] | None = None) -> None:
    """``ditcache sweep`` with ``argv`` (also ``python -m ditcache.eval.sweep``, e.g. under ``accelerate launch``)."""
    run_from_arguments(cli.build_parser().parse_args(["sweep", *(sys.argv[1:] if argv is None else argv)]))


def run_from_arguments(args: argparse.Namespace) -> None:
    """Run parsed ``ditcache sweep`` arguments; an unreadable or malformed configuration raises ``CommandError``."""
    import yaml

    path, output = Path(args.config), Path(args.output)
    if not path.is_file():
        raise cli.CommandError(f"no sweep configuration at {path}")
    if output.exists() and not output.is_dir():
        raise cli.CommandError(f"--output {output}: a file, not a folder")
    try:
        config = load_config(path, **({"steps": args.steps} if args.steps is not None else {}))
    except (ValueError, KeyError, TypeError, yaml.YAMLError) as error:
        raise cli.CommandError(f"{path}: {error}") from None
    if args.quiet:
        cli.hide_loading_bars()
    device = cli.resolve_device(args.device)
    if device == "cuda":  # one GPU per process under accelerate launch
        from accelerate import PartialState

        device = str(PartialState().device)
    try:
        run(config, output, device, args.allow_changed, args.quiet)
    except OSError as error:  # the pipeline cannot be loaded (not downloaded, offline), the folder not written
        raise cli.CommandError(f"{path}: {str(error).splitlines()[0]}") from None


if __name__ == "__main__":
    raise SystemExit(cli.main(["sweep", *sys.argv[1:]]))
