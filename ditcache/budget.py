"""A cache memory budget, and the order in which the engine gives things up to meet it.

Pure data: ``ditcache.memory`` measures what each ``CacheLayout`` holds for a call and picks the first of
``layouts_to_try`` that fits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
WHOLE_CHAIN = 10_000  # a span longer than any model: one residual per unbroken run of blocks
# The residual layouts a budget tries, finest first: per block, spans of more and more blocks, one per chain.
SPANS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, WHOLE_CHAIN)
_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


@dataclass(frozen=True)
class CacheLayout:
    """How a run keeps its caches: per branch (``span=0``), or as the residual of each span of ``span``
    consecutive blocks (``1``: per block; ``ditcache.residual``); values and forecast differences in
    ``precision`` (``ditcache.codecs``), forecasts of at most ``order``."""

    span: int = 0
    precision: str = "model"
    order: int = 0

    def __str__(self) -> str:
        layout = {0: "branch", 1: "block", WHOLE_CHAIN: "chain"}.get(self.span, f"span:{self.span}")
        return f"{layout}, {self.precision}, order {self.order}"


@dataclass(frozen=True)
class MemoryBudget:
    """At most ``bytes``, or at most ``hidden_states`` times H, the bytes of one hidden-state tensor of a call
    (the hidden states a block returns, with the text stream where it returns that too), for all guidance
    streams together."""

    bytes: int | None = None
    hidden_states: float | None = None

    def limit(self, hidden_bytes: int) -> int:
        return self.bytes if self.bytes is not None else int(self.hidden_states * hidden_bytes)

    def __str__(self) -> str:
        return f"{self.bytes} bytes" if self.bytes is not None else f"{self.hidden_states:g}H"


def parse_budget(value: int | str) -> MemoryBudget:
    """``cache_memory`` as given: an integer (bytes) or a string such as ``"4GiB"``, ``"500MB"`` or ``"8H"``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"`cache_memory` must be bytes (an integer) or a string such as '4GiB' or '8H', got {value!r}.")
    if isinstance(value, int):
        number, unit = float(value), "B"
    else:
        match = _BUDGET.match(value)
        unit = match.group(2).upper() if match else ""
        if match is None or (unit not in UNITS and unit != "H"):
            raise ValueError(f"`cache_memory` must be bytes or a number with a unit ({', '.join(['B', 'KiB', 'MiB', 'GiB', 'TiB', 'KB', 'MB', 'GB', 'TB', 'H'])}), "
                             f"e.g. '4GiB' or '8H'; got {value!r}.")
        number = float(match.group(1))
    if unit == "H":
        if number < 0.25:
            raise ValueError(f"`cache_memory` must be at least 0.25H (the smallest layout keeps one residual of the whole "
                             f"model in float8 per guidance stream: half an H of a bf16 model, a quarter of an fp32 one), got {value!r}.")
        return MemoryBudget(hidden_states=number)
    size = int(number * UNITS[unit])
    if size < 1:
        raise ValueError(f"`cache_memory` must be at least 1 byte, got {value!r}.")
    return MemoryBudget(bytes=size)


PRECISIONS_TO_TRY = ("model", "float8_differences", "float8")


def layouts_to_try(own: CacheLayout, residual: bool) -> list[CacheLayout]:
    """The layouts a budget tries, best first; the first that fits is kept. The config's own; where the model and
    the config allow residuals, each residual layout from per block to one per chain of blocks, each in the
    model's precision, then with its forecast differences in float8, then all in float8; else the config's own
    layout in those precisions; and only then the same at each lower forecast order. Measured on the references
    at 50 steps (eval/BENCHMARKS.md, "A cache memory budget"): a lower order costs 5-10 dB; the differences in
    float8 cost nothing measurable (within 0.1 dB); at fixed intervals a residual layout holds what the branches
    hold (a span's residual is the sum of its blocks' and forecasts are linear), and under error control the finer
    the spans the better the measured error steers (per block about the branches' quality, per chain 1-4 dB
    below); all in float8 costs 0-2 dB and, per block, holds less than the branches at better quality."""
    layouts = []
    for order in range(own.order, -1, -1):
        layouts.append(CacheLayout(own.span, own.precision, order))
        spans = [span for span in SPANS if span >= max(own.span, 1)] if residual else [own.span]
        layouts += [CacheLayout(span, precision, order) for span in spans for precision in PRECISIONS_TO_TRY]
    return list(dict.fromkeys(layouts))


def readable_bytes(size: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if size >= UNITS[unit.upper()]:
            return f"{size / UNITS[unit.upper()]:.2f} {unit}"
    return f"{size} bytes"
