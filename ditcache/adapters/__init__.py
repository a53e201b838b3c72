"""Which transformers ditcache supports, and how to read their calls.

A ``TransformerAdapter`` knows one transformer class: its model family (which preset applies), its
blocks and their adapters, and where a call's latents and timestep are. The transformers with a block
adapter (token-wise caching) are listed in ``ADAPTERS``; any other with a ``ModelSpec``
(``ditcache.specs``) is cached by layer through its branch submodules (``generic.py``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel
from torch import nn

from ..config import EngineSettings
from ..flops import record_layer_flops
from ..models.stdit3 import STDiT3Model
from .base import BlockAdapter
from .basic_transformer import BasicTransformerBlockAdapter
from .flux import FluxDoubleBlockAdapter, FluxSingleBlockAdapter
from .stdit3 import STDiT3BlockAdapter


@dataclass(frozen=True)
class CallInfo:
    """What the step hook reads from one transformer call."""

    latents: torch.Tensor
    timestep: float
    grid: tuple[int, int]
    arguments: dict  # every argument of the call, by name


class TransformerAdapter:
    """A DiT-style transformer: patchified 2D latents, ``transformer_blocks`` of one family."""

    family: str = ""
    block_adapter = BasicTransformerBlockAdapter
    timestep_scale = 1.0  # the model's timestep is scale * t + offset for the scheduler's t
    timestep_offset = 0.0
    timestep_rises = False  # the timestep grows during a run
    latents_argument = "hidden_states"  # the forward argument holding the latents
    timestep_argument = "timestep"

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer
        self.signature = inspect.signature(type(transformer).forward)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"transformer_blocks.{i}", block) for i, block in enumerate(self.transformer.transformer_blocks)]

    def block_adapters(self, settings: EngineSettings) -> list[BlockAdapter]:
        blocks = self.blocks()
        depth = max(len(blocks) - 1, 1)
        return [self.block_adapter(block, name, i / depth, settings) for i, (name, block) in enumerate(blocks)]

    def branch_adapters(self, settings: EngineSettings) -> list:
        """Hooks on branch submodules (the generic path, ``generic.py``); none where block adapters cache."""
        return []

    def prepare_run(self, run, arguments: dict) -> None:
        """Precompute per-step values for a run whose schedule is known, on every call of the run (a
        model keeps what it made for a guidance stream in ``run.tables``); nothing by default."""

    def run_constants(self) -> dict[str, tuple[nn.Module, object]]:
        """Submodules outside the blocks whose output stays the same within a run, each with a function
        ``(run, args, kwargs) -> tensors it is made from`` (see ``hooks.RunConstantHook``); none by default."""
        return {}

    def step_tables(self) -> dict[str, tuple[nn.Module, object]]:
        """Submodules outside the blocks whose output for each step ``prepare_run`` tabulated, each with
        a function ``run -> (output, FLOPs one call costs) or None`` (see ``hooks.StepTableHook``); none by default."""
        return {}

    def read_call(self, args: tuple, kwargs: dict) -> CallInfo:
        bound = self.signature.bind(None, *args, **kwargs).arguments
        latents, timestep = bound[self.latents_argument], bound.get(self.timestep_argument)
        if timestep is None:
            raise ValueError(f"{type(self.transformer).__name__} was called without `{self.timestep_argument}`; ditcache needs it.")
        value = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        return CallInfo(latents, value, self.token_grid(latents, bound), bound)

    def token_grid(self, latents: torch.Tensor, arguments: dict) -> tuple[int, int]:
        """(height, width) of the image tokens: the patchified latent grid."""
        patch = self.transformer.config.patch_size
        return latents.shape[-2] // patch, latents.shape[-1] // patch

    @staticmethod
    def is_guidance_batch(latents: torch.Tensor) -> bool:
        """A classifier-free-guidance batch repeats the same latents in both halves."""
        batch = latents.shape[0]
        return batch % 2 == 0 and torch.equal(latents[: batch // 2], latents[batch // 2 :])


class DiTAdapter(TransformerAdapter):
    family = "dit"


class PixArtAdapter(TransformerAdapter):
    family = "pixart"


class FluxAdapter(TransformerAdapter):
    """FLUX.1: double-stream blocks, then single-stream blocks, on packed latents."""

    family = "flux"
    timestep_scale = 1 / 1000  # FLUX pipelines pass t / 1000

    def prepare_run(self, run, arguments: dict) -> None:
        """The timestep embedding of every step of the run, for the blocks' modulation tables, made on
        the first call of each guidance stream (each has its own pooled prompt)."""
        transformer = self.transformer
        guidance, pooled = arguments.get("guidance"), arguments.get("pooled_projections")
        if pooled is None or f"temb.{run.stream}" in run.tables:
            return
        dtype, steps, batch = pooled.dtype, len(run.schedule), pooled.shape[0]
        timesteps = torch.tensor(run.schedule, device=pooled.device).to(dtype).repeat_interleave(batch) * 1000
        pooled = pooled.repeat(steps, 1)
        with record_layer_flops(transformer.time_text_embed, lambda: True) as flops:
            if guidance is None:
                temb = transformer.time_text_embed(timesteps, pooled)
            else:
                temb = transformer.time_text_embed(timesteps, guidance.to(dtype).repeat(steps) * 1000, pooled)
        run.add_flops(flops[0], 0)
        run.tables[f"temb.{run.stream}"] = temb.view(steps, batch, -1)
        run.tables[f"temb_flops.{run.stream}"] = flops[0] // steps  # what one call's embedding costs

    def run_constants(self) -> dict[str, tuple[nn.Module, object]]:
        """The rotary embedding (from the call's position ids; the pipeline passes the same tensors at
        every step) and the text projection (from the prompt embeddings)."""
        transformer = self.transformer
        return {
            "pos_embed": (transformer.pos_embed, lambda run, args, kwargs: [run.arguments.get("txt_ids"), run.arguments.get("img_ids")]),
            "context_embedder": (transformer.context_embedder, lambda run, args, kwargs: [args[0] if args else kwargs.get("input")]),
        }

    def step_tables(self) -> dict[str, tuple[nn.Module, object]]:
        """The timestep and pooled-text embedding, from the run's table (``prepare_run``)."""

        def lookup(run):
            if not (f"temb.{run.stream}" in run.tables and run.on_schedule):
                return None
            return run.tables[f"temb.{run.stream}"][run.step], run.tables[f"temb_flops.{run.stream}"]

        return {"time_text_embed": (self.transformer.time_text_embed, lookup)}

    def blocks(self) -> list[tuple[str, nn.Module]]:
        transformer = self.transformer
        return [(f"transformer_blocks.{i}", b) for i, b in enumerate(transformer.transformer_blocks)] + [
            (f"single_transformer_blocks.{i}", b) for i, b in enumerate(transformer.single_transformer_blocks)
        ]

    def block_adapters(self, settings: EngineSettings) -> list[BlockAdapter]:
        # Both streams take the layer factor by index, spread over the single-stream depth.
        depth = max(len(self.transformer.single_transformer_blocks) - 1, 1)
        adapters = []
        for name, block in self.blocks():
            index = int(name.rsplit(".", 1)[1])
            cls = FluxDoubleBlockAdapter if name.startswith("transformer_blocks") else FluxSingleBlockAdapter
            adapters.append(cls(block, name, min(index / depth, 1.0), settings))
        return adapters

    def token_grid(self, latents: torch.Tensor, arguments: dict) -> tuple[int, int]:
        """From the last image position id (raster order); packed latents carry no grid of their own."""
        img_ids = arguments.get("img_ids")
        if img_ids is None:
            return latents.shape[1], 1
        _, row, col = img_ids.reshape(-1, img_ids.shape[-1])[-1].tolist()
        return int(row) + 1, int(col) + 1


