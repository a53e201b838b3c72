"""What every block adapter shares: token selection, gather/scatter, score refresh, tap capture.

A block adapter mirrors one diffusers block family's math split into branches, so that a full step
can store each branch output (before its gate) and a partial step can reuse it, recomputing chosen
tokens only.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

import torch
from torch import nn

from .. import scores as S
from ..config import EngineSettings
from ..merging import TokenMatch, bipartite_match, merge, unmerge
from ..selection import choose_tokens
from ..state import Memo, RunState
from ..store import BlockCache, CacheKey


@contextmanager
def capture_outputs(taps: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of ``taps`` (name -> module) during the ``with`` body.

    Used on full steps to read the projections a score needs (queries, keys, values) from the
    attention call itself, whatever attention processor the model uses.
    """
    captured: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out))
        for name, module in taps.items()
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(name for name in taps if name not in captured)
    if missing:
        raise RuntimeError(
            f"the attention processor did not call the modules that give {', '.join(missing)}; "
            "choose score='random', which needs no projection."
        )


def split_heads(projection: torch.Tensor, heads: int) -> torch.Tensor:
    """``(batch, tokens, heads * dim)`` or ``(batch, heads, tokens, dim)`` to the latter."""
    if projection.ndim == 4:
        return projection
    return projection.unflatten(-1, (heads, -1)).transpose(1, 2)


def query_key_taps(attn: nn.Module) -> dict[str, nn.Module]:
    """The modules whose outputs are the attention's final queries and keys."""
    return {
        "query": attn.norm_q if getattr(attn, "norm_q", None) is not None else attn.to_q,
        "key": attn.norm_k if getattr(attn, "norm_k", None) is not None else attn.to_k,
    }


@dataclass(frozen=True)
class Selection:
    """The tokens a branch recomputes: ``index`` ``(batch, count)`` per sequence, and ``flat``, the
    same rows in the ``(batch * tokens, dim)`` view, for whole-row copies."""

    index: torch.Tensor
    flat: torch.Tensor
    measured_from: int = 0  # the rows from which on were drawn at random: the error estimate reads those

    @property
    def count(self) -> int:
        return self.index.shape[1]


@torch.compiler.disable  # per-run Python state stays out of compiled graphs
def step_table(run: RunState, key: str, make, made_from: torch.Tensor | None = None):
    """This step's entry of a table over every step of the run, made once per run and guidance stream by
    ``make() -> (entries per step, FLOPs it cost)`` and made again when ``made_from`` (what it depends on
    besides the schedule) changes; None when the run's schedule is unknown.

    A block's per-step modulation is a matrix-vector product with its largest weight: memory traffic that a
    partial step's FLOPs do not show. One product over all steps reads the weight once per run.
    """
    if not run.plan.on_schedule:
        return None
    memo = run.memo.get(key, run.stream)
    if memo is None or (made_from is not None and not torch.equal(memo.sources[0], made_from)):
        entries, flops = make()
        memo = run.memo.put(key, run.stream, Memo(entries, flops, (made_from,)))
        run.ledger.add_flops(flops, 0)
    return memo.value[run.plan.step]


