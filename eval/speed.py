"""``ditcache bench`` (also ``python -m ditcache.eval.speed``): wall-clock time and FLOPs of uncached,
FORA, ToCa and diffusers' own caches on one pipeline, side by side. ``ditcache bench --help`` has the
options and examples; ``--out`` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ditcache import FORAConfig, ToCaConfig, ToMeConfig, apply_cache, cache_stats, cli, preset, remove_cache
from ditcache.flops import count_flops
from ditcache.timing import Clock
from ditcache.specs import SPECS

from . import builders
from .peers import PEERS, DiffusersCache

DEFAULT_METHODS = (
    "uncached",
    "fora:3",
    "toca:3:0.9:attention",
    "toca:3:0.9:k_norm",
    "toca:3:0.9:v_norm",
    "toca:3:0.9:random",
    "fbc",
    "taylorseer:3",
    "magcache",
    "pab",
)


class Method:
    """A benchmarked method: ``apply`` before a run, ``remove`` after it."""

    def __init__(self, spec: str, config=None, peer: DiffusersCache | None = None):
        self.spec, self.config, self.peer = spec, config, peer

    def apply(self, pipe, steps: int, call: dict | None = None) -> None:
        """``call``: the arguments of a call like the benchmark's, for peers that calibrate on one."""
        if self.config is not None:
            apply_cache(pipe, self.config)
        elif self.peer is not None:
            self.peer.apply(pipe, steps, call)

    def unavailable(self) -> str | None:
        """Why this method cannot run here (a peer's package is not installed), or None."""
        return self.peer.unavailable() if self.peer is not None else None

    def remove(self, pipe) -> None:
        if self.config is not None:
            remove_cache(pipe)
        elif self.peer is not None:
            self.peer.remove(pipe)


# Trailing ``key=value`` options of fora/toca specs: the config field each sets, and its type.
OPTIONS = {
    "order": ("forecast_order", int),
    "fc": ("forecaster", str),
    "sigma": ("hermite_scale", float),
    "tol": ("tolerance", float),
    "max": ("max_interval", int),
    "probe": ("probe_ratio", float),
    "share": ("random_share", float),
    "store": ("cache_precision", str),
    "layout": ("cache_layout", lambda value: f"span:{value[4:]}" if value.startswith("span") else value),
    "offload": ("cache_offload", lambda value: _flag("offload", value)),
    "memory": ("cache_memory", lambda value: int(value) if value.isdigit() else None if value == "none" else value),
    "first": ("cache_interval", int),  # the preset's first interval by hand
    "start": ("full_steps_at_start", int),
    "choose": ("choose_order", lambda value: _flag("choose", value)),
    "recompute": ("recompute", float),  # the preset's token-wise variant
}