class STDiT3Adapter(TransformerAdapter):
    """OpenSora 1.2: a spatial then a temporal block per layer, on ``(B, C, T, H, W)`` video latents."""

    family = "opensora"
    block_adapter = STDiT3BlockAdapter
    latents_argument = "x"

    def blocks(self) -> list[tuple[str, nn.Module]]:
        transformer = self.transformer
        pairs = zip(transformer.spatial_blocks, transformer.temporal_blocks)
        return [item for i, (spatial, temporal) in enumerate(pairs)
                for item in ((f"spatial_blocks.{i}", spatial), (f"temporal_blocks.{i}", temporal))]

    def block_adapters(self, settings: EngineSettings) -> list[BlockAdapter]:
        depth = max(len(self.transformer.spatial_blocks) - 1, 1)  # a spatial/temporal pair shares its layer position
        return [STDiT3BlockAdapter(block, name, (i // 2) / depth, settings) for i, (name, block) in enumerate(self.blocks())]

    def token_grid(self, latents: torch.Tensor, arguments: dict) -> tuple[int, int]:
        """The frames' patch grids stacked, ``(T * H, W)``; the spatial bonus and token merging split it
        back into frames."""
        frames, rows, cols = self.transformer.token_grid(latents)
        return frames * rows, cols


ADAPTERS: dict[type, type[TransformerAdapter]] = {
    DiTTransformer2DModel: DiTAdapter,
    PixArtTransformer2DModel: PixArtAdapter,
    FluxTransformer2DModel: FluxAdapter,
    STDiT3Model: STDiT3Adapter,
}


def transformer_adapter(transformer: nn.Module) -> TransformerAdapter:
    """The adapter for ``transformer``: its block adapter's, else the generic one from its ``ModelSpec``;
    ``TypeError`` listing the supported models otherwise."""
    from ..specs import SPECS, spec_for
    from .generic import GenericTransformerAdapter

    for cls, adapter in ADAPTERS.items():
        if isinstance(transformer, cls):
            return adapter(transformer)
    spec = spec_for(transformer)
    if spec is not None:
        return GenericTransformerAdapter(transformer, spec)
    token_wise = ", ".join(f"{cls.__name__} ({adapter.family})" for cls, adapter in ADAPTERS.items())
    raise TypeError(
        f"ditcache does not support {type(transformer).__name__}; supported transformers: {token_wise} (token-wise "
        f"and layer caching), {', '.join(SPECS)} (layer caching, FORAConfig). Another model needs a "
        "ditcache.specs.register(ModelSpec(...))."
    )
