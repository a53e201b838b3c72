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
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import scores as S
from ..config import EngineSettings
from ..flops import measured_flops
from ..selection import choose_tokens
from ..state import RunState
from ..store import BlockCache, CacheKey
from . import TransformerAdapter
from .base import capture_outputs, split_heads



class _AttentionInputs(TorchFunctionMode):
    """Records the query, key and value of the first ``scaled_dot_product_attention`` call it sees: the
    attention's own inputs (after its norms, rotary embedding and concatenation), whatever its processor."""

    def __init__(self):
        super().__init__()
        self.found: tuple | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.found is None:
            bound = dict(zip(("query", "key", "value"), args)) | kwargs
            self.found = (bound["query"], bound["key"], bound["value"], bound.get("scale"))
        return func(*args, **kwargs)


class BlockTokens:
    """The token choice of one block on the generic path, shared by its per-token branches.

    On a full step the scored attention gives a score per token of its sequence (``attention``: the
    attention each token receives, and ``v_norm``: its value's norm, from the attention call's inputs;
    ``k_norm``: its key's norm before any QK norm, from the key projections), kept for the partial steps;
    each token group's slice is taken, normalised and given frequency counters when a partial step
    first needs it (a single-stream block runs its MLP before its attention). ``random`` draws seeded
    scores per group instead. One selection per group and block call serves all the group's branches.
    """

    def __init__(self, block: nn.Module, block_name: str, settings: EngineSettings, layer_position: float,
                 sequence: tuple[str, ...] = ()):
        self.block = block
        self.block_name = block_name
        self.settings = settings
        self.layer_position = layer_position
        self.attention, self.order = (sequence[0], sequence[1:]) if sequence else (None, ())

    def scores_from(self, branch: str) -> bool:
        return branch == self.attention and self.settings.score in S.SELF_ATTENTION_SCORES

    def scored_call(self, run: RunState, cache: BlockCache, compute) -> tuple[object, int]:
        """Run the scored attention (a full step), keeping its sequence's token scores; the output and
        the FLOPs of the scores."""
        if self.settings.score == "k_norm":
            scores, output = self._key_norms(compute)
            flops = 0
        else:
            with _AttentionInputs() as inputs:
                output = compute()
            if inputs.found is None:
                raise RuntimeError(
                    f"{self.block_name}.{self.attention} did not call scaled_dot_product_attention, which score="
                    f"{self.settings.score!r} reads; choose score='random'."
                )
            query, key, value, scale = inputs.found
            scores, flops = S.token_scores(self.settings.score, {"query": query, "key": key, "value": value}, scale=scale)
        cache.base_scores["sequence"] = S.merge_guidance_halves(scores) if run.guidance_batch else scores
        return output, flops

    def _key_norms(self, compute) -> tuple[torch.Tensor, object]:
        """Each token's key norm (head-averaged) before the attention's QK norm, in its sequence's order: the
        image (or joint) keys from ``to_k``, the text keys from ``add_k_proj``."""
        attention = getattr(self.block, self.attention)
        taps = {"to_k": attention.to_k} | ({"add_k_proj": attention.add_k_proj} if "text" in self.order else {})
        with capture_outputs(taps) as keys:
            output = compute()
        parts = [keys["add_k_proj" if group == "text" else "to_k"] for group in self.order]
        scores, _ = S.token_scores("k_norm", {"key": split_heads(torch.cat(parts, dim=1), attention.heads)})
        return scores, output

    def full_step(self, run: RunState, cache: BlockCache, group: str, batch: int, tokens: int) -> None:
        """A full step computed ``group`` for every token: zero its counters and score it afresh."""
        rows = batch // 2 if run.guidance_batch else batch
        cache.since_recompute[group] = torch.zeros(rows, tokens, dtype=torch.int32, device=run.signature.device)
        cache.normalized_scores.pop(group, None)

    def select(self, run: RunState, cache: BlockCache, group: str, branch: str, tokens: int) -> torch.Tensor | None:
        """The tokens ``group`` recomputes in this block call, ``(batch, count)`` with both guidance halves;
        None when none. One choice per step serves every branch of the group and every guidance stream
        (``ditcache.selection``)."""
        count = round(self.settings.schedule.recompute_fraction(run.plan.progress, self.layer_position, branch) * tokens)
        if not count:
            run.ledger.add_recompute(0.0)
            return None

        def base() -> torch.Tensor:
            if group not in cache.normalized_scores:
                cache.normalized_scores[group] = S.l2_normalize(self._group_scores(run, cache, group, tokens))
            return cache.normalized_scores[group]

        since = cache.since_recompute[group]
        index = choose_tokens(run, self.settings, self.block_name, group, base, since, count, self.drawn(count))
        run.ledger.add_recompute(index.shape[1] / tokens)
        return torch.cat([index, index]) if run.guidance_batch else index

    def drawn(self, count: int) -> int:
        """How many of ``count`` chosen tokens are drawn at random (last in the selection)."""
        control = self.settings.control
        return S.random_count(count, control.random_share) if control is not None else 0

    def _group_scores(self, run: RunState, cache: BlockCache, group: str, tokens: int) -> torch.Tensor:
        rows = cache.since_recompute[group].shape[0]
        if self.attention is None or self.settings.score == "random":
            return S.token_scores("random", {}, generator=run.generator, shape=(rows, tokens))[0]
        sequence = cache.base_scores.get("sequence")
        if sequence is None or group not in self.order:
            raise RuntimeError(f"{self.block_name}: no {self.settings.score} score of its {group!r} tokens was kept on the last full step.")
        scores = sequence[:, :tokens] if self.order.index(group) == 0 else sequence[:, -tokens:]
        if len(self.order) == 1 and sequence.shape[1] != tokens:
            raise RuntimeError(f"{self.block_name}: its attention saw {sequence.shape[1]} tokens, its {group!r} branch {tokens}.")
        return scores


