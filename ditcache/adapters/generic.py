"""The generic path: any transformer with a ``ModelSpec`` cached through its branch submodules.

Each branch submodule of a block (an attention, a feed-forward) gets a hook. On a full step it runs and
its output is kept (with its divided differences when forecasting); on a partial step it does not run
and returns the kept value or its forecast. Everything else in the block, norms, modulation, gates and
residual adds, runs at every step as diffusers wrote it, so a reused branch still enters the residual
through the current step's gate. This is FORA (and its forecasts) without a copy of any block's math.

With ``ToCaConfig``, the branches a spec marks as per-token (feed-forwards, cross-attention queries)
also recompute a share of their tokens on partial steps: the chosen rows of the branch's input go
through the branch and overwrite those rows of the kept value (of this step's forecast when forecasting).
The tokens are chosen as ToCa chooses them, by a seeded random score plus the steps since each token was
last computed; the guidance halves of a batch recompute the same tokens.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .. import scores as S
from ..config import EngineSettings
from ..flops import count_flops
from ..specs import ModelSpec
from ..state import BlockCache, RunState
from . import TransformerAdapter


class BranchAdapter:
    """One branch submodule: computes and keeps its output on full steps, reuses it on partial steps.

    Outputs may be a tensor or a tuple of tensors and ``None`` (a joint attention's image and text
    parts). A submodule called more than once per block call (CogView4 runs one feed-forward on the image,
    then on the text) keeps one value per call, in call order. A kept tensor that the block then changes in place would make every later reuse wrong: its
    version counter is checked at each reuse and a change raises ``RuntimeError``.
    """

    def __init__(self, module: nn.Module, block_name: str, branch: str, settings: EngineSettings,
                 layer_position: float = 0.0, per_token: bool = False):
        self.module = module
        self.block_name = block_name
        self.branch = branch
        self.settings = settings
        self.layer_position = layer_position
        self.recomputes = per_token and settings.recomputes_tokens
        self._flops: dict[tuple, int] = {}  # FLOPs of one call, per input shapes
        self._calls: tuple[int, int] = (-1, -1)  # (transformer call, times this branch ran in it)

    def forward(self, run: RunState, cache: BlockCache, compute, args: tuple, kwargs: dict):
        serial, calls = self._calls
        calls = calls + 1 if serial == run.call_serial else 0
        self._calls = (run.call_serial, calls)
        key = f"{self.branch}.{calls}"
        if run.is_full or key not in cache.layouts:
            output = self._compute(run, cache, key, compute, args, kwargs)
            if self.recomputes and isinstance(output, torch.Tensor):
                self._store_score(run, cache, key, output.shape[:2])
            return output
        if self.recomputes and cache.layouts[key][0] is None and key in cache.since_recompute:
            return self._recompute_rows(run, cache, key, compute, args, kwargs)
        return self._reuse(run, cache, key)

    def _compute(self, run: RunState, cache: BlockCache, branch: str, compute, args: tuple, kwargs: dict):
        shapes = tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in (*args, *kwargs.values()))
        flops = self._flops.get(shapes)
        if flops is None:  # measured once per input shape, with the counter diffusers' own numbers use
            output, flops = count_flops(lambda: compute(*args, **kwargs))
            self._flops[shapes] = flops
        else:
            output = compute(*args, **kwargs)
        run.add_flops(flops, flops)
        layout, tensors = _flatten(output, self.branch)
        cache.layouts[branch] = (layout, flops)
        order = self.settings.forecast_order
        for index, tensor in enumerate(tensors):
            key = f"{branch}.{index}"
            cache.store(key, tensor, run.step, order)
            cache.versions[key] = None if tensor.is_inference() else tensor._version
        return output

    def _reuse(self, run: RunState, cache: BlockCache, branch: str):
        layout, flops = cache.layouts[branch]
        tensors, forecast_flops = [], 0
        for index in range(_count(layout)):
            key = f"{branch}.{index}"
            stored, version = cache.branches[key], cache.versions[key]
            if version is not None and stored._version != version:
                raise RuntimeError(
                    f"{self.block_name}.{self.branch}: the block changed this branch's output in place after it was "
                    "kept, so reusing it would be wrong; this branch cannot be cached on the generic path."
                )
            value = cache.current(key, run.step)
            forecast_flops += 2 * len(cache.differences.get(key, ())) * value.numel()
            tensors.append(value)
        run.add_flops(forecast_flops, flops)
        return _unflatten(layout, tensors)


    def _store_score(self, run: RunState, cache: BlockCache, key: str, shape: torch.Size) -> None:
        """A full step's token scores (seeded random; one row per guidance pair) and zeroed counters."""
        batch, tokens = shape
        rows = batch // 2 if run.guidance_batch else batch
        cache.normalized_scores[key] = S.l2_normalize(S.random_scores(rows, tokens, run.generator))
        cache.since_recompute[key] = torch.zeros(rows, tokens, dtype=torch.int32, device=run.generator.device)

    def _recompute_rows(self, run: RunState, cache: BlockCache, key: str, compute, args: tuple, kwargs: dict):
        """The kept value (or its forecast) with this step's chosen tokens computed anew."""
        value = self._reuse(run, cache, key)
        name = None if args else "hidden_states"
        if not args and name not in kwargs:  # the token input is not recognisable: reuse the branch whole
            return value
        inputs = args[0] if args else kwargs[name]
        tokens = inputs.shape[1]
        count = round(self.settings.schedule.recompute_fraction(run.progress, self.layer_position, self.branch) * tokens)
        run.add_recompute(count / tokens)
        if count == 0:
            return value
        since, base = cache.since_recompute[key], cache.normalized_scores[key]
        score = base + S.frequency_term(since, self.settings.frequency_weight, self.settings.schedule.cache_interval)
        index = S.top_tokens(score, count)
        since.add_(1).scatter_(1, index, 0)
        if run.guidance_batch:
            index = torch.cat([index, index])
        index = index.to(inputs.device)
        rows = inputs.gather(1, index[..., None].expand(-1, -1, inputs.shape[-1]))
        row_args, row_kwargs = ((rows, *args[1:]), kwargs) if args else (args, {**kwargs, name: rows})
        shapes = ("rows", tuple(rows.shape))
        flops = self._flops.get(shapes)
        if flops is None:
            fresh, flops = count_flops(lambda: compute(*row_args, **row_kwargs))
            self._flops[shapes] = flops
        else:
            fresh = compute(*row_args, **row_kwargs)
        run.add_flops(flops, 0)
        value.scatter_(1, index[..., None].expand(-1, -1, value.shape[-1]), fresh.to(value.dtype))
        stored = cache.branches[f"{key}.0"]
        if cache.versions[f"{key}.0"] is not None:
            cache.versions[f"{key}.0"] = stored._version  # this write into the kept value is ours
        return value


