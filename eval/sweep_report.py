"""A sweep's report: ``results.csv``/``results.json``, the speed-versus-quality plot, an image grid per
prompt, and the table printed at the end."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from PIL import Image

from .gaps import format_gaps, gap_rows, method_family, pareto_front
from .sweep_config import DIGITS_FID, PLOT_AXES, SCENES_FID, SweepConfig
from .sweep_generation import Unit, atomic_write, write_json

TIMING_COLUMNS = ("latency_s", "speedup")  # the only columns that differ between two runs of a sweep


def write_results(output: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(output / "results.csv", buffer.getvalue().encode())
    write_json(output / "results.json", rows)


LOWER_IS_BETTER = ("lpips", "fid", "kid_mean", DIGITS_FID, SCENES_FID)


def quality_columns(rows: list[dict]) -> list[str]:
    columns = ("psnr", "ssim", "lpips", "clip_score", "image_reward", "digits_accuracy", "scenes_accuracy",
               "scenes_accuracy_prompt", "fid", "kid_mean", DIGITS_FID, SCENES_FID)
    return [c for c in columns if any(c in row for row in rows)]


def plot_speed_quality(output: Path, rows: list[dict], x: str = "speedup") -> None:
    """One panel per quality metric: its value against the speedup (``x``: wall clock or FLOPs), a point
    per method, the methods of one family (see ``method_family``) joined from fast to slow, and the Pareto
    front of all of them (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = quality_columns(rows)
    if not columns:
        return
    families = list(dict.fromkeys(method_family(row["method"]) for row in rows))
    figure, axes = plt.subplots(1, len(columns), figsize=(5.5 * len(columns), 4.5), squeeze=False)
    for ax, column in zip(axes[0], columns):
        for number, family in enumerate(families):
            points = sorted((row[x], row[column], row["method"]) for row in rows if column in row and method_family(row["method"]) == family)
            if not points:
                continue
            style = {"color": f"C{number % 10}", "marker": "os^Dv"[number // 10 % 5]}
            ax.plot([p[0] for p in points], [p[1] for p in points], label=family, linewidth=1, markersize=4, **style)
            for speedup, value, label in points:
                ax.annotate(label.split(":")[1] if label.count(":") else label, (speedup, value), fontsize=6,
                            xytext=(2, 2), textcoords="offset points", color=style["color"])
        front = pareto_front([(row[x], row[column]) for row in rows if column in row], column in LOWER_IS_BETTER)
        ax.plot(*zip(*front), color="black", linestyle="--", linewidth=0.8, alpha=0.6, label="Pareto front")
        ax.set(xlabel=PLOT_AXES[x], ylabel=column, title=f"{column} vs {PLOT_AXES[x].split(' (')[0]}")
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5), title="method (N: the number on each point)", title_fontsize=6)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write(output / "speed_quality.png", buffer.getvalue())


def plot_grids(output: Path, config: SweepConfig) -> None:
    """For each of the first prompts (first seed): every method's image side by side, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for index in range(min(config.grid_prompts, len(config.prompts))):
        stem = Unit("", "", index, config.seeds[0]).stem
        figure, axes = plt.subplots(1, len(config.methods), figsize=(2.6 * len(config.methods), 3), squeeze=False)
        for ax, method in zip(axes[0], config.methods):
            ax.imshow(Image.open(output / "images" / config.folder(method) / f"{stem}.png"))
            ax.set_title(method, fontsize=8)
            ax.axis("off")
        figure.suptitle(f"{config.prompts[index][:80]} (seed {config.seeds[0]})", fontsize=9)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        plt.close(figure)
        atomic_write(output / "grids" / f"prompt-{index:05d}.png", buffer.getvalue())


def format_results(rows: list[dict]) -> str:
    columns = ["speedup", "flops_speedup", *quality_columns(rows)]
    header = f"{'method':<28} {'images':>6} {'latency s':>9} " + " ".join(f"{c:>12}" for c in columns)
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = " ".join(f"{row[c]:>12.4g}" if c in row else f"{'-':>12}" for c in columns)
        lines.append(f"{row['method']:<28} {row['images']:>6} {row['latency_s']:>9.3f} {cells}")
    return "\n".join(lines)


def gap_families(rows: list[dict], config: SweepConfig) -> dict[str, list[tuple[float, float]]]:
    """Each method family's (FLOPs speedup, PSNR) points, the uncached baseline left out; a method named in
    ``config.ours`` alone is a family of its own."""
    families: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row["method"] == "uncached" or "psnr" not in row or "flops_speedup" not in row:
            continue
        name = row["method"] if row["method"] in config.ours else method_family(row["method"])
        families.setdefault(name, []).append((row["flops_speedup"], row["psnr"]))
    return families


def write_gaps(output: Path, rows: list[dict], config: SweepConfig) -> str | None:
    """``gaps.md``: each of ``config.ours`` against the envelope of every other method, PSNR at matched FLOPs
    (``eval/gaps.py``); its text, None without ``ours``."""
    if not config.ours:
        return None
    families = gap_families(rows, config)
    ours = [name for name in config.ours if name in families]
    table = format_gaps(gap_rows(families, ours, tuple(config.gap_speedups)), ours)
    others = ", ".join(f"`{name}`" for name in families if name not in ours)
    text = (f"{config.steps} steps; PSNR (dB) against uncached at matched FLOPs; the envelope of {others} "
            "(each family joined along its own Pareto front: eval/gaps.py)\n\n" + table + "\n")
    atomic_write(output / "gaps.md", text.encode())
    return text
