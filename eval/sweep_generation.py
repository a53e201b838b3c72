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


def generate(pipe, config: SweepConfig, output: Path, mine: list[Unit], device: str, quiet: bool, position: int) -> None:
    """Generate this process's images, one method at a time, each after one untimed warm-up call (a
    method's first call pays one-off costs: its latency would be the warm-up, not the method)."""
    overall, clock = tqdm(total=len(mine), desc="images", position=position, disable=quiet), Clock(device)
    for method_spec, group in itertools.groupby(mine, key=lambda u: u.method):
        group = list(group)
        method = parse_method(method_spec)
        method.apply(pipe, config.steps, call_arguments(pipe, config, config.prompts[group[0].index], group[0].seed, device))
        try:
            pipe(**call_arguments(pipe, config, config.prompts[group[0].index], group[0].seed, device))
            for unit in tqdm(group, desc=method_spec, leave=False, disable=quiet):
                prompt = config.prompts[unit.index]
                call = call_arguments(pipe, config, prompt, unit.seed, device)
                result, latency = clock.timed(lambda: pipe(**call))
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
