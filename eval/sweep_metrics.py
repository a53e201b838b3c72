"""A sweep's metrics: each computed once per method from the images on disk, and kept with what it
depends on, so that a resumed sweep recomputes only what changed."""

from __future__ import annotations

import importlib
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ditcache.flops import count_flops

from . import scenes
from .speed import parse_method
from .sweep_config import (
    BASELINE, DIGITS_FID, FIDELITY_METRICS, PROMPT_METRICS, SCENES_FID, SET_METRICS, VIDEO_METRICS, SweepConfig, digest,
)
from .sweep_generation import call_arguments, units, write_json

def strip_to_video(strip: torch.Tensor, frames: int) -> torch.Tensor:
    """``(3, H, T * W)`` to ``(T, 3, H, W)``."""
    return strip.unflatten(-1, (frames, -1)).permute(2, 0, 1, 3)


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


def _clip_score(options: dict, device: str):
    from .metrics import CLIPScorer

    return CLIPScorer.from_pretrained(options.get("model"), device)


def _lpips(options: dict, device: str):
    from .metrics import LPIPS

    return LPIPS(options.get("weights")).to(device)


def _image_reward(options: dict, device: str):
    from .image_reward import ImageReward

    return ImageReward.from_pretrained(options.get("model"), options.get("tokenizer")).to(device)


def _subject_consistency(options: dict, device: str):
    from .vbench import SubjectConsistency

    return SubjectConsistency(options.get("model"), device)


def _background_consistency(options: dict, device: str):
    from .vbench import BackgroundConsistency

    return BackgroundConsistency(options.get("model"), device)


def _digit_classifier(options: dict, device: str):
    from .digits import DigitClassifier

    return DigitClassifier.from_pretrained(**options).to(device)


# The model each metric that needs one loads (once per sweep, when first needed), from its metric_options.
METRIC_MODELS = {
    "clip_score": _clip_score, "lpips": _lpips, "image_reward": _image_reward, "subject_consistency": _subject_consistency,
    "background_consistency": _background_consistency, "digits_accuracy": _digit_classifier, DIGITS_FID: _digit_classifier,
    "scenes_accuracy": _digit_classifier, SCENES_FID: _digit_classifier,
}


class Evaluator:
    """Computes the configured metrics of one method's images; the models load once, when first needed."""

    def __init__(self, config: SweepConfig, output: Path, device: str):
        self.config, self.output, self.device = config, output, device
        self.options = config.metric_options
        self._models: dict[str, object] = {}

    def _model(self, name: str):
        if name not in self._models:
            self._models[name] = METRIC_MODELS[name](self.options.get(name, {}), self.device)
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
                elif name == "scenes_accuracy":
                    values += scenes.read(batch, batch_prompts, model)
                else:
                    from .digits import label_of

                    values.append((model(batch).argmax(-1).cpu() == torch.tensor([label_of(p) for p in batch_prompts])).float())
            if name == "scenes_accuracy":  # per named object, and per whole prompt
                objects = [digit and colour for readings in values for digit, colour in readings]
                prompts = [all(digit and colour for digit, colour in readings) for readings in values]
                return {name: sum(objects) / len(objects), f"{name}_prompt": sum(prompts) / len(prompts)}
            values = torch.cat(values)
            return {name: metrics.CLIPScorer.aggregate(values) if name == "clip_score" else float(values.mean())}
        if name == DIGITS_FID:
            from .digits import DigitFeatures, load_images

            real = metrics.as_uint8(load_images(size=images[0:1].shape[-1])[0])
            return {DIGITS_FID: metrics.feature_distances(images, real, feature=DigitFeatures(self._model(name)))["fid"]}
        if name == SCENES_FID:
            from .digits import DigitFeatures

            if "scenes_real" not in self._models:  # the held-out real scenes' cut-outs, made once per sweep
                self._models["scenes_real"] = scenes.cut_outs(*scenes.make_scenes(1000, scenes.EVAL_SEED, held_out=True))
            generated = scenes.cut_outs(metrics.as_float(images[0 : len(images)]), self.prompts())
            distances = metrics.feature_distances(generated, self._models["scenes_real"], feature=DigitFeatures(self._model(name)))
            return {SCENES_FID: distances["fid"]}
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
        return digest(json.dumps([name, self.config.prompts, self.config.seeds, self.options.get(name, {})], sort_keys=True))


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
            method.apply(pipe, config.steps, call_arguments(pipe, config, config.prompts[0], config.seeds[0], device))
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
            row |= {k: v for k, v in values.items() if k in config.metrics or (k.startswith("kid") and "kid" in config.metrics)
                    or k == f"{name}_prompt"}
        if "fid" in computations(config) and method_spec != BASELINE:
            row["fid_feature"] = str(config.metric_options.get("fid", {}).get("feature", 2048))
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["speedup"] = base["latency_s"] / row["latency_s"]
        row["flops_speedup"] = base["flops"] / row["flops"]
    return rows


