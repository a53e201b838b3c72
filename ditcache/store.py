"""The cache store: every tensor a cached transformer keeps between steps, one ``BlockCache`` per block and guidance
stream, keyed the same way on every path (``CacheKey``). The block adapters, the generic path's branch hooks and the
residual layouts store and read through it; the store alone applies the codecs (``ditcache.codecs``: as computed,
float8, offloaded to host memory) and the forecast's divided differences.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from . import codecs
from .codecs import Stored
from .forecast import Forecaster


class CacheKey(NamedTuple):
    """Which tensor of a block a cache entry keeps, meaning the same on every path: the ``output``-th tensor of the
    ``call``-th call of ``branch`` within one call of the block. Block adapters keep one tensor per branch
    (``CacheKey("attn")``); the generic path every call of a branch module and every tensor of its output; residual
    layouts ``CacheKey(RESIDUAL, 0, i)``, the span's output minus its input on its i-th stream of hidden states."""

    branch: str
    call: int = 0
    output: int = 0


RESIDUAL = "residual"


@dataclass
class Entry:
    """One kept tensor: its value at the last full step and the Newton divided differences behind it, each as its
    codec stores it (``ditcache.codecs``)."""

    value: Stored
    differences: list[Stored]  # f[s0, s1], f[s0, s1, s2], ...
    nodes: list[int]  # the full steps s0 > s1 > ... they were taken at
    rounding: list[torch.Tensor] | None  # float8: each kept term's squared rounding error (on the device)
    version: int | None  # the value's version counter, when it is kept as computed on the device

    @property
    def terms(self) -> list[Stored]:
        return [self.value, *self.differences]


