"""Gaps at matched FLOPs: how far a method ("ours") lies above or below the envelope of the others.

Pure arithmetic on (FLOPs speedup, quality) points, shared by ``ditcache sweep`` (its ``ours``) and
``eval/equal_memory.py``.

The interpolation: a method family's value at a speedup ``x`` (``at``) is its Pareto front (the points no faster
point of the family beats) joined linearly in quality against FLOPs speedup, where ``x`` lies within the front, and
never below its best point that saves at least ``x`` (a faster setting serves any slower speed); there is no value
beyond the family's fastest point (no extrapolation). The envelope at ``x`` is the best value of any other family
there, each family joined along its own front only (two families' points are never joined to each other). A gap is
ours minus the envelope, in the metric's units (dB for PSNR), positive where ours is better.
"""

from __future__ import annotations

import re

GAP_SPEEDUPS = (1.25, 1.5, 2, 3, 4, 5, 6, 8)


def method_family(method: str) -> str:
    """A method with its first number (the interval or threshold) replaced by ``N``: the points of one
    family differ only in how hard they cache."""
    return re.sub(r"^([a-z]+):[0-9.]+", r"\1:N", method)


def pareto_front(points: list[tuple[float, float]], lower_is_better: bool = False) -> list[tuple[float, float]]:
    """The (speedup, quality) points no other point beats in both speedup and quality, by rising speedup."""
    front, best = [], None
    for speedup, value in sorted(points, key=lambda p: (-p[0], p[1] if lower_is_better else -p[1])):
        if best is None or (value < best if lower_is_better else value > best):
            front.append((speedup, value))
            best = value
    return front[::-1]


def at(points: list[tuple[float, float]], speed: float) -> float | None:
    """The quality of a family's ``points`` at ``speed`` (see the module's docstring); None where no point is that
    fast."""
    line = pareto_front(points)
    found = [value for s, value in points if s >= speed]
    for (x0, y0), (x1, y1) in zip(line, line[1:]):
        if x0 <= speed <= x1:
            found.append(y0 + (y1 - y0) * (speed - x0) / (x1 - x0))
    return max(found, default=None)


def gap_rows(points: dict[str, list[tuple[float, float]]], ours: list[str],
             speedups: tuple[float, ...] = GAP_SPEEDUPS) -> list[dict]:
    """For each speedup: the others' envelope and each of ``ours`` (keys of ``points``, a family's points each)
    with its gap; None where a side has no point that fast."""
    others = [family for family in points if family not in ours]
    rows = []
    for speed in speedups:
        theirs = max((v for family in others if (v := at(points[family], speed)) is not None), default=None)
        row = {"speedup": speed, "envelope": theirs}
        for family in ours:
            mine = at(points[family], speed)
            row[family] = mine
            row[f"{family} gap"] = None if mine is None or theirs is None else mine - theirs
        rows.append(row)
    return rows


def format_gaps(rows: list[dict], ours: list[str], metric: str = "PSNR (dB)") -> str:
    """``gap_rows`` as a Markdown table: the envelope, and each of ours as "value (gap)"."""
    lines = [f"| FLOPs speedup | others' envelope, {metric} | " + " | ".join(f"{family}: value (gap)" for family in ours) + " |",
             "|---|---|" + "---|" * len(ours)]
    for row in rows:
        cells = []
        for family in ours:
            mine, gap = row[family], row[f"{family} gap"]
            cells.append("-" if mine is None else f"{mine:.2f}" + ("" if gap is None else f" ({gap:+.2f})"))
        envelope = "-" if row["envelope"] is None else f"{row['envelope']:.2f}"
        lines.append(f"| {row['speedup']:g} | {envelope} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
