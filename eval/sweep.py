"""``ditcache sweep CONFIG.yaml --output DIR``: a grid of caching methods on one pipeline, evaluated.

For every method of the config and every (prompt, seed) it writes an image, then for every method the
configured metrics, and finally ``results.csv``, ``results.json``, a speed-versus-quality plot and an
image grid per prompt (the first ``grid_prompts`` prompts). Layout of ``DIR``::

    manifest.json                  the resolved configuration; a different one is refused
    images/<method>-<hash>/        p00000-s0.png + p00000-s0.json (prompt, seed, latency) per image
    metrics/<method>-<hash>.json   finished metric values, keyed by what they depend on
    results.csv, results.json, speed_quality.png, grids/prompt-00000.png

Resumable: every file is written to a temporary name and renamed, an image counts as done when its
sidecar JSON exists, and finished metrics are kept, so rerunning the command after a crash or
``kill -9`` does only what is missing. Data parallel: under ``accelerate launch --num_processes N``
the processes share the images; the main process computes the metrics and writes the results. Each
image is generated alone from its own seed, so the split does not change any pixel.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import io
import itertools
import json
import numbers
import os
import re
import reprlib
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ditcache import cli
from ditcache.flops import count_flops
from ditcache.specs import SPECS

from . import builders
from .speed import parse_method

TINY_PIPELINES = {f"tiny-{spec.family}": getattr(builders, spec.tiny) for spec in SPECS.values() if spec.tiny}
FIDELITY_METRICS = ("psnr", "ssim", "lpips")  # against the uncached image of the same prompt and seed
PROMPT_METRICS = ("clip_score", "image_reward", "digits_accuracy")
SET_METRICS = ("fid", "kid")  # against a reference set: the uncached images, or a folder of real ones
DIGITS_FID = "digits_fid"  # the reference models' own distance, against the real digits (eval/digits.py)
VIDEO_METRICS = ("temporal_flickering", "subject_consistency", "background_consistency")  # VBench's, per video
METRICS = FIDELITY_METRICS + PROMPT_METRICS + SET_METRICS + (DIGITS_FID,) + VIDEO_METRICS
PLOT_AXES = {"speedup": "wall-clock speedup (x)", "flops_speedup": "FLOPs speedup (x)"}
BASELINE = "uncached"
MAX_SEED = 2**63 - 1  # int64, as numpy and pandas read the results back
MAX_SEED_COUNT = 1_000_000


@dataclass
class SweepConfig:
    """A sweep, as read from YAML (see ``eval/configs/``).

    ``methods`` take ``ditcache bench`` specs (``uncached``, ``fora:N``, ``toca:N:R[:score[:schedule]]``,
    ``fbc``, ``taylorseer:N``, ``magcache``, ``pab``) or a grid entry ``{grid: "toca:{n}:{r}", n: [3, 4],
    r: [0.8, 0.9]}``; ``uncached`` is always run, as the baseline of speedups and fidelity. ``seeds`` is a
    list of distinct seeds or a count ``N`` (seeds ``0 .. N-1``).
    ``prompts`` is a list, a file (``.txt`` one per line, ``.tsv``, ``.json``) or
    ``{file|dataset: ..., column: ..., split: ..., limit: ...}``; for DiT a prompt is an ImageNet label
    name or a class index. ``metric_options``: ``clip_score: {model: PATH}``, ``image_reward:
    {model: PATH, tokenizer: PATH}``, ``lpips: {weights: PATH}``, ``fid: {reference: uncached | DIR,
    feature: 2048 | "module:function", weights: PATH}`` (``fid`` and ``kid`` share these; a
    ``module:function`` feature is any ``nn.Module`` the function returns, and the results then name it
    in ``fid_feature``). On the digits reference models: ``digits_accuracy`` (the classifier reads the
    asked digit) and ``digits_fid`` (against the real digits, in the classifier's features). Video
    pipelines (OpenSora: ``call: {num_frames: 51}``) store each video as one PNG strip of its frames, and
    add VBench's ``temporal_flickering``, ``subject_consistency`` (``{model: DINO folder}``) and
    ``background_consistency`` (``{model: CLIP folder}``); the image metrics read the strip. A relative
    ``pipeline`` path is taken from the config file's folder.
    """

    pipeline: str
    methods: list[str]
    prompts: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 28
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    dtype: str = "float32"
    metrics: list[str] = field(default_factory=lambda: ["psnr", "ssim"])
    metric_options: dict = field(default_factory=dict)
    call: dict = field(default_factory=dict)  # any other pipeline argument
    grid_prompts: int = 8
    plot_x: str = "speedup"  # or "flops_speedup"

    def __post_init__(self):
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"metrics: unknown {unknown}; known: {', '.join(METRICS)}")
        if BASELINE not in self.methods:
            self.methods.insert(0, BASELINE)
        for spec in self.methods:
            parse_method(spec)  # a bad spec fails now, not after hours of generation
        self.seeds = check_seeds(self.seeds)
        if not self.prompts:
            raise ValueError("prompts must not be empty")
        if not (_is_int(self.steps) and self.steps >= 1):
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.plot_x not in PLOT_AXES:
            raise ValueError(f"plot_x must be one of {', '.join(PLOT_AXES)}, got {self.plot_x!r}")

    def folder(self, method: str) -> str:
        """Images of one method live here; the hash covers everything that changes their pixels."""
        key = json.dumps([self.pipeline, self.dtype, self.steps, self.height, self.width, self.guidance_scale, self.call, method])
        return f"{method.replace(':', '_')}-{_digest(key)}"


def check_seeds(seeds) -> list[int]:
    """The seeds as a list, from a list of distinct seeds or a count ``N`` (seeds ``0 .. N-1``)."""
    if _is_int(seeds) and 1 <= seeds <= MAX_SEED_COUNT:
        return list(range(seeds))
    if isinstance(seeds, list) and all(_is_int(s) and 0 <= s <= MAX_SEED for s in seeds):
        if seeds and len(set(seeds)) == len(seeds):
            return [int(s) for s in seeds]
    raise ValueError(
        f"`seeds` must be a list of distinct integers in [0, {MAX_SEED}] or a count in [1, {MAX_SEED_COUNT}], "
        f"got {reprlib.repr(seeds)}."
    )


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def expand_methods(entries: list) -> list[str]:
    """Method specs, with ``{grid: template, name: [values], ...}`` entries expanded."""
    specs = []
    for entry in entries:
        if isinstance(entry, str):
            specs.append(entry)
            continue
        template, axes = entry["grid"], {k: v if isinstance(v, list) else [v] for k, v in entry.items() if k != "grid"}
        for values in itertools.product(*axes.values()):
            specs.append(template.format(**dict(zip(axes, values))))
    return list(dict.fromkeys(specs))


def load_prompts(source, base: Path) -> list[str]:
    """Prompts from a list, a ``.txt``/``.tsv``/``.json`` file (relative to ``base``) or a dataset id."""
    if isinstance(source, list):
        return [str(p) for p in source]
    options = {"file": source} if isinstance(source, str) else dict(source)
    column, limit = options.get("column"), options.get("limit")
    if "dataset" in options:
        from datasets import load_dataset  # online only: a Hugging Face dataset id

        rows = load_dataset(options["dataset"], split=options.get("split", "train"))
        prompts = [str(row[column or "prompt"]) for row in rows]
    else:
        path = base / options["file"]
        if path.suffix == ".tsv":
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f, delimiter="\t"))
            column = column or next(c for c in rows[0] if c.lower() in ("prompt", "prompts", "caption", "text"))
            prompts = [row[column] for row in rows]
        elif path.suffix == ".json":
            items = json.loads(path.read_text())
            prompts = [item if isinstance(item, str) else item[column or "prompt"] for item in items]
        else:
            prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts[:limit] if limit else prompts


def load_config(path: str | os.PathLike) -> SweepConfig:
    import yaml

    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    raw["methods"] = expand_methods(raw.get("methods", []))
    raw["prompts"] = load_prompts(raw["prompts"], path.parent)
    if (path.parent / raw["pipeline"]).is_dir():
        raw["pipeline"] = str((path.parent / raw["pipeline"]).resolve())
    unknown = sorted(set(raw) - set(SweepConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {', '.join(SweepConfig.__dataclass_fields__)}")
    return SweepConfig(**raw)


# -- files ---------------------------------------------------------------------------------------
def atomic_write(path: Path, data: bytes) -> None:
    """Write by renaming a complete temporary file: a crash leaves the old file or none, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def write_json(path: Path, value) -> None:
    atomic_write(path, json.dumps(value, indent=2).encode())


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def check_manifest(output: Path, config: SweepConfig, allow_changed: bool) -> None:
    """Refuse to mix two different sweeps in one folder unless asked."""
    manifest = output / "manifest.json"
    current = asdict(config)
    if manifest.exists():
        previous = json.loads(manifest.read_text())
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if changed and not allow_changed:
            raise SystemExit(
                f"{output} holds a sweep with a different configuration (changed: {', '.join(changed)}). "
                "Use another --output, or pass --allow-changed to go on here (images whose method and "
                "generation settings are unchanged are kept; every result is recomputed as needed)."
            )
    write_json(manifest, current)


# -- generation ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One image: a method's folder, a prompt index and a seed."""

    folder: str
    method: str
    index: int
    seed: int

    @property
    def stem(self) -> str:
        return f"p{self.index:05d}-s{self.seed}"


def units(config: SweepConfig) -> list[Unit]:
    return [
        Unit(config.folder(method), method, index, seed)
        for method in config.methods
        for index in range(len(config.prompts))
        for seed in config.seeds
    ]


def is_done(output: Path, unit: Unit, prompt: str) -> bool:
    sidecar = output / "images" / unit.folder / f"{unit.stem}.json"
    return sidecar.exists() and json.loads(sidecar.read_text())["prompt"] == prompt


def load_pipeline(config: SweepConfig, device: str):
    dtype = getattr(torch, config.dtype)
    if config.pipeline in TINY_PIPELINES:  # seeded builders: every process gets the same weights
        pipe = TINY_PIPELINES[config.pipeline]()
        return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)
    from ditcache.pipelines.toca_pipeline import pipeline_loader

    return pipeline_loader(config.pipeline).from_pretrained(config.pipeline, dtype=dtype).to(device)