def _flatten(output, branch: str) -> tuple[tuple | None, list[torch.Tensor]]:
    if isinstance(output, torch.Tensor):
        return None, [output]
    if isinstance(output, (tuple, list)) and all(item is None or isinstance(item, torch.Tensor) for item in output):
        return (type(output), tuple(item is None for item in output)), [item for item in output if item is not None]
    raise TypeError(f"branch {branch!r} returned {type(output).__name__}; the generic path caches tensors or tuples of tensors.")


def _count(layout: tuple | None) -> int:
    return 1 if layout is None else layout[1].count(False)


def _unflatten(layout: tuple | None, tensors: list[torch.Tensor]):
    if layout is None:
        return tensors[0]
    kind, missing = layout
    values = iter(tensors)
    return kind(None if absent else next(values) for absent in missing)


class GenericTransformerAdapter(TransformerAdapter):
    """A transformer read and cached from its ``ModelSpec``: FORA and forecasts on its branch submodules."""

    def __init__(self, transformer: nn.Module, spec: ModelSpec):
        super().__init__(transformer)
        self.spec = spec
        self.family = spec.family
        self.timestep_scale = spec.timestep_scale
        self.timestep_offset = spec.timestep_offset
        self.timestep_rises = spec.timestep_rises
        self.latents_argument = spec.latents_argument
        self.timestep_argument = spec.timestep_argument

    def blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"{name}.{i}", block) for name in self.spec.block_lists for i, block in enumerate(getattr(self.transformer, name))]

    def block_adapters(self, settings: EngineSettings) -> list:
        name = type(self.transformer).__name__
        if settings.merging is not None or settings.method == "tome":
            raise ValueError(f"{name} has no token merging yet (ToMeConfig needs a block adapter); use FORAConfig or ToCaConfig.")
        if settings.method == "toca" and not self.spec.partial_branches:
            raise ValueError(f"{name} has no token-wise path yet: it is cached by layer (FORAConfig, with or without forecast_order).")
        if settings.method == "toca" and settings.score != "random":
            raise ValueError(
                f"score={settings.score!r}: on {name} (the generic path) tokens are chosen by score='random' (the "
                "default here); the other scores read attention projections that only a block adapter taps."
            )
        return []

    def branch_adapters(self, settings: EngineSettings) -> list[BranchAdapter]:
        adapters, blocks = [], self.blocks()
        depth = max(len(blocks) - 1, 1)
        for position, (name, block) in enumerate(blocks):
            kind = type(block).__name__
            for branch in self.spec.branches.get(kind, ()):
                module = getattr(block, branch, None)
                if module is not None:
                    per_token = branch in self.spec.partial_branches.get(kind, ())
                    adapters.append(BranchAdapter(module, name, branch, settings, position / depth, per_token))
        if not adapters:
            raise TypeError(f"the spec of {type(self.transformer).__name__} names no branch its blocks have.")
        return adapters

    def read_call(self, args: tuple, kwargs: dict):
        """As for every model; latents given as a list of per-sample tensors (Z-Image) are read as their stack."""
        call = super().read_call(args, kwargs)
        latents = call.latents
        if isinstance(latents, (list, tuple)):
            call = replace(call, latents=torch.stack(list(latents)))
        return call

    def token_grid(self, latents: torch.Tensor, arguments: dict) -> tuple[int, ...]:
        """The latents' shape past batch and channels (the run's signature; nothing is selected by it)."""
        shape = latents[0].shape[1:] if isinstance(latents, (list, tuple)) else latents.shape[2:]
        return tuple(shape) or (latents.shape[1],)
