"""A sweep's images: one file per (method, prompt, seed), written atomically, so that an interrupted sweep
resumes where it stopped."""

from __future__ import annotations

import io
import itertools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ditcache.specs import SPECS
from ditcache.timing import Clock

from . import builders
from .speed import parse_method
from .sweep_config import SweepConfig

TINY_PIPELINES = {f"tiny-{spec.family}": getattr(builders, spec.tiny) for spec in SPECS.values() if spec.tiny}


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


REPORT_ONLY = ("ours", "gap_speedups")  # what only the report reads: changing it changes no image or metric


def check_manifest(output: Path, config: SweepConfig, allow_changed: bool) -> None:
    """Refuse to mix two different sweeps in one folder unless asked; a folder holding no image yet (a sweep
    that failed before its first one) takes the new configuration."""
    manifest = output / "manifest.json"
    current = asdict(config)
    if manifest.exists() and any((output / "images").glob("*/*.json")):
        previous = json.loads(manifest.read_text())
        changed = sorted(k for k in (set(previous) | set(current)) - set(REPORT_ONLY) if previous.get(k) != current.get(k))
        if changed and not allow_changed:
            raise SystemExit(
                f"{output} holds a sweep with a different configuration (changed: {', '.join(changed)}). "
                "Use another --output, or pass --allow-changed to go on here (images whose method and "
                "generation settings are unchanged are kept; every result is recomputed as needed)."
            )
    write_json(manifest, current)


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
    folders = {method: config.folder(method) for method in config.methods}  # one resolution per method
    return [
        Unit(folders[method], method, index, seed)
        for method in config.methods
        for index in range(len(config.prompts))
        for seed in config.seeds
    ]


def batches(config: SweepConfig) -> list[list[Unit]]:
    """Each method's images in consecutive groups of ``batch_size``, fixed by the config alone: an image is
    always generated beside the same others (batched images differ in their last bits from one batch to
    another), whatever was already done when a sweep resumed."""
    grouped = []
    for _, group in itertools.groupby(units(config), key=lambda unit: unit.method):
        group = list(group)
        grouped += [group[start : start + config.batch_size] for start in range(0, len(group), config.batch_size)]
    return grouped


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


def call_arguments(pipe, config: SweepConfig, prompts: str | list[str], seeds: int | list[int], device: str) -> dict:
    """The pipeline arguments of one image, or of a batch (``prompts`` and ``seeds`` lists: one generator each)."""
    batch = isinstance(prompts, list)
    prompts, seeds = (prompts, seeds) if batch else ([prompts], [seeds])
    call = {"num_inference_steps": config.steps, "output_type": "pil", **config.call}
    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
    call["generator"] = generators if batch else generators[0]
    if hasattr(pipe, "get_label_ids"):  # DiT: class-conditional
        call["class_labels"] = [label for p in prompts for label in ([int(p)] if p.isdigit() else pipe.get_label_ids([p]))]
    else:
        call["prompt"] = prompts if batch else prompts[0]
        call |= {k: v for k, v in (("height", config.height), ("width", config.width)) if v is not None}
        if batch:  # one negative prompt per image
            call |= {k: [v] * len(prompts) for k, v in call.items() if k.startswith("negative_prompt") and isinstance(v, str)}
    if config.guidance_scale is not None:
        call["guidance_scale"] = config.guidance_scale
    return call


def generate(pipe, config: SweepConfig, output: Path, mine: list[list[Unit]], device: str, quiet: bool, position: int) -> None:
    """Generate this process's batches (``batches``: a whole batch, even where some of its images exist,
    writing only the missing ones), one method at a time, each after one untimed warm-up call (a method's
    first call pays one-off costs: its latency would be the warm-up, not the method). With ``batch_size``
    above 1, images of one method go through the pipeline together, each with its own generator; an image's
    latency is its batch's over the batch's size. Each sidecar names the process that wrote it."""
    missing = sum(not is_done(output, unit, config.prompts[unit.index]) for batch in mine for unit in batch)
    overall, clock = tqdm(total=missing, desc="images", position=position, disable=quiet), Clock(device)
    batched = config.batch_size > 1

    def batch_call(batch: list[Unit]) -> dict:
        prompts, seeds = [config.prompts[u.index] for u in batch], [u.seed for u in batch]
        return call_arguments(pipe, config, *((prompts, seeds) if batched else (prompts[0], seeds[0])), device)

    for method_spec, group in itertools.groupby(mine, key=lambda batch: batch[0].method):
        group = list(group)
        method = parse_method(method_spec)
        method.apply(pipe, config.steps, call_arguments(pipe, config, config.prompts[group[0][0].index], group[0][0].seed, device))
        try:
            pipe(**batch_call(group[0]))
            for batch in tqdm(group, desc=method_spec, leave=False, disable=quiet):
                prompts, call = [config.prompts[u.index] for u in batch], batch_call(batch)
                result, latency = clock.timed(lambda: pipe(**call))
                for position_in_batch, (unit, prompt) in enumerate(zip(batch, prompts)):
                    if is_done(output, unit, prompt):
                        continue
                    frames = result.frames[position_in_batch] if hasattr(result, "frames") else [result.images[position_in_batch]]
                    folder = output / "images" / unit.folder
                    atomic_write(folder / f"{unit.stem}.png", png_bytes(frame_strip(frames)))
                    sidecar = {"prompt": prompt, "seed": unit.seed, "method": method_spec, "latency_s": latency / len(batch),
                               "process": position}
                    sidecar |= {"batch": len(batch)} if batched else {}
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