def call_arguments(pipe, config: SweepConfig, prompt: str, seed: int, device: str) -> dict:
    call = {"num_inference_steps": config.steps, "output_type": "pil", **config.call}
    call["generator"] = torch.Generator(device).manual_seed(seed)
    if hasattr(pipe, "get_label_ids"):  # DiT: class-conditional
        call["class_labels"] = [int(prompt)] if prompt.isdigit() else pipe.get_label_ids([prompt])
    else:
        call["prompt"] = prompt
        call |= {k: v for k, v in (("height", config.height), ("width", config.width)) if v is not None}
    if config.guidance_scale is not None:
        call["guidance_scale"] = config.guidance_scale
    return call


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def generate(pipe, config: SweepConfig, output: Path, mine: list[Unit], device: str, quiet: bool, position: int) -> None:
    """Generate this process's images, one method at a time, each after one untimed warm-up call (a
    method's first call pays one-off costs: its latency would be the warm-up, not the method)."""
    overall = tqdm(total=len(mine), desc="images", position=position, disable=quiet)
    for method_spec, group in itertools.groupby(mine, key=lambda u: u.method):
        group = list(group)
        method = parse_method(method_spec)
        method.apply(pipe, config.steps)
        try:
            pipe(**call_arguments(pipe, config, config.prompts[group[0].index], group[0].seed, device))
            for unit in tqdm(group, desc=method_spec, leave=False, disable=quiet):
                prompt = config.prompts[unit.index]
                call = call_arguments(pipe, config, prompt, unit.seed, device)
                _synchronize(device)
                start = time.perf_counter()
                result = pipe(**call)
                _synchronize(device)
                latency = time.perf_counter() - start
                frames = result.frames[0] if hasattr(result, "frames") else [result.images[0]]
                folder = output / "images" / unit.folder
                atomic_write(folder / f"{unit.stem}.png", png_bytes(frame_strip(frames)))
                sidecar = {"prompt": prompt, "seed": unit.seed, "method": method_spec, "latency_s": latency}
                write_json(folder / f"{unit.stem}.json", sidecar | ({"frames": len(frames)} if len(frames) > 1 else {}))
                overall.update()
        finally:
            method.remove(pipe)
    overall.close()