@dataclass
class BlockCache:
    """The cache store of one block (and guidance stream): its kept tensors (``Entry`` by ``CacheKey``) and
    token-selection state. Every path keeps its tensors here, and the store alone decides how: in which precision
    (``precision``, ``ditcache.codecs``), with how many forecast differences (``max_order``), on the device or in
    host memory (``offload``).

    With a forecast order ``K`` (1 to 4) each entry also keeps the Newton divided differences of its
    last ``K + 1`` full-step values, so that a partial step reuses the Taylor (Newton) extrapolation of
    the branch to that step instead of its last value; a polynomial of degree ``K`` in the step index is
    forecast exactly, whatever the spacing of the full steps. TaylorSeer forecasts
    ``F(k) = sum_i D^i k^i / i!`` instead, ``k`` the offset from the last full step and its differences
    divided by the last interval only. The two agree at order 1 (the line through the last two full
    steps); from order 2 on they differ even at an even spacing ``N``, where TaylorSeer's ``D^i / i!`` are
    the divided differences kept here but multiply ``k^i`` instead of ``k (k + N) ... (k + (i - 1) N)``,
    so that TaylorSeer is exact for degree 1 only (tests/test_forecast.py).

    The forecast state is anchored at full steps: rows a partial step recomputes are written into that
    step's forecast only (without a forecast, into the stored value, where they persist, as ToCa
    defines it). Re-anchoring recomputed rows in the stored value was measured too: within 0.2 dB on the
    reference DiT, 0.2-1.0 dB worse on the reference FLUX (eval/BENCHMARKS.md).

    With ``precision="float8"`` values and differences are kept in float8 with a scale per token
    (``ditcache.codecs``) and decoded when read: a partial step's recomputed rows then serve that step only,
    as with a forecast.
    """

    entries: dict[CacheKey, Entry] = field(default_factory=dict)
    structures: dict[tuple[str, int], tuple] = field(default_factory=dict)  # (branch, call) -> its output's structure and FLOPs
    base_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # per token group
    normalized_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # the same at unit L2 norm
    since_recompute: dict[str, torch.Tensor] = field(default_factory=dict)  # per branch
    token_errors: dict[str, torch.Tensor] = field(default_factory=dict)  # per branch: the forecast_error score's part
    text_keys: torch.Tensor | None = None  # cross-attention keys, to refresh entropy rows
    text_values: torch.Tensor | None = None  # cross-attention values, where partial steps recompute its rows
    precision: str = "model"  # how values and differences are stored (ditcache.codecs.CACHE_PRECISIONS)
    max_order: int = 4  # the run's layout's forecast order: ``store`` keeps no more differences
    offload: bool = False  # values and differences kept in host memory; device copies made on read or prefetched
    device: torch.device | None = None  # where the values are computed (and their device copies go)
    device_copies: dict[int, Stored] = field(default_factory=dict)  # offloaded: id(host copy) -> its device copy
    ready: object | None = None  # offloaded: the CUDA event after which a prefetch's copies may be read

    def __contains__(self, key: CacheKey) -> bool:
        return key in self.entries

    def order(self, key: CacheKey) -> int:
        """How many divided differences ``key`` keeps now (0: its value is reused as it is)."""
        entry = self.entries.get(key)
        return len(entry.differences) if entry is not None else 0

    def forecast_flops(self, key: CacheKey, numel: int, forecaster: Forecaster) -> int:
        """What forecasting ``numel`` elements of ``key`` with ``forecaster`` costs: a multiply and an add per
        difference it uses."""
        return 2 * forecaster.terms(self.order(key)) * numel

    def on_device(self, stored: Stored) -> Stored:
        """``stored`` where it is computed with: itself, or (offloaded) its device copy, made now if no prefetch
        made it."""
        if not self.offload:
            return stored
        if self.ready is not None:  # prefetched on the side stream: wait for the copies, and tell the allocator
            current = torch.cuda.current_stream()  # that this stream uses them, so that it keeps them until it is done
            current.wait_event(self.ready)
            for copy in self.device_copies.values():
                for tensor in (copy.data, copy.scale) if isinstance(copy, codecs.Float8Rows) else (copy,):
                    tensor.record_stream(current)
            self.ready = None
        copy = self.device_copies.get(id(stored))
        if copy is None:
            copy = self.device_copies[id(stored)] = codecs.to_device(stored, self.device)
        return copy

    def stored(self) -> list[Stored]:
        """Every kept value and difference, as stored (in host memory when offloaded)."""
        return [term for entry in self.entries.values() for term in entry.terms]

    def prefetch(self, stream) -> None:
        """Copy every offloaded value and difference to the device, on ``stream`` (a CUDA side stream; None on the
        CPU, where the copies are made now), ahead of the block's call."""
        if stream is None:
            for item in self.stored():
                self.on_device(item)
            return
        stream.wait_stream(torch.cuda.current_stream())  # the host copies of the last full step are complete
        with torch.cuda.stream(stream):
            for item in self.stored():
                if id(item) not in self.device_copies:  # a copy made already is not made again
                    self.device_copies[id(item)] = codecs.to_device(item, self.device)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def release(self) -> None:
        """Drop the device copies (the block's call is over)."""
        self.device_copies.clear()
        self.ready = None

    def store(self, key: CacheKey, value: torch.Tensor, step: int, order: int) -> None:
        """Keep a full step's ``value`` and update its divided differences up to ``order`` (at most ``max_order``)."""
        order = min(order, self.max_order)
        previous = self.entries.get(key)
        nodes = previous.nodes if previous is not None else []
        differences = []
        if order and previous is not None:
            old = [codecs.decode(self.on_device(d)) for d in previous.differences]
            difference = (value - codecs.decode(self.on_device(previous.value))) / (step - nodes[0])
            differences.append(difference)
            for k in range(1, min(order, len(old) + 1)):
                difference = (difference - old[k - 1]) / (step - nodes[k])
                differences.append(difference)
        terms = [value, *differences]
        kept = [codecs.encode(term, codecs.term_precision(self.precision, index > 0)) for index, term in enumerate(terms)]
        rounding = None
        if self.precision != "model":  # what storing alone loses, on the device: the error meter takes it off
            rounding = [torch.linalg.vector_norm(codecs.decode(item) - term, dtype=torch.float32).square()
                        for item, term in zip(kept, terms)]
        if self.offload:
            self.device = value.device
            for item in previous.terms if previous is not None else ():
                self.device_copies.pop(id(item), None)
            kept = [codecs.to_host(item) for item in kept]
        as_computed = kept[0] is value and not value.is_inference()
        self.entries[key] = Entry(kept[0], kept[1:], [step, *nodes][: order + 1], rounding,
                                  value._version if as_computed else None)

    def changed_in_place(self, key: CacheKey) -> bool:
        """Whether something wrote into ``key``'s value, kept as computed, since it was stored (or since
        ``note_write``): the model, which would make reusing it wrong."""
        entry = self.entries[key]
        return entry.version is not None and entry.value._version != entry.version

    def note_write(self, key: CacheKey) -> None:
        """The caller wrote into ``key``'s kept value itself (recomputed rows): not a change by the model."""
        entry = self.entries[key]
        if entry.version is not None:
            entry.version = entry.value._version

    def kept(self, key: CacheKey) -> torch.Tensor:
        """The value kept at the last full step: the stored tensor itself as computed (recomputed rows written
        into it persist), a decoded copy in float8, the device copy when offloaded (rows written into it serve the
        block's call only)."""
        return codecs.decode(self.on_device(self.entries[key].value))

    def current(self, key: CacheKey, step: int, forecaster: Forecaster) -> torch.Tensor:
        """The value a partial step uses for ``key``. Without differences: ``kept(key)``. With them: a new
        tensor, ``forecaster``'s forecast at ``step`` (recomputed rows written into it serve this step only;
        a copy of the kept value where the forecaster uses none of them, so the differences keep their base)."""
        entry = self.entries[key]
        value = self.kept(key)
        if not entry.differences:
            return value
        factors = forecaster.factors(step, entry.nodes, len(entry.differences))
        if not factors:
            return value.clone()
        for difference, factor in zip(entry.differences, factors):
            value = torch.add(value, codecs.decode(self.on_device(difference)), alpha=factor)
        return value

    def forecasts(self, key: CacheKey, step: int, forecaster: Forecaster) -> Iterator[tuple[torch.Tensor, Forecaster]]:
        """The forecast at ``step`` of every order from 0 to the differences kept, lowest first, each with the
        forecaster that makes it (for ``rounding_error``); one forecast alive at a time besides the kept value."""
        entry = self.entries[key]
        value = self.kept(key)
        yield value, replace(forecaster, order=0)
        for order in range(1, len(entry.differences) + 1):
            made_by = replace(forecaster, order=order)
            factor = made_by.factors(step, entry.nodes, order)[-1]
            value = torch.add(value, codecs.decode(self.on_device(entry.differences[order - 1])), alpha=factor)
            yield value, made_by

    def rounding_error(self, key: CacheKey, step: int, forecaster: Forecaster) -> torch.Tensor | None:
        """The squared error the storage's rounding adds to ``current(key, step)``, None when stored as
        computed: the kept terms' roundings, independent, add their squares, each times its forecast factor
        squared; the differences were taken from rounded values too, which adds as much again (measured on a
        branch moving on a line: tests/test_budget.py)."""
        entry = self.entries[key]
        if entry.rounding is None:
            return None
        factors = [1.0, *forecaster.factors(step, entry.nodes, len(entry.differences))] if entry.differences else [1.0]
        return 2 * sum(factor**2 * error for factor, error in zip(factors, entry.rounding))

    def forecast_terms(self, key: CacheKey, step: int, flat: torch.Tensor, forecaster: Forecaster) -> torch.Tensor | None:
        """The forecast's increment over the stored value, on the rows ``flat`` only (None without
        differences)."""
        entry = self.entries[key]
        terms = None
        for difference, factor in zip(entry.differences, forecaster.factors(step, entry.nodes, len(entry.differences))):
            rows = codecs.rows(self.on_device(difference), flat) * factor
            terms = rows if terms is None else terms + rows
        return terms

    def nbytes(self) -> int:
        """Device bytes: what is kept there (offloaded: the device copies alive now) and the per-token state."""
        kept = list(self.device_copies.values()) if self.offload else self.stored()
        rounding = [error for entry in self.entries.values() for error in entry.rounding or ()]
        tensors = [*kept, *rounding, *self.base_scores.values(), *self.normalized_scores.values(), *self.since_recompute.values(),
                   *self.token_errors.values(),
                   self.text_keys, self.text_values]
        return sum(codecs.nbytes(t) for t in tensors)

    def host_nbytes(self) -> int:
        """Host bytes of an offloaded cache's values and differences (0 on the device)."""
        return sum(codecs.nbytes(t) for t in self.stored()) if self.offload else 0
