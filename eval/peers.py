"""The peers: diffusers' own caches (FirstBlockCache, TaylorSeerCache, MagCache, PyramidAttentionBroadcast),
applied the same way on every pipeline ditcache has a spec for, and cache-dit's DBCache (with or without
its TaylorSeer calibrator) where the ``cache-dit`` package is installed, for side-by-side benchmarks.

MagCache is calibrated on the model it runs on, with diffusers' own calibration mode (``calibrate=True``),
over the call the benchmark makes; given no call, it takes diffusers' FLUX.1-dev ratios on FLUX and
uniform ratios elsewhere.

Not every transformer has a ``CacheMixin`` and not every pipeline sets a cache context, so a forward
pre-hook sets one on every call (step index, step count, timestep) and resets the hooks' state when a
new run starts, reading the timestep's units and direction from the model's ``ModelSpec``. Where
TaylorSeer's default patterns match no module of a transformer (DiT, PixArt, Wan, ...), it is given the
branches ditcache caches, from the same spec.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
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

from ditcache.hooks import drop_empty_registry
from ditcache.specs import spec_for

PEERS = ("fbc", "taylorseer", "magcache", "pab", "dbcache")
# The values a spec may give after the name, in order: (option, type, default, minimum).
OPTIONS = {
    "fbc": [("threshold", float, 0.05, 0.0)],
    "taylorseer": [("interval", int, 4, 1), ("max_order", int, 1, 0)],
    "magcache": [("threshold", float, 0.06, 0.0)],
    "pab": [("block_skip_range", int, 2, 1)],
    # cache-dit's DBCache, F1B0 (the first block probes, none after it), with a TaylorSeer calibrator of this
    # order (0: none); its other settings are cache-dit's defaults (8 warm-up steps)
    "dbcache": [("threshold", float, 0.08, 0.0), ("taylorseer_order", int, 0, 0)],
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

    def unavailable(self) -> str | None:
        """Why this peer cannot run here, or None."""
        if self.name == "dbcache" and importlib.util.find_spec("cache_dit") is None:
            return "cache-dit is not installed (pip install cache-dit)"
        return None

    def apply(self, pipe, steps: int, call: dict | None = None) -> None:
        """On a pipeline's transformer, or on a transformer given alone; ``call``: the arguments of a call
        like the benchmark's (MagCache calibrates on it, cache-dit reads its guidance)."""
        transformer = getattr(pipe, "transformer", pipe)
        if self.name == "dbcache":
            self._apply_cache_dit(pipe, steps, call or {})
            return
        self._steps, self._spec = steps, spec_for(transformer)
        self._attach(pipe, steps, self._mag_ratios(pipe, steps, call) if self.name == "magcache" else None)

    def _attach(self, pipe, steps: int, mag_ratios: torch.Tensor | None) -> None:
        """Apply diffusers' cache, remembering the hooks it added, and the pre-hook that sets its context."""
        transformer = getattr(pipe, "transformer", pipe)
        self._step, self._last_timestep = 0, None
        before = _hook_names(transformer)
        self._apply_config(pipe, steps, mag_ratios)
        self._added = {m: names - before.get(m, set()) for m, names in _hook_names(transformer).items()}
        # a registry kept from an earlier cache may list the blocks' registries as they were then
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
        self._handle = transformer.register_forward_pre_hook(self._set_context, with_kwargs=True)

    def remove(self, pipe) -> None:
        if self.name == "dbcache":
            import cache_dit

            cache_dit.disable_cache(pipe)
            self._restore_forwards(pipe.transformer)
            return
        for module, names in self._added.items():
            for name in names:
                module._diffusers_hook.remove_hook(name, recurse=False)
        HookRegistry.check_if_exists_or_initialize(getattr(pipe, "transformer", pipe)).invalidate_child_registries_cache()
        for module in self._added:
            if not module._diffusers_hook.hooks:
                drop_empty_registry(module)  # as before the cache: no registry, no instance-level forward
        self._handle.remove()

    def _apply_cache_dit(self, pipe, steps: int, call: dict) -> None:
        import cache_dit

        if not hasattr(pipe, "transformer"):
            raise ValueError("dbcache runs on a pipeline, not on a transformer alone")
        true_cfg = call.get("true_cfg_scale", 1.0) > 1 and call.get("negative_prompt") is not None  # FluxPipeline's two calls per step
        config = cache_dit.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=self.options["threshold"],
            num_inference_steps=steps, enable_separate_cfg=True if true_cfg else None,
        )
        order = self.options["taylorseer_order"]
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order) if order else None
        self._forwards = {module: module.__dict__.get("forward") for module in pipe.transformer.modules()}
        self._registries = {module for module in pipe.transformer.modules() if hasattr(module, "_diffusers_hook")}
        self._children = {module: list(module._modules.items()) for module in pipe.transformer.modules()}
        cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)

    def _restore_forwards(self, transformer) -> None:
        """Undo what ``disable_cache`` leaves: the forwards cache-dit patched on the transformer and its blocks
        (same results, but another cache hooked on later would see cache-dit's calls instead of diffusers'), the
        empty hook registries it made, and the order of the transformer's block lists, which it re-registers (a
        cache hooked on later takes the first block it finds for the first block run)."""
        for module in transformer.modules():
            before = self._forwards.get(module)
            if module.__dict__.get("forward") is not before:
                if before is None:
                    del module.forward
                else:
                    module.forward = before
            if hasattr(module, "_diffusers_hook") and module not in self._registries and not module._diffusers_hook.hooks:
                drop_empty_registry(module)
            if module in self._children and list(module._modules.items()) != self._children[module]:
                module._modules = dict(self._children[module])
        transformer.__dict__.pop("_is_patched", None)

    def _mag_ratios(self, pipe, steps: int, call: dict | None) -> torch.Tensor:
        """MagCache's ratios for this model: measured by diffusers' calibration over one ``call``."""
        transformer = getattr(pipe, "transformer", pipe)
        if call is None:
            return FLUX_MAG_RATIOS if spec_for(transformer).family == "flux" else torch.ones(steps)
        self._attach(pipe, steps, None)  # calibration mode: no step skipped, the ratios printed at the end
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                pipe(**call)
        finally:
            self.remove(pipe)
        runs = [json.loads(line) for line in printed.getvalue().splitlines() if line.startswith("[") and line.endswith("]")]
        if not runs:
            raise RuntimeError("MagCache's calibration printed no ratios")
        return torch.tensor(runs).mean(dim=0)  # one list per guidance branch: their mean

    def _apply_config(self, pipe, steps: int, mag_ratios: torch.Tensor | None) -> None:
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
            calibrate = dict(calibrate=True) if mag_ratios is None else dict(mag_ratios=mag_ratios)
            apply_mag_cache(transformer, MagCacheConfig(threshold=options["threshold"], num_inference_steps=steps, **calibrate))
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