def frame_strip(frames: list[Image.Image]) -> Image.Image:
    """A video's frames side by side, left to right (one frame: the image itself)."""
    strip = Image.new("RGB", (sum(frame.width for frame in frames), frames[0].height))
    for index, frame in enumerate(frames):
        strip.paste(frame, (index * frames[0].width, 0))
    return strip


def strip_to_video(strip: torch.Tensor, frames: int) -> torch.Tensor:
    """``(3, H, T * W)`` to ``(T, 3, H, W)``."""
    return strip.unflatten(-1, (frames, -1)).permute(2, 0, 1, 3)


# -- metrics -------------------------------------------------------------------------------------
class ImageFiles:
    """Images on disk, loaded on slicing as a ``(N, 3, H, W)`` uint8 tensor (the metrics' input),
    resized and centre-cropped to ``size`` when given (reference sets of real images)."""

    def __init__(self, paths: list[Path], size: tuple[int, int] | None = None):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, selection: slice) -> torch.Tensor:
        return torch.stack([self._load(path) for path in self.paths[selection]])

    def _load(self, path: Path) -> torch.Tensor:
        from PIL import ImageOps

        image = Image.open(path).convert("RGB")
        if self.size is not None and image.size != self.size[::-1]:
            image = ImageOps.fit(image, self.size[::-1], Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


class Evaluator:
    """Computes the configured metrics of one method's images; the models load once, when first needed."""

    def __init__(self, config: SweepConfig, output: Path, device: str):
        self.config, self.output, self.device = config, output, device
        self.options = config.metric_options
        self._models: dict[str, object] = {}

    def _model(self, name: str):
        from . import metrics

        if name not in self._models:
            options = self.options.get(name, {})
            if name == "clip_score":
                self._models[name] = metrics.CLIPScorer.from_pretrained(options.get("model"), self.device)
            elif name == "lpips":
                self._models[name] = metrics.LPIPS(options.get("weights")).to(self.device)
            elif name == "image_reward":
                from .image_reward import ImageReward

                self._models[name] = ImageReward.from_pretrained(options.get("model"), options.get("tokenizer")).to(self.device)
            elif name == "subject_consistency":
                from .vbench import SubjectConsistency

                self._models[name] = SubjectConsistency(options.get("model"), self.device)
            elif name == "background_consistency":
                from .vbench import BackgroundConsistency

                self._models[name] = BackgroundConsistency(options.get("model"), self.device)
            elif name in ("digits_accuracy", DIGITS_FID):
                from .digits import DigitClassifier

                self._models[name] = DigitClassifier.from_pretrained(**options).to(self.device)
        return self._models[name]

    def paths(self, method: str) -> list[Path]:
        folder = self.output / "images" / self.config.folder(method)
        return [folder / f"{u.stem}.png" for u in units(self.config) if u.method == method]

    def prompts(self) -> list[str]:
        return [self.config.prompts[i] for i in range(len(self.config.prompts)) for _ in self.config.seeds]

    def compute(self, name: str, method: str, batch_size: int = 16) -> dict[str, float]:
        from . import metrics

        images = ImageFiles(self.paths(method))
        if name in VIDEO_METRICS:
            from . import vbench

            scorer = vbench.temporal_flickering if name == "temporal_flickering" else self._model(name)
            values = []
            for path in self.paths(method):
                frames = json.loads(path.with_suffix(".json").read_text()).get("frames", 1)
                video = strip_to_video(ImageFiles([path])[0:1][0], frames)
                values.append(scorer(video[None]).float().cpu())
            return {name: float(torch.cat(values).mean())}
        if name in FIDELITY_METRICS:
            baseline = ImageFiles(self.paths(BASELINE))
            function = {"psnr": metrics.psnr, "ssim": metrics.ssim}.get(name) or self._model("lpips")
            values = [function(images[s : s + batch_size].to(self.device), baseline[s : s + batch_size].to(self.device)) for s in range(0, len(images), batch_size)]
            return {name: float(torch.cat(values).float().mean())}
        if name in PROMPT_METRICS:
            prompts, model = self.prompts(), self._model(name)
            values = []
            for s in range(0, len(images), batch_size):
                batch, batch_prompts = metrics.as_float(images[s : s + batch_size]).to(self.device), prompts[s : s + batch_size]
                if name == "clip_score":
                    values.append(model.cosines(batch, batch_prompts))
                elif name == "image_reward":
                    values.append(model.score(batch_prompts, batch).cpu())
                else:
                    from .digits import label_of

                    values.append((model(batch).argmax(-1).cpu() == torch.tensor([label_of(p) for p in batch_prompts])).float())
            values = torch.cat(values)
            return {name: metrics.CLIPScorer.aggregate(values) if name == "clip_score" else float(values.mean())}
        if name == DIGITS_FID:
            from .digits import DigitFeatures, load_images

            real = metrics.as_uint8(load_images(size=images[0:1].shape[-1])[0])
            return {DIGITS_FID: metrics.feature_distances(images, real, feature=DigitFeatures(self._model(name)))["fid"]}
        options, folder = self.options.get("fid", {}), self.reference()
        if folder is None:
            references = ImageFiles(self.paths(BASELINE))
        else:
            files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
            references = ImageFiles(files, size=tuple(images[0:1].shape[-2:]))
        feature = options.get("feature", 2048)
        if isinstance(feature, str):  # "module:function" returning an nn.Module
            module, _, function = feature.partition(":")
            feature = getattr(importlib.import_module(module), function)()
        return metrics.feature_distances(images, references, feature=feature, weights_path=options.get("weights"))

    def reference(self) -> Path | None:
        """The folder of real images FID/KID compare against; None for the uncached images."""
        reference = self.options.get("fid", {}).get("reference", BASELINE)
        return None if reference == BASELINE else Path(reference)

    def key(self, name: str) -> str:
        """What a metric value depends on besides the images: the prompts, seeds and its options."""
        return _digest(json.dumps([name, self.config.prompts, self.config.seeds, self.options.get(name, {})], sort_keys=True))


def computations(config: SweepConfig) -> list[str]:
    """The metric computations a sweep needs: FID and KID come from one pass, named ``fid``."""
    names = [m for m in config.metrics if m not in SET_METRICS]
    return names + (["fid"] if set(SET_METRICS) & set(config.metrics) else [])


def evaluate(pipe, config: SweepConfig, output: Path, device: str, quiet: bool) -> list[dict]:
    """Per method: latency and FLOPs, then each metric, kept in ``metrics/`` as soon as it is done."""
    evaluator = Evaluator(config, output, device)
    rows = []
    for method_spec in tqdm(config.methods, desc="metrics", disable=quiet):
        folder = config.folder(method_spec)
        record_path = output / "metrics" / f"{folder}.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        if "flops" not in record:
            method = parse_method(method_spec)
            method.apply(pipe, config.steps)
            try:
                call = call_arguments(pipe, config, config.prompts[0], config.seeds[0], device)
                _, record["flops"] = count_flops(lambda: pipe(**call), pipe.transformer)
            finally:
                method.remove(pipe)
            write_json(record_path, record)
        for name in computations(config):
            against_baseline = name in FIDELITY_METRICS or (name == "fid" and evaluator.reference() is None)
            if against_baseline and method_spec == BASELINE:
                continue  # the baseline against itself
            key = evaluator.key(name)
            if record.get(name, {}).get("key") != key:
                record[name] = {"key": key, "values": evaluator.compute(name, method_spec)}
                write_json(record_path, record)
        sidecars = [json.loads(p.with_suffix(".json").read_text()) for p in evaluator.paths(method_spec)]
        row = {"method": method_spec, "folder": folder, "images": len(sidecars),
               "latency_s": statistics.median(s["latency_s"] for s in sidecars), "flops": record["flops"]}
        for name in computations(config):
            values = record.get(name, {}).get("values", {})
            row |= {k: v for k, v in values.items() if k in config.metrics or (k.startswith("kid") and "kid" in config.metrics)}
        if "fid" in computations(config) and method_spec != BASELINE:
            row["fid_feature"] = str(config.metric_options.get("fid", {}).get("feature", 2048))
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["speedup"] = base["latency_s"] / row["latency_s"]
        row["flops_speedup"] = base["flops"] / row["flops"]
    return rows


# -- reports -------------------------------------------------------------------------------------
TIMING_COLUMNS = ("latency_s", "speedup")  # the only columns that differ between two runs of a sweep


def write_results(output: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(output / "results.csv", buffer.getvalue().encode())
    write_json(output / "results.json", rows)


def quality_columns(rows: list[dict]) -> list[str]:
    columns = ("psnr", "ssim", "lpips", "clip_score", "image_reward", "digits_accuracy", "fid", "kid_mean", DIGITS_FID)
    return [c for c in columns if any(c in row for row in rows)]


def method_family(method: str) -> str:
    """A method with its first number (the interval or threshold) replaced by ``N``: the points of one
    family differ only in how hard they cache, and are joined by a line in the plot."""
    return re.sub(r"^([a-z]+):[0-9.]+", r"\1:N", method)


def plot_speed_quality(output: Path, rows: list[dict], x: str = "speedup") -> None:
    """One panel per quality metric: its value against the speedup (``x``: wall clock or FLOPs), a point
    per method, the methods of one family (see ``method_family``) joined from fast to slow."""
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


# -- entry point ---------------------------------------------------------------------------------
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
    pending = [u for u in units(config) if not is_done(output, u, config.prompts[u.index])]
    with state.split_between_processes(pending) as mine:
        with torch.inference_mode():
            generate(pipe, config, output, mine, device, quiet, state.process_index)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    with torch.inference_mode():
        rows = evaluate(pipe, config, output, device, quiet)
    write_results(output, rows)
    plot_speed_quality(output, rows, config.plot_x)
    plot_grids(output, config)
    if not quiet:
        print(format_results(rows))
        print(f"{len(pending)} images generated now, {len(units(config)) - len(pending)} already there; results in {output}")
    return rows


def main(argv: list[str] | None = None) -> None:
    """``ditcache sweep`` with ``argv`` (also ``python -m ditcache.eval.sweep``, e.g. under ``accelerate launch``)."""
    run_from_arguments(cli.build_parser().parse_args(["sweep", *(sys.argv[1:] if argv is None else argv)]))


def run_from_arguments(args: argparse.Namespace) -> None:
    """Run parsed ``ditcache sweep`` arguments; an unreadable or malformed configuration raises ``CommandError``."""
    import yaml

    path = Path(args.config)
    if not path.is_file():
        raise cli.CommandError(f"no sweep configuration at {path}")
    try:
        config = load_config(path)
    except (ValueError, KeyError, TypeError, yaml.YAMLError) as error:
        raise cli.CommandError(f"{path}: {error}") from None
    if args.quiet:
        cli.hide_loading_bars()
    device = cli.resolve_device(args.device)
    if device == "cuda":  # one GPU per process under accelerate launch
        from accelerate import PartialState

        device = str(PartialState().device)
    run(config, Path(args.output), device, args.allow_changed, args.quiet)


if __name__ == "__main__":
    raise SystemExit(cli.main(["sweep", *sys.argv[1:]]))