class BranchAdapter:
    """One branch submodule: computes and keeps its output on full steps, reuses it on partial steps.

    Outputs may be a tensor or a tuple of tensors and ``None`` (a joint attention's image and text
    parts). A submodule called more than once per block call (CogView4 runs one feed-forward on the image,
    then on the text) keeps one value per call, in call order. A kept tensor that the block then changes in place would make every later reuse wrong: its
    version counter is checked at each reuse and a change raises ``RuntimeError``.
    """

    def __init__(self, module: nn.Module, block_name: str, branch: str, settings: EngineSettings,
                 tokens: BlockTokens, group: str | None = None, measured: bool = False):
        self.module = module
        self.block_name = block_name
        self.branch = branch
        self.settings = settings
        self.tokens = tokens
        self.group = group if settings.recomputes_tokens else None  # the token group it recomputes, if any
        self.measured = measured  # under error control, whether full steps measure its kept value's error
        self._flops: dict[tuple, int] = {}  # FLOPs of one call, per input shapes
        self._calls: tuple[int, int] = (-1, -1)  # (transformer call, times this branch ran in it)

    def run_hooked(self, run: RunState, original, args: tuple, kwargs: dict):
        """The branch's call as its hook (``hooks.AdapterHook``) makes it; ``original`` computes the branch."""
        return self.forward(run, run.block_cache(self.block_name), original, args, kwargs)

    def forward(self, run: RunState, cache: BlockCache, compute, args: tuple, kwargs: dict):
        serial, calls = self._calls
        calls = calls + 1 if serial == run.call_serial else 0
        self._calls = (run.call_serial, calls)
        group = None if self.group is None else (self.group if calls == 0 else f"{self.group}.{calls}")
        if run.plan.is_full or (self.branch, calls) not in cache.structures:
            output = self._compute(run, cache, calls, compute, args, kwargs)
            if group is not None and isinstance(output, torch.Tensor):
                self.tokens.full_step(run, cache, group, *output.shape[:2])
            return output
        if group is not None and cache.structures[self.branch, calls][0] is None and group in cache.since_recompute:
            return self._recompute_rows(run, cache, calls, group, compute, args, kwargs)
        return self._reuse(run, cache, calls)

    def _compute(self, run: RunState, cache: BlockCache, call_index: int, compute, args: tuple, kwargs: dict):
        score_flops = 0

        def call():
            nonlocal score_flops
            if not (self.settings.recomputes_tokens and self.tokens.scores_from(self.branch)):
                return compute(*args, **kwargs)
            output, score_flops = self.tokens.scored_call(run, cache, lambda: compute(*args, **kwargs))
            return output

        shapes = tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in (*args, *kwargs.values()))
        output, executed = measured_flops(run, self._flops, shapes, f"{self.block_name}.{self.branch}", self.module, call)
        flops = executed - score_flops  # the branch's own, as an uncached call costs
        run.ledger.add_flops(executed, flops)
        layout, tensors = _flatten(output, self.branch)
        cache.structures[self.branch, call_index] = (layout, flops)
        order = self.settings.forecast_order
        for index, tensor in enumerate(tensors if run.caching else ()):
            key = CacheKey(self.branch, call_index, index)
            if run.plan.meter is not None and self.measured and key in cache:
                run.measure_kept(cache, key, tensor)
            cache.store(key, tensor, run.plan.step, order)
        return output

    def _reuse(self, run: RunState, cache: BlockCache, call_index: int):
        layout, flops = cache.structures[self.branch, call_index]
        tensors, forecast_flops = [], 0
        for index in range(_count(layout)):
            key = CacheKey(self.branch, call_index, index)
            if cache.changed_in_place(key):
                raise RuntimeError(
                    f"{self.block_name}.{self.branch}: the block changed this branch's output in place after it was "
                    "kept, so reusing it would be wrong; this branch cannot be cached on the generic path."
                )
            value = cache.current(key, run.plan.step, run.forecaster)
            forecast_flops += cache.forecast_flops(key, value.numel(), run.forecaster)
            tensors.append(value)
        run.ledger.add_flops(forecast_flops, flops)
        return _unflatten(layout, tensors)

    def _recompute_rows(self, run: RunState, cache: BlockCache, call_index: int, group: str, compute, args: tuple, kwargs: dict):
        """The kept value (or its forecast) with this step's chosen tokens computed anew."""
        value = self._reuse(run, cache, call_index)
        name = None if args else "hidden_states"
        if not args and name not in kwargs:  # the token input is not recognisable: reuse the branch whole
            return value
        inputs = args[0] if args else kwargs[name]
        index = self.tokens.select(run, cache, group, self.branch, inputs.shape[1])
        if index is None:
            return value
        index = index.to(inputs.device)
        rows = inputs.gather(1, index[..., None].expand(-1, -1, inputs.shape[-1]))
        row_args, row_kwargs = ((rows, *args[1:]), kwargs) if args else (args, {**kwargs, name: rows})
        fresh, flops = measured_flops(run, self._flops, ("rows", tuple(rows.shape)), f"{self.block_name}.{self.branch}", self.module,
                                      lambda: compute(*row_args, **row_kwargs))
        run.ledger.add_flops(flops, 0)
        if run.plan.meter is not None:
            drawn = self.tokens.drawn(index.shape[1])
            start = index.shape[1] - drawn if drawn else 0
            cached_rows = value.gather(1, index[:, start:, None].expand(-1, -1, value.shape[-1]))
            run.measure_rows(cached_rows, fresh[:, start:].to(value.dtype))
        value.scatter_(1, index[..., None].expand(-1, -1, value.shape[-1]), fresh.to(value.dtype))
        cache.note_write(CacheKey(self.branch, call_index))  # when the kept value itself was written into
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

    def block_adapters(self, settings: EngineSettings) -> list:
        name = type(self.transformer).__name__
        if settings.merging is not None or settings.method == "tome":
            raise ValueError(f"{name} has no token merging yet (ToMeConfig needs a block adapter); use FORAConfig or ToCaConfig.")
        if settings.method == "toca" and not self.spec.partial_branches:
            raise ValueError(f"{name} has no token-wise path yet: it is cached by layer (FORAConfig, with or without forecast_order).")
        if settings.method == "toca" and settings.score != "random":
            scored = ", ".join(self.spec.attention_sequences) or "none"
            if settings.score in S.MEASURED_SCORES:
                raise ValueError(f"score={settings.score!r} is measured by the block adapters only (DiT, PixArt, FLUX.1, OpenSora), "
                                 f"not on the generic path ({name}); use 'attention', 'k_norm', 'v_norm' or 'random'.")
            if settings.score not in S.SELF_ATTENTION_SCORES:
                raise ValueError(
                    f"score={settings.score!r} is not available on the generic path ({name}): it reads a cross-attention "
                    "the specs do not name; use 'attention', 'k_norm', 'v_norm' or 'random'."
                )
            if not any(type(block).__name__ in self.spec.attention_sequences for _, block in self.blocks()):
                raise ValueError(
                    f"score={settings.score!r}: the spec of {name} declares no attention sequence to score (block classes "
                    f"with one: {scored}); use score='random'."
                )
        return []

    def branch_adapters(self, settings: EngineSettings) -> list[BranchAdapter]:
        adapters, blocks = [], self.blocks()
        depth = max(len(blocks) - 1, 1)
        for position, (name, block) in enumerate(blocks):
            kind = type(block).__name__
            tokens = BlockTokens(block, name, settings, position / depth, self.spec.attention_sequences.get(kind, ()))
            groups = self.spec.partial_branches.get(kind, {})
            for branch in self.spec.branches.get(kind, ()):
                module = getattr(block, branch, None)
                if module is not None:
                    # the error measured is that of the per-token branches, which partial steps measure too;
                    # of every branch on a model that has none
                    measured = branch in groups or not self.spec.partial_branches
                    adapters.append(BranchAdapter(module, name, branch, settings, tokens, groups.get(branch), measured))
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