def gated_residual(residual: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``residual + gate * branch`` in one pass, as a contiguous tensor (the residual entering the first
    block may be a transposed view) so that rows can be gathered without a copy."""
    return torch.addcmul(residual, gate, branch).contiguous()


def gather_rows(tensor: torch.Tensor, selection: Selection) -> torch.Tensor:
    batch, tokens, dim = tensor.shape
    return tensor.reshape(batch * tokens, dim).index_select(0, selection.flat).view(batch, selection.count, dim)


def scatter_rows(target: torch.Tensor, selection: Selection, rows: torch.Tensor) -> None:
    """Write ``rows`` into the selected rows of ``target`` (a contiguous cache tensor), in place."""
    target.view(-1, target.shape[-1]).index_copy_(0, selection.flat, rows.reshape(-1, rows.shape[-1]).to(target.dtype))


class BlockAdapter:
    """Base of the per-family adapters.

    Args:
        block: the diffusers block.
        name: its qualified name in the transformer (keys its cache).
        layer_position: depth in [0, 1], for the layer factor of the ratio schedule.
        settings: the resolved engine settings.
    """

    # Partially computed branches and the token group each recomputes from ("image", "text", ...).
    branch_groups: dict[str, str] = {}

    def __init__(self, block: nn.Module, name: str, layer_position: float, settings: EngineSettings):
        self.block = block
        self.name = name
        self.layer_position = layer_position
        self.settings = settings
        scores, why = self.readable_scores()
        if settings.score is not None and settings.score not in scores:
            raise ValueError(f"score={settings.score!r} {why}: use {', '.join(repr(score) for score in scores)}.")
        self._flops_memo: dict[tuple, int] = {}
        self._row_offsets: dict[tuple, torch.Tensor] = {}

    def readable_scores(self) -> tuple[tuple[str, ...], str]:
        """The scores this block's taps can give, and why any other cannot (checked when the cache is applied)."""
        return tuple(S.SCORES), ""

    def forward(self, run: RunState, cache: BlockCache, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def run_hooked(self, run: RunState, original, args: tuple, kwargs: dict):
        """The block's call as its hook (``hooks.AdapterHook``) makes it; the adapter replaces the block's math."""
        return self.forward(run, run.block_cache(self.name), *args, **kwargs)

    @property
    def measured_branches(self) -> tuple[str, ...]:
        """The branches whose cached value's error is measured: those partial steps recompute rows of."""
        return tuple(self.branch_groups)

    @property
    def error_groups(self) -> dict[str, str]:
        """Each measured branch and the token group whose ``forecast_error`` score its errors add to."""
        return {branch: self.branch_groups[branch] for branch in self.measured_branches}

    @property
    def tapped_score(self) -> str | None:
        """The score a full step reads from the attention's projections (None: none, or one the engine measures)."""
        score = self.settings.score
        return score if self.settings.recomputes_tokens and score not in S.MEASURED_SCORES else None

    def keep(self, run: RunState, cache: BlockCache, branch: str, output: torch.Tensor) -> None:
        """Store a full step's branch output when partial steps will reuse it (with its divided
        differences when the settings forecast); under error control, first measure the error the
        cached value would have made on this step, and with the ``forecast_error`` score keep it per token."""
        if run.caching:
            key = CacheKey(branch)
            measured = run.plan.meter is not None and branch in self.measured_branches
            scored = self.settings.recomputes_tokens and self.settings.score == "forecast_error" and branch in self.error_groups
            # under the order choice the measurement makes every order's forecast itself
            forecast = self._kept_forecast(run, cache, key) if key in cache and (scored or measured and not run.plan.measured_orders) else None
            if measured and key in cache:
                run.measure_kept(cache, key, output, forecast)
            if scored:
                self.store_token_errors(run, cache, branch, output, forecast)
            cache.store(key, output.contiguous(), run.plan.step, self.settings.forecast_order)

    @torch.compiler.disable  # the step enters as a Python number: keep it out of compiled graphs
    def _kept_forecast(self, run: RunState, cache: BlockCache, key: CacheKey) -> torch.Tensor:
        return cache.current(key, run.plan.step, run.forecaster)

    @torch.compiler.disable
    def store_token_errors(self, run: RunState, cache: BlockCache, branch: str, output: torch.Tensor,
                           forecast: torch.Tensor | None) -> None:
        """The ``forecast_error`` score: each token's squared error of ``branch``'s forecast on this full step (zero
        before any), summed with the other branches of its group as the group's base score."""
        if forecast is None:
            error = output.new_zeros(output.shape[:2], dtype=torch.float32)
        else:
            error = torch.linalg.vector_norm(output - forecast, dim=-1, dtype=torch.float32).square()
        cache.token_errors[branch] = error
        group = self.error_groups[branch]
        branches = [name for name, named_group in self.error_groups.items() if named_group == group and name in cache.token_errors]
        self.store_base_score(run, cache, group, sum(cache.token_errors[name] for name in branches))

    @torch.compiler.disable
    def measure(self, run: RunState, cached: torch.Tensor, selection: "Selection", fresh: torch.Tensor) -> None:
        """Under error control, add the error of the recomputed rows' cached value (or forecast) ``cached``
        (the whole branch, before the fresh rows are written in) against their fresh values to the step's
        measurement; with a random share, of the randomly drawn rows only."""
        if run.plan.meter is None:
            return
        start = selection.measured_from
        cached_rows, fresh_rows = gather_rows(cached, selection)[:, start:], fresh[:, start:]
        run.measure_rows(cached_rows, fresh_rows)
        if run.recorder is not None and run.recorder and run.recorder[-1].step == run.plan.step:
            error = torch.linalg.vector_norm(fresh_rows - cached_rows) / torch.linalg.vector_norm(fresh_rows).clamp_min(1e-30)
            run.recorder[-1] = replace(run.recorder[-1], error=float(error))

    def reuse(self, run: RunState, cache: BlockCache, branch: str) -> torch.Tensor:
        """The value of ``branch`` on this partial step: its last output, or its forecast."""
        key = CacheKey(branch)
        if not cache.order(key):
            return cache.kept(key)
        return self._forecast(run, cache, key)

    @torch.compiler.disable  # the step enters as a Python number: keep it out of compiled graphs
    def _forecast(self, run: RunState, cache: BlockCache, key: CacheKey) -> torch.Tensor:
        value = cache.current(key, run.plan.step, run.forecaster)
        run.ledger.add_flops(cache.forecast_flops(key, value.numel(), run.forecaster), 0)
        return value

    def reuse_rows(self, run: RunState, cache: BlockCache, branch: str, selection: "Selection") -> torch.Tensor:
        """The selected rows of ``reuse(run, cache, branch)``, forecasting those rows only."""
        key = CacheKey(branch)
        rows = gather_rows(cache.kept(key), selection)
        terms = self._forecast_rows(run, cache, key, selection) if cache.order(key) else None
        return rows if terms is None else rows + terms.view_as(rows)

    @torch.compiler.disable
    def _forecast_rows(self, run: RunState, cache: BlockCache, key: CacheKey, selection: "Selection") -> torch.Tensor | None:
        terms = cache.forecast_terms(key, run.plan.step, selection.flat, run.forecaster)
        if terms is not None:
            run.ledger.add_flops(cache.forecast_flops(key, terms.numel(), run.forecaster), 0)
        return terms

    # -- token merging --------------------------------------------------------------------------
    @torch.compiler.disable
    def match_tokens(self, run: RunState, image_tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> TokenMatch | None:
        """This block's token matching for this step, from its input image tokens laid on ``grid`` (the
        run's token grid by default); None when nothing merges. Its similarity products are counted in
        the run's FLOPs."""
        merging = self.settings.merging
        if merging is None:
            return None
        grid = grid or run.signature.grid
        match = bipartite_match(image_tokens, grid, merging.ratio, merging.sx, merging.sy, merging.random, run.merge_generator)
        if not match.merged.shape[1]:
            return None
        batch, tokens, dim = image_tokens.shape
        sources = tokens - match.destinations.shape[1]
        run.ledger.add_flops(2 * batch * sources * match.destinations.shape[1] * dim, 0)
        run.ledger.add_merged(match.merged.shape[1] / tokens)
        return match

    @torch.compiler.disable  # bookkeeping: Python numbers and a memo stay out of compiled graphs
    def add_call_flops(self, run: RunState, shape: tuple, rows: dict[str, int] | None, modulation: bool, extra: int = 0) -> None:
        """Add one call's FLOPs to the run: ``self._flops(*shape, rows, modulation)`` plus ``extra``
        executed, the same call uncached beside it. Both depend on shapes only: each combination is
        computed once per adapter (walking the layers on every call costs more than the partial step saves)."""
        executed = self._call_flops(shape, rows, modulation)
        run.ledger.add_flops(executed + extra, self._call_flops(shape, None, True))

    def _call_flops(self, shape: tuple, rows: dict[str, int] | None, modulation: bool) -> int:
        key = (shape, tuple(sorted(rows.items())) if rows is not None else None, modulation)
        flops = self._flops_memo.get(key)
        if flops is None:
            flops = self._flops_memo[key] = self._flops(*shape, rows, modulation=modulation)
        return flops

    def merges(self, branch: str, match: TokenMatch | None) -> bool:
        return match is not None and branch in self.settings.merging.branches

    def merged(self, branch: str, match: TokenMatch | None, inputs: torch.Tensor, function) -> torch.Tensor:
        """``function`` on the merged tokens when ``branch`` merges, its output back on every token."""
        if not self.merges(branch, match):
            return function(inputs)
        return unmerge(function(merge(inputs, match)), match)

    # -- scores -------------------------------------------------------------------------------
    @torch.compiler.disable
    def store_base_score(self, run: RunState, cache: BlockCache, group: str, score: torch.Tensor) -> None:
        """Keep a full step's score of one token group (one row per guidance pair); the branches that
        recompute from it get their frequency counters on the first score."""
        if run.guidance_batch:
            score = S.merge_guidance_halves(score)
        cache.base_scores[group] = score
        cache.normalized_scores[group] = S.l2_normalize(score)  # once per full step, not on every partial step
        for branch, branch_group in self.branch_groups.items():
            if branch_group == group and branch not in cache.since_recompute:
                cache.since_recompute[branch] = torch.zeros(score.shape, dtype=torch.int32, device=score.device)

    @torch.compiler.disable
    def recomputed_whole(self, cache: BlockCache, *branches: str) -> None:
        """Zero the frequency counters of ``branches``, which this full step recomputed for every token,
        whether or not it also refreshed their score."""
        for branch in branches:
            counter = cache.since_recompute.get(branch)
            if counter is not None:
                counter.zero_()

    @torch.compiler.disable
    def store_score_rows(self, run: RunState, cache: BlockCache, group: str, index: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrite the base score of the tokens ``index`` (a partial step's selection, both guidance
        halves when batched) with ``rows``, their score now."""
        if run.guidance_batch:
            rows = S.merge_guidance_halves(rows)
            index = index[: rows.shape[0]]
        cache.base_scores[group].scatter_(1, index, rows)
        cache.normalized_scores[group] = S.l2_normalize(cache.base_scores[group])

    def bonus_frames(self, run: RunState) -> tuple[int, tuple[int, int]]:
        """How many frames the image tokens hold and each frame's token grid, for the spatial bonus."""
        return 1, run.signature.grid

    @torch.compiler.disable  # per-step Python state (counters, progress) stays out of compiled graphs
    def select(self, run: RunState, cache: BlockCache, branch: str, tokens: int) -> Selection | None:
        """The tokens ``branch`` recomputes on this partial step, or None when it recomputes none."""
        settings = self.settings
        fraction = settings.schedule.recompute_fraction(run.plan.progress, self.layer_position, branch)
        count = round(fraction * tokens)
        run.ledger.add_recompute(count / tokens)
        if count == 0:
            return None
        control = settings.control
        drawn = S.random_count(count, control.random_share) if control is not None else 0
        base = lambda: cache.normalized_scores[self.branch_groups[branch]]  # noqa: E731
        index = choose_tokens(run, settings, self.name, branch, base, cache.since_recompute[branch], count, drawn, self.bonus_frames(run))
        if run.guidance_batch:
            index = torch.cat([index, index])
        key = (index.shape[0], tokens, index.device)
        offsets = self._row_offsets.get(key)
        if offsets is None:
            offsets = self._row_offsets[key] = torch.arange(0, index.shape[0] * tokens, tokens, device=index.device)[:, None]
        return Selection(index, (index + offsets).reshape(-1), count - drawn if drawn else 0)
