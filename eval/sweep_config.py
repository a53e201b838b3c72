"""A sweep's configuration: what a YAML file under ``eval/configs/`` may say, checked when it is read."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import numbers
import os
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .gaps import GAP_SPEEDUPS, method_family
from .speed import parse_method

FIDELITY_METRICS = ("psnr", "ssim", "lpips")  # against the uncached image of the same prompt and seed
PROMPT_METRICS = ("clip_score", "image_reward", "digits_accuracy", "scenes_accuracy")  # scenes_accuracy: eval/scenes.py's judge
SET_METRICS = ("fid", "kid")  # against a reference set: the uncached images, or a folder of real ones
DIGITS_FID = "digits_fid"  # the reference models' own distance, against the real digits (eval/digits.py)
SCENES_FID = "scenes_fid"  # the same on the named objects' cut-outs, against held-out real scenes (eval/scenes.py)
VIDEO_METRICS = ("temporal_flickering", "subject_consistency", "background_consistency")  # VBench's, per video
METRICS = FIDELITY_METRICS + PROMPT_METRICS + SET_METRICS + (DIGITS_FID, SCENES_FID) + VIDEO_METRICS
PLOT_AXES = {"speedup": "wall-clock speedup (x)", "flops_speedup": "FLOPs speedup (x)"}
BASELINE = "uncached"
MAX_SEED = 2**63 - 1  # int64, as numpy and pandas read the results back
MAX_SEED_COUNT = 1_000_000
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class SweepConfig:
    """A sweep, as read from YAML (see ``eval/configs/``).

    ``methods`` take ``ditcache bench`` specs (``uncached``, ``fora:N``, ``toca:N:R[:score[:schedule]]``,
    ``fbc``, ``taylorseer:N``, ``magcache``, ``pab``, ``dbcache[:threshold[:taylorseer_order]]``) or a grid entry ``{grid: "toca:{n}:{r}", n: [3, 4],
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
    ``pipeline`` path is taken from the config file's folder. A peer whose package is not installed
    (``dbcache`` without ``cache-dit``) is left out, named in ``skipped``. On the scenes reference:
    ``scenes_accuracy`` (the judge of ``eval/scenes.py``: per named object, and ``scenes_accuracy_prompt``
    per whole prompt) and ``scenes_fid`` (the objects' cut-outs against held-out real scenes').
    ``ours``: method families (``ditcache:N``: a method with its first number as ``N``) or methods whose gap to the
    envelope of all the other methods, PSNR at matched FLOPs, the report gives at ``gap_speedups``
    (``eval/gaps.py`` documents the interpolation); it needs ``psnr`` among the metrics.
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
    batch_size: int = 1  # images per pipeline call (each with its own seed's generator)
    ours: list[str] = field(default_factory=list)  # method families (or methods) reported against all the others
    gap_speedups: list[float] = field(default_factory=lambda: list(GAP_SPEEDUPS))

    def __post_init__(self):
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"metrics: unknown {unknown}; known: {', '.join(METRICS)}")
        if BASELINE not in self.methods:
            self.methods.insert(0, BASELINE)
        for spec in self.methods:
            parse_method(spec)  # a bad spec fails now, not after hours of generation
        self.skipped = {spec: why for spec in self.methods if (why := parse_method(spec).unavailable())}
        self.methods = [spec for spec in self.methods if spec not in self.skipped]  # a peer not installed here
        self.seeds = check_seeds(self.seeds)
        if not self.prompts:
            raise ValueError("prompts must not be empty")
        if not (_is_int(self.steps) and self.steps >= 1):
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not (_is_int(self.batch_size) and 1 <= self.batch_size <= 1024):
            raise ValueError(f"batch_size must be an integer in [1, 1024], got {self.batch_size!r}")
        if self.plot_x not in PLOT_AXES:
            raise ValueError(f"plot_x must be one of {', '.join(PLOT_AXES)}, got {self.plot_x!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.call, dict):
            raise ValueError(f"call must be a mapping of pipeline arguments (e.g. {{num_frames: 51}}), got {reprlib.repr(self.call)}")
        if not isinstance(self.metric_options, dict):
            raise ValueError(f"metric_options must be a mapping, got {reprlib.repr(self.metric_options)}")
        self._check_ours()

    def _check_ours(self) -> None:
        if not isinstance(self.ours, list) or not all(isinstance(name, str) for name in self.ours):
            raise ValueError(f"ours must be a list of method families or methods, got {reprlib.repr(self.ours)}")
        families = {method_family(spec) for spec in self.methods} | set(self.methods)
        unknown = [name for name in self.ours if name not in families]
        if unknown:
            raise ValueError(f"ours: {unknown} name no method of this sweep; its families: {', '.join(sorted(families - set(self.methods)))}")
        if self.ours and "psnr" not in self.metrics:
            raise ValueError("ours: gaps are PSNR at matched FLOPs; add psnr to metrics")
        if not (isinstance(self.gap_speedups, list) and self.gap_speedups
                and all(isinstance(x, numbers.Real) and not isinstance(x, bool) and x >= 1 for x in self.gap_speedups)):
            raise ValueError(f"gap_speedups must be a non-empty list of numbers >= 1, got {reprlib.repr(self.gap_speedups)}")

    def folder(self, method: str) -> str:
        """Images (and metrics) of one method live here; the hash covers everything that changes their
        pixels, the method's config resolved for the pipeline's model family included (the engine settings
        that ``fora:N``, ``:auto`` or ``:reference`` take from the family's preset): a preset changed since a
        sweep ran gets a new folder rather than its old images."""
        from ditcache.config import resolve_configs

        batch = [self.batch_size] if self.batch_size > 1 else []  # batched images differ in their last bits
        config, family = parse_method(method).config, self.family()
        resolved = canonical(resolve_configs(config, family) if config is not None and family is not None else config)
        key = json.dumps([self.pipeline, self.dtype, self.steps, self.height, self.width, self.guidance_scale, self.call, method, resolved, *batch])
        return f"{method.replace(':', '_')}-{digest(key)}"

    def family(self) -> str | None:
        """The model family of the pipeline's transformer (``ditcache.specs``): from a built-in tiny pipeline's
        name, a folder's ``transformer/config.json``, or that file in the hub cache; None when unknown."""
        if self.pipeline.startswith("tiny-"):
            return self.pipeline.removeprefix("tiny-")
        path = Path(self.pipeline) / "transformer" / "config.json"
        if not path.is_file():
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(self.pipeline, "transformer/config.json")
            path = Path(cached) if isinstance(cached, str) else None
        if path is None:
            return None
        from ditcache.specs import SPECS

        spec = SPECS.get(json.loads(path.read_text()).get("_class_name"))
        return spec.family if spec is not None else None


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


def canonical(value):
    """``value`` (dataclasses, mappings, sets, sequences) as JSON-ready data with a fixed order: sets are
    sorted, since their iteration order changes from one process to the next."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__, **{f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, Mapping):
        return {str(key): canonical(item) for key, item in sorted(value.items(), key=lambda pair: str(pair[0]))}
    if isinstance(value, (set, frozenset)):
        return sorted(canonical(item) for item in value)
    if isinstance(value, (list, tuple)):
        return [canonical(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def digest(text: str) -> str:
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
        if not path.is_file():
            raise ValueError(f"prompts: no file {path}")
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


def check_pipeline(pipeline: str, base: Path) -> str:
    """A built-in tiny pipeline's name, a pipeline folder (relative to ``base``, resolved) or a hub id;
    ``ValueError`` for anything else, before any image."""
    from .sweep_generation import TINY_PIPELINES

    if pipeline in TINY_PIPELINES:
        return pipeline
    folder = base / pipeline
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"pipeline {pipeline}: the folder has no model_index.json (not a diffusers pipeline)")
        return str(folder.resolve())
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(pipeline)
    except HFValidationError:
        raise ValueError(f"pipeline {pipeline}: no such folder (from {base}), not a hub id (owner/name) and not one of "
                         f"{', '.join(TINY_PIPELINES)}") from None
    return pipeline


def load_config(path: str | os.PathLike, **overrides) -> SweepConfig:
    """The sweep a YAML file describes, with ``overrides`` of its fields (``steps=20``)."""
    import yaml

    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"a sweep configuration is a mapping (pipeline: ..., methods: [...], prompts: ...), got {type(raw).__name__}")
    missing = [key for key in ("pipeline", "prompts") if key not in raw]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    raw["methods"] = expand_methods(raw.get("methods", []))
    raw["prompts"] = load_prompts(raw["prompts"], path.parent)
    raw["pipeline"] = check_pipeline(str(raw["pipeline"]), path.parent)
    unknown = sorted(set(raw) - set(SweepConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {', '.join(SweepConfig.__dataclass_fields__)}")
    return SweepConfig(**(raw | overrides))