def _flag(name: str, value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError(f"`{name}` takes 0 or 1, got {value!r}.")
    return value == "1"


ONLY = {"probe": "fora", "share": "toca", "first": "ditcache", "recompute": "ditcache"}


def parse_method(spec: str) -> Method:
    """``uncached``, ``fora:N[:schedule]``, ``toca:N:R[:score[:schedule]]`` (schedule defaults to constant
    for ToCa; ``auto`` takes the model's preset, for the score or the schedule, ``reference`` the
    published one), either with a trailing
    ``:order=K`` (forecast order, e.g. ``fora:4:order=1``), ``tome:R[:mlp]`` (token merging on
    self-attention, and on the MLP with ``mlp``), a caching method and ToMe joined by ``+``
    (``toca:4:0.9+tome:0.5``), or one of diffusers' caches: ``fbc[:threshold]``,
    ``taylorseer[:interval[:order]]``, ``magcache[:threshold]``, ``pab[:block_skip_range]``. Every value
    is checked here, so that a bad spec fails before any run, with an error naming it. Error control takes
    trailing options too: ``:tol=X`` (the tolerance), ``:max=M`` (the longest interval; N is then the
    interval before the first measurement), ``:probe=P`` (FORA's probe share), ``:share=S`` (ToCa's random
    share), e.g. ``toca:4:0.9:v_norm:order=1:tol=0.1``; and the forecast's form: ``:fc=hermite``
    (``:sigma=X`` its scale) or ``:fc=bdf2_heun`` (with ``:order=2``); the storage: ``:store=float8``, ``:layout=block|spanN|chain`` (``spanN`` for ``span:N``), ``:memory=4GiB|16H|none``, ``:offload=1``; the order choice of error control: ``:choose=1``; the first full steps: ``:start=K``. ``ditcache[:tolerance]`` is
    ``preset("ditcache")``, options as FORA's (e.g. ``ditcache:0.4:max=16``), ``:first=K``, its first interval by
    hand, and ``:recompute=R``, its token-wise variant."""
    try:
        return _parse_method(spec)
    except ValueError as error:
        raise ValueError(f"method {spec!r}: {error}") from error


def _parse_method(spec: str) -> Method:
    if "+" in spec:
        parts = [_parse_method(part) for part in spec.split("+")]
        if len(parts) != 2 or any(part.config is None for part in parts):
            raise ValueError("join one of fora/toca with one tome, e.g. 'toca:4:0.9+tome:0.5'.")
        return Method(spec, config=[part.config for part in parts])
    name, *params = spec.split(":")
    forecast = {}
    while params and "=" in params[-1] and name in ("fora", "toca", "ditcache"):
        key, _, value = params.pop().partition("=")
        if key not in OPTIONS or (key in ONLY and ONLY[key] != name):
            raise ValueError(f"unknown option {key!r} for {name}; known: {', '.join(k for k in OPTIONS if ONLY.get(k, name) == name)}.")
        setting, kind = OPTIONS[key]
        forecast[setting] = kind(value)
    if name == "tome" and 1 <= len(params) <= 2 and params[1:] in ([], ["mlp"]):
        return Method(spec, config=ToMeConfig(ratio=float(params[0]), merge_mlp=params[1:] == ["mlp"], seed=0))
    if name == "uncached" and not params:
        return Method(spec)
    if name == "ditcache" and len(params) <= 1:
        if params and "tolerance" in forecast:
            raise ValueError("the tolerance is given twice: write ditcache:T or ditcache:tol=T.")
        tolerance = {"tolerance": float(params[0])} if params else {}
        return Method(spec, config=preset("ditcache", **tolerance, **forecast))
    if name == "fora" and len(params) in (1, 2):
        schedule = {"schedule": params[1]} if len(params) == 2 else {}
        return Method(spec, config=FORAConfig(cache_interval=int(params[0]), **schedule, **forecast))
    if name == "toca" and 2 <= len(params) <= 4:
        score = params[2] if len(params) > 2 else "auto"
        schedule = params[3] if len(params) > 3 else "constant"
        config = ToCaConfig(cache_interval=int(params[0]), cache_ratio=float(params[1]), score=score, schedule=schedule, **forecast)
        return Method(spec, config=config)
    if name in PEERS:
        return Method(spec, peer=DiffusersCache(spec))
    raise ValueError(
        "expected 'uncached', 'ditcache[:tolerance]', 'fora:N[:schedule][:order=K]', 'toca:N:R[:score[:schedule]][:order=K]', "
        f"'tome:R[:mlp]' or one of {', '.join(PEERS)} with an optional ':value'."
    )


@dataclass
class Row:
    method: str
    times: list[float] = field(default_factory=list)
    flops_counted: int = 0
    flops_engine: int | None = None
    cache_bytes: int = 0
    recompute_fraction: float = 0.0
    peak_memory: int | None = None
    graph_breaks: int | None = None  # with --compile: graph breaks while compiling this method
    recompiles: int | None = None  # with --compile: graphs compiled during the timed runs (0 = none)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def latent_size(text: str) -> tuple[int, int]:
    """``"32"`` or ``"32x64"`` (height x width, in latent pixels)."""
    height, _, width = text.partition("x")
    if not (height.isdigit() and (width.isdigit() or not width)) or int(height) < 1 or int(width or 1) < 1:
        raise ValueError(f"--size must be HEIGHT or HEIGHTxWIDTH in latent pixels (positive integers), got {text!r}.")
    return int(height), int(width or height)


def build(args):
    """The tiny pipeline of ``--model``'s family at ``--width``, in ``--dtype`` on ``--device``, and its call."""
    args.latent_size = latent_size(args.size)
    pipe, call = builders.bench_pipeline(bench_specs()[args.model], args)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    if args.dtype != "float32":
        pipe.to(dtype=getattr(torch, args.dtype))
    return pipe, call


def bench_specs() -> dict:
    """The families ``ditcache bench`` builds: those whose spec names a tiny builder."""
    return {spec.family: spec for spec in SPECS.values() if spec.tiny}


def run_once(pipe, call, device):
    """Seconds of one seeded call."""
    generator = torch.Generator(device).manual_seed(0)
    return Clock(device).timed(lambda: pipe(generator=generator, **call))[1]


def compile_blocks(transformer) -> None:
    """``torch.compile`` each transformer block (diffusers' regional compilation)."""
    if getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks()
    else:
        for block in transformer.transformer_blocks:
            block.compile()


def _compile_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def benchmark(args) -> list[Row]:
    with torch.device(args.device):  # random weights made where they run (FLUX.1-dev's 12B on the CPU take minutes)
        pipe, call = build(args)
    methods = {spec: parse_method(spec) for spec in args.methods}
    rows = {spec: Row(spec) for spec in methods}
    if args.compile:
        compile_blocks(pipe.transformer)
    run = lambda: run_once(pipe, call, args.device)  # noqa: E731
    with torch.inference_mode():
        count_methods(methods, rows, pipe, run, pipe.transformer, args.steps, args.quiet, call=call)
        time_methods(methods, rows, pipe, run, args.steps, args.warmup, args.repeats, args.quiet, args.compile, args.device, call)
    return list(rows.values())


def count_methods(methods: dict[str, Method], rows: dict[str, Row], target, run, module, steps: int, quiet: bool,
                  failed: dict[str, str] | None = None, call: dict | None = None) -> None:
    """Each method's FLOPs (``FlopCounterMode`` inside ``module``) and cache stats over one untimed, uncompiled
    ``run()`` of ``target``. With ``failed``, a peer that does not run on this model is left out of ``methods``
    and ``rows``, its error kept in ``failed``; without, the error stops the benchmark."""
    for spec, method in tqdm(list(methods.items()), desc="FLOPs", disable=quiet):
        method.apply(target, steps, call)
        try:
            with torch.compiler.set_stance("force_eager"):
                _, rows[spec].flops_counted = count_flops(run, module)
        except Exception as error:
            method.remove(target)
            if failed is None or method.peer is None:
                raise
            failed[spec] = f"{type(error).__name__}: {error}"
            del methods[spec], rows[spec]
            continue
        if method.config is not None:
            stats = cache_stats(target)
            rows[spec].flops_engine, rows[spec].cache_bytes = stats.flops, stats.cache_bytes
            rows[spec].recompute_fraction = stats.recompute_fraction
        method.remove(target)


def time_methods(methods: dict[str, Method], rows: dict[str, Row], target, run, steps: int, warmup: int, repeats: int,
                 quiet: bool, compiled: bool = False, device: str = "cpu", call: dict | None = None) -> None:
    """``warmup`` untimed then ``repeats`` timed ``run()`` of each method, their seconds in ``rows``: the
    methods interleaved, or, when ``compiled``, one method after the other so that each compiles in its own
    warm-up (switching hooks changes the compiled blocks' code)."""
    runs = range(warmup + repeats)
    grid = [(r, spec) for spec in methods for r in runs] if compiled else [(r, spec) for r in runs for spec in methods]
    for repeat, spec in tqdm(grid, desc="runs", disable=quiet):
        row, method = rows[spec], methods[spec]
        if compiled and repeat == 0:
            torch._dynamo.reset()
        method.apply(target, steps, call)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        breaks, graphs = _compile_counts()
        elapsed = run()
        if compiled and repeat == 0:
            row.graph_breaks, row.recompiles = _compile_counts()[0] - breaks, 0
        elif compiled and repeat >= warmup:
            row.recompiles += _compile_counts()[1] - graphs
        if repeat >= warmup:
            row.times.append(elapsed)
            if device.startswith("cuda"):
                row.peak_memory = torch.cuda.max_memory_allocated()
        method.remove(target)


def format_table(rows: list[Row]) -> str:
    base = rows[0]
    header = (
        f"{'method':<28} {'time s':>8} {'speedup':>8} {'GFLOPs':>9} {'FLOPs x':>8} {'efficiency':>10} "
        f"{'engine/counted':>14} {'recompute':>9} {'cache MiB':>9} {'peak MiB':>9}"
    )
    if rows[0].graph_breaks is not None:
        header += f" {'breaks':>6} {'recomp':>6}"
    lines = [header, "-" * len(header)]
    for row in rows:
        agree = f"{row.flops_engine / row.flops_counted:.3f}" if row.flops_engine else "-"
        peak = f"{row.peak_memory / 2**20:.0f}" if row.peak_memory else "-"
        speedup, flops_speedup = base.median / row.median, base.flops_counted / row.flops_counted
        lines.append(
            f"{row.method:<28} {row.median:>8.3f} {speedup:>8.2f} {row.flops_counted / 1e9:>9.1f} "
            f"{flops_speedup:>8.2f} {speedup / flops_speedup:>10.2f} {agree:>14} {row.recompute_fraction:>9.3f} "
            f"{row.cache_bytes / 2**20:>9.1f} {peak:>9}"
            + (f" {row.graph_breaks:>6} {row.recompiles:>6}" if row.graph_breaks is not None else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    """``ditcache bench`` with ``argv`` (see ``ditcache bench --help``): prints the table, returns its rows."""
    return run(cli.build_parser().parse_args(["bench", *(sys.argv[1:] if argv is None else argv)]))


def run(args: argparse.Namespace) -> list[Row]:
    """The benchmark of parsed ``ditcache bench`` arguments. Raises ``CommandError`` for a bad method spec,
    width or size, before anything is built."""
    args.device = cli.resolve_device(args.device)
    cli.steady_cpu_allocator(args.device)
    args.methods = list(args.methods or DEFAULT_METHODS)
    if args.methods[0] != "uncached":
        args.methods.insert(0, "uncached")  # the baseline every ratio is taken against
    if args.width not in builders.WIDTHS:
        raise cli.CommandError(f"--width must be one of {', '.join(builders.WIDTHS)}, got {args.width!r}")
    try:
        latent_size(args.size)
        methods = [parse_method(spec) for spec in args.methods]
    except ValueError as error:
        raise cli.CommandError(str(error)) from None
    generic = next(spec for spec in SPECS.values() if spec.family == args.model).adapter is None
    for method in methods:
        configs = method.config if isinstance(method.config, list) else [method.config]
        if generic and any(isinstance(config, ToMeConfig) for config in configs):
            raise cli.CommandError(f"method {method.spec!r}: {args.model} runs on the generic path, which has no token "
                                   "merging (ToMe needs a block adapter: dit, pixart, flux, opensora)")

    rows = benchmark(args)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    height, width = latent_size(args.size)
    print(
        f"{args.model} width={args.width} layers={args.layers} single_layers={args.single_layers} latents={height}x{width} "
        f"frames={args.frames} text_tokens={args.text_tokens} steps={args.steps} batch={args.batch} dtype={args.dtype} "
        f"device={args.device} ({device}, {torch.get_num_threads()} threads)"
    )
    print(format_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "device": device, "rows": [vars(r) | {"median": r.median} for r in rows]}, f, indent=2)
    return rows


if __name__ == "__main__":
    raise SystemExit(cli.main(["bench", *sys.argv[1:]]))
