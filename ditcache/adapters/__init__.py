"""How ditcache reads a transformer's calls and reaches its blocks.

A ``TransformerAdapter`` serves one transformer from its ``ModelSpec`` (``ditcache.specs``): its model
family (which preset applies), where a call's latents and timestep are and in which units, and its
blocks. The families whose spec names an adapter here (DiT and PixArt, FLUX.1, OpenSora) cache through
block adapters written from their blocks' math; every other spec'd transformer through hooks on its
branch submodules (``generic.py``).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..config import EngineSettings
from ..flops import record_layer_flops
from ..specs import SPECS, ModelSpec, spec_for
from ..state import Memo

ATTENTION_CALL_SCORES = ("attention", "v_norm")  # read from the inputs of the attention call itself
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
    """A transformer read from its spec; its blocks, in the order they run, from the spec's block lists.
    Subclasses add block adapters (token-wise caching from the blocks' math) or branch hooks."""

    def __init__(self, transformer: nn.Module, spec: ModelSpec):
        self.transformer = transformer
        self.spec = spec
        self.family = spec.family
        self.timestep_scale = spec.timestep_scale  # the model's timestep is scale * t + offset for the scheduler's t
        self.timestep_offset = spec.timestep_offset
        self.timestep_rises = spec.timestep_rises  # the timestep grows during a run
        self.latents_argument = spec.latents_argument
        self.timestep_argument = spec.timestep_argument
        self.signature = inspect.signature(type(transformer).forward)
        self.dry_timestep: float | None = None  # set in a dry run (ditcache.memory), whose tensors hold no values
        parameters = self.signature.parameters
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            for field in ("latents_argument", "timestep_argument"):
                if getattr(spec, field) not in parameters:
                    raise ValueError(
                        f"the spec of {spec.transformer} names {field}={getattr(spec, field)!r}, which is not an argument "
                        f"of its forward ({', '.join(name for name in parameters if name != 'self')})."
                    )

    def blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"{name}.{i}", block) for name in self.spec.block_lists for i, block in enumerate(getattr(self.transformer, name))]

    def block_adapters(self, settings: EngineSettings) -> list[BlockAdapter]:
        return []

    def sequence_group(self, settings: EngineSettings):
        """The process group the transformer's sequence is sharded over (diffusers' context parallelism,
        ``enable_parallelism``), or None. Each rank chooses its recomputed tokens within its own shard; scores
        read from the attention call are refused, since under Ulysses that call sees every token but only a
        share of the heads, and under Ring a share of the keys."""
        config = getattr(self.transformer, "_parallel_config", None)
        context = getattr(config, "context_parallel_config", None)
        if context is None:
            return None
        if settings.recomputes_tokens and settings.score in ATTENTION_CALL_SCORES:
            raise ValueError(
                f"score={settings.score!r} reads the attention call, which context parallelism shards by heads or keys: "
                f"under context parallelism choose score='k_norm' or 'random' (each rank chooses within its own tokens)."
            )
        return context._flattened_mesh.get_group()

    def branch_adapters(self, settings: EngineSettings) -> list:
        """Hooks on branch submodules (the generic path, ``generic.py``); none where block adapters cache."""
        return []

    def run_constants(self) -> dict[str, tuple[nn.Module, object]]:
        """Submodules outside the blocks whose output stays the same within a run, each with a function
        ``(run, args, kwargs) -> tensors it is made from`` (see ``hooks.RunConstantHook``); none by default."""
        return {}

    def step_tables(self) -> dict[str, tuple[nn.Module, object]]:
        """Submodules outside the blocks whose output is tabulated for every step of a run whose schedule
        is known, each with a function ``(run, compute) -> (output, FLOPs one call costs) or None`` that
        makes the table with ``compute`` (the module's own forward) on first use (see
        ``hooks.StepTableHook``); none by default."""
        return {}

    def read_call(self, args: tuple, kwargs: dict) -> CallInfo:
        bound = self.signature.bind(None, *args, **kwargs).arguments
        latents, timestep = bound[self.latents_argument], bound.get(self.timestep_argument)
        if timestep is None:
            raise ValueError(f"{type(self.transformer).__name__} was called without `{self.timestep_argument}`; ditcache needs it.")
        if self.dry_timestep is not None:
            value = self.dry_timestep
        else:
            value = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        return CallInfo(latents, value, self.token_grid(latents, bound), bound)

    def dry_arguments(self, arguments: dict) -> dict:
        """A call's arguments as a dry run without data takes them (``ditcache.memory``): as they are, but where
        the forward reads an argument's values for something no shape depends on."""
        return arguments

    def token_grid(self, latents: torch.Tensor, arguments: dict) -> tuple[int, int]:
        """(height, width) of the image tokens: the patchified latent grid."""
        patch = self.transformer.config.patch_size
        return latents.shape[-2] // patch, latents.shape[-1] // patch

    def is_guidance_batch(self, latents: torch.Tensor) -> bool:
        """A classifier-free-guidance batch repeats the same latents in both halves."""
        batch = latents.shape[0]
        if self.dry_timestep is not None:  # a dry run: only the halves' score rows depend on it, a few bytes
            return False
        return batch % 2 == 0 and torch.equal(latents[: batch // 2], latents[batch // 2 :])


class BasicBlocksAdapter(TransformerAdapter):
    """DiT and PixArt: patchified 2D latents, ``transformer_blocks`` of diffusers' ``BasicTransformerBlock``."""

    def block_adapters(self, settings: EngineSettings) -> list[BlockAdapter]:
        blocks = self.blocks()
        depth = max(len(blocks) - 1, 1)
        return [BasicTransformerBlockAdapter(block, name, i / depth, settings) for i, (name, block) in enumerate(blocks)]


class FluxAdapter(TransformerAdapter):
    """FLUX.1: double-stream blocks, then single-stream blocks, on packed latents (the timestep is t / 1000)."""

    def run_constants(self) -> dict[str, tuple[nn.Module, object]]:
        """The rotary embedding (from the call's position ids; the pipeline passes the same tensors at
        every step) and the text projection (from the prompt embeddings)."""
        transformer = self.transformer
        return {
            "pos_embed": (transformer.pos_embed, lambda run, args, kwargs: [run.arguments.get("txt_ids"), run.arguments.get("img_ids")]),
            "context_embedder": (transformer.context_embedder, lambda run, args, kwargs: [args[0] if args else kwargs.get("input")]),
        }

    def step_tables(self) -> dict[str, tuple[nn.Module, object]]:
        """The timestep and pooled-text embedding of every step of the run, for the blocks' modulation
        tables, made on the first call of each guidance stream (each has its own pooled prompt). It is made
        inside the transformer's forward, where diffusers has applied the call's LoRA scale."""

        def lookup(run, embed):
            if not (run.plan.on_schedule and run.caching):
                return None
            memo = run.memo.get("temb", run.stream) or self._tabulate_embeddings(run, embed)
            return None if memo is None else (memo.value[run.plan.step], memo.flops)

        return {"time_text_embed": (self.transformer.time_text_embed, lookup)}

    def _tabulate_embeddings(self, run, embed) -> Memo | None:
        guidance, pooled = run.arguments.get("guidance"), run.arguments.get("pooled_projections")
        if pooled is None:
            return None
        dtype, steps, batch = pooled.dtype, len(run.plan.schedule), pooled.shape[0]
        timesteps = torch.tensor(run.plan.schedule, device=pooled.device).to(dtype).repeat_interleave(batch) * 1000
        pooled = pooled.repeat(steps, 1)
        with record_layer_flops(self.transformer.time_text_embed, lambda: True) as flops:
            if guidance is None:
                temb = embed(timesteps, pooled)
            else:
                temb = embed(timesteps, guidance.to(dtype).repeat(steps) * 1000, pooled)
        run.ledger.add_flops(flops[0], 0)
        # the table, and what one call's embedding costs
        return run.memo.put("temb", run.stream, Memo(temb.view(steps, batch, -1), flops[0] // steps))

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
        if img_ids is None or self.dry_timestep is not None:  # a dry run (ditcache.memory) reads no grid
            return latents.shape[1], 1
        _, row, col = img_ids.reshape(-1, img_ids.shape[-1])[-1].tolist()
        return int(row) + 1, int(col) + 1


class STDiT3Adapter(TransformerAdapter):
    """OpenSora 1.2: a spatial then a temporal block per layer, on ``(B, C, T, H, W)`` video latents."""

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

    def dry_arguments(self, arguments: dict) -> dict:
        """Without the image size, whose values only scale the positions."""
        return arguments | {"height": None, "width": None}


def transformer_adapter(transformer: nn.Module) -> TransformerAdapter:
    """The adapter of ``transformer``'s spec (the generic one when the spec names none); ``TypeError``
    listing the supported models when it has no spec."""
    from .generic import GenericTransformerAdapter

    spec = spec_for(transformer)
    if spec is None:
        token_wise = ", ".join(f"{s.transformer} ({s.family})" for s in SPECS.values() if s.adapter)
        generic = ", ".join(f"{s.transformer} ({s.family})" for s in SPECS.values() if not s.adapter)
        raise TypeError(
            f"ditcache does not support {type(transformer).__name__}; supported transformers: {token_wise} (token-wise "
            f"caching, token merging and layer caching); {generic} (layer caching, and token-wise caching of their "
            "per-token branches). Another model needs a ditcache.specs.register(ModelSpec(...))."
        )
    if spec.adapter is None:
        return GenericTransformerAdapter(transformer, spec)
    module, _, name = spec.adapter.partition(":")
    return getattr(importlib.import_module(module), name)(transformer, spec)
