"""diffusers' own caches (FirstBlockCache, TaylorSeerCache, MagCache, PyramidAttentionBroadcast), applied
the same way on DiT, PixArt and FLUX pipelines, for side-by-side benchmarks with ditcache.

Not every transformer has a ``CacheMixin`` and not every pipeline sets a cache context, so a forward
pre-hook sets one on every call (step index, step count, timestep) and resets the hooks' state when a
new run starts, reading the timestep's units and direction from the model's ``ModelSpec``. Where
TaylorSeer's default patterns match no module of a transformer (DiT, PixArt, Wan, ...), it is given the
branches ditcache caches, from the same spec.
"""

from __future__ import annotations

import math
import re

import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
)
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS
from diffusers.hooks.taylorseer_cache import _TRANSFORMER_BLOCK_IDENTIFIERS

from ditcache.specs import spec_for

PEERS = ("fbc", "taylorseer", "magcache", "pab")
# The values a spec may give after the name, in order: (option, type, default, minimum).
OPTIONS = {
    "fbc": [("threshold", float, 0.05, 0.0)],
    "taylorseer": [("interval", int, 4, 1), ("max_order", int, 1, 0)],
    "magcache": [("threshold", float, 0.06, 0.0)],
    "pab": [("block_skip_range", int, 2, 1)],
}


def taylorseer_patterns(transformer: torch.nn.Module) -> list[str] | None:
    """None (diffusers' default patterns) where they match a module of ``transformer``, else the branches
    its spec caches, as patterns of module names."""
    names = [name for name, _ in transformer.named_modules()]
    if any(re.fullmatch(pattern, name) for pattern in _TRANSFORMER_BLOCK_IDENTIFIERS for name in names):
        return None
    spec = spec_for(transformer)
    branches = sorted({branch for per_block in spec.branches.values() for branch in per_block})
    return [rf"({'|'.join(spec.block_lists)})\.\d+\.({'|'.join(branches)})"]


def _hook_names(module: torch.nn.Module) -> dict[torch.nn.Module, set[str]]:
    return {m: set(m._diffusers_hook.hooks) for m in module.modules() if hasattr(m, "_diffusers_hook")}


def parse_options(name: str, values: list[str]) -> dict:
    """The checked options of a ``name:value[:value]`` spec; a value left out or empty takes its default."""
    allowed = OPTIONS[name]
    if len(values) > len(allowed):
        raise ValueError(f"expected at most {':'.join([name, *(option for option, *_ in allowed)])}.")
    padded = values + [""] * (len(allowed) - len(values))
    return {option: _number(option, kind, text, minimum) if text else default
            for (option, kind, default, minimum), text in zip(allowed, padded)}


def _number(option: str, kind: type, text: str, minimum: float) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value != value or abs(value) == math.inf or value < minimum:
        raise ValueError(f"`{option}` must be {'an integer' if kind is int else 'a number'} >= {minimum}, got {text!r}.")
    return value


class DiffusersCache:
    """One of diffusers' caches as a benchmark method: ``apply(pipe)``, run, ``remove(pipe)``.

    ``spec`` is ``fbc[:threshold]``, ``taylorseer[:interval[:max_order]]``, ``magcache[:threshold]`` or
    ``pab[:block_skip_range]``, parsed here so that a bad one fails before any run.
    """

    def __init__(self, spec: str):
        name, _, value = spec.partition(":")
        if name not in PEERS:
            raise ValueError(f"unknown diffusers cache {name!r}; known: {', '.join(PEERS)}.")
        self.name, self.value = name, value
        self.options = parse_options(name, value.split(":") if value else [])
        self._added: dict[torch.nn.Module, set[str]] = {}
        self._handle = None

    def apply(self, pipe, steps: int) -> None:
        """On a pipeline's transformer, or on a transformer given alone."""
        transformer = getattr(pipe, "transformer", pipe)
        self._step, self._last_timestep, self._steps = 0, None, steps
        self._spec = spec_for(transformer)
        before = _hook_names(transformer)
        self._apply_config(pipe, steps)
        after = _hook_names(transformer)
        self._added = {m: names - before.get(m, set()) for m, names in after.items()}
        self._handle = transformer.register_forward_pre_hook(self._set_context, with_kwargs=True)

    def remove(self, pipe) -> None:
        for module, names in self._added.items():
            for name in names:
                module._diffusers_hook.remove_hook(name, recurse=False)
        HookRegistry.check_if_exists_or_initialize(getattr(pipe, "transformer", pipe)).invalidate_child_registries_cache()
        self._handle.remove()

    def _apply_config(self, pipe, steps: int) -> None:
        transformer, options = getattr(pipe, "transformer", pipe), self.options
        if self.name == "fbc":
            apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=options["threshold"]))
        elif self.name == "taylorseer":
            config = TaylorSeerCacheConfig(
                cache_interval=options["interval"],
                max_order=options["max_order"],
                taylor_factors_dtype=transformer.dtype,
                cache_identifiers=taylorseer_patterns(transformer),
            )
            apply_taylorseer_cache(transformer, config)
        elif self.name == "magcache":
            ratios = FLUX_MAG_RATIOS if self._spec.family == "flux" else torch.ones(steps)  # calibrated for FLUX.1 only
            config = MagCacheConfig(threshold=options["threshold"], num_inference_steps=steps, mag_ratios=ratios)
            apply_mag_cache(transformer, config)
        else:
            config = PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=options["block_skip_range"],
                current_timestep_callback=lambda: (self._timestep - self._spec.timestep_offset) / self._spec.timestep_scale,
            )
            apply_pyramid_attention_broadcast(transformer, config)
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()

    def _set_context(self, module, args, kwargs):
        timestep = kwargs.get(self._spec.timestep_argument)
        self._timestep = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        value = -self._timestep if self._spec.timestep_rises else self._timestep  # falling from here on
        if self._last_timestep is None or value > self._last_timestep:  # a new run
            self._step, self._call = 0, 0
            module._diffusers_hook.reset_stateful_hooks()
        elif value < self._last_timestep:
            self._step, self._call = self._step + 1, 0
        else:  # another call at this step (FLUX's true CFG): its own cache state, as the pipeline's contexts intend
            self._call += 1
        self._last_timestep = value
        name = "cond" if self._call == 0 else f"uncond{self._call}"
        context = CacheContext(name, step_index=self._step, num_inference_steps=self._steps, timestep=self._timestep)
        _set_cache_context(module, context)
        return args, kwargs
