"""The residual layouts: a cache that keeps, per span of consecutive blocks, what the span adds to its input.

A block's (or a span's) residual is its output minus its input: one tensor per stream of hidden states the
block returns (image, and text where the block returns it too), against two to four branch outputs per block
in the branch layout. On a full step every block runs as diffusers wrote it and each span's residual is kept
(with its divided differences when forecasting); on a partial step a span's first block returns its input
plus the residual (or its forecast) and the span's other blocks return their input unchanged, so that no block
of the span runs. FirstBlockCache, TeaCache and cache-dit's DBCache keep one such residual for the whole model.

Spans follow the order in which blocks run and never cross a break: a block whose input is not the previous
block's output (a concatenation or a split in the transformer between two block lists) starts a new span. The
spans are found on every full step from the tensors themselves, so that interleaved lists (OpenSora's spatial
and temporal blocks) and any block list order work without a spec of their own.

Which tensors a block takes and returns comes from diffusers' ``TransformerBlockRegistry``, else from
``BLOCK_STREAMS`` here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks._helpers import TransformerBlockRegistry
from torch import nn

from .flops import measured_flops
from .store import RESIDUAL, BlockCache, CacheKey

if TYPE_CHECKING:
    from .state import RunState

@dataclass(frozen=True)
class BlockStreams:
    """Where a block class takes and returns its hidden states: the arguments, and the positions in its
    output tuple (``None``: the block returns no such stream; an output that is a tensor is the hidden states)."""

    hidden_argument: str = "hidden_states"
    encoder_argument: str = "encoder_hidden_states"
    hidden_index: int | None = 0
    encoder_index: int | None = None


# Blocks that diffusers' TransformerBlockRegistry does not describe, or describes otherwise than they run
# (diffusers 0.42 registers BriaTransformerBlock as returning the hidden states alone, it returns both streams;
# and ZImageTransformerBlock's input as ``hidden_states``, it is ``x``).
BLOCK_STREAMS = {
    "BriaTransformerBlock": BlockStreams(hidden_index=1, encoder_index=0),
    "ZImageTransformerBlock": BlockStreams(hidden_argument="x"),
    "STDiT3Block": BlockStreams(hidden_argument="x"),
    "Kandinsky5TransformerEncoderBlock": BlockStreams(hidden_argument="x"),
    "BriaSingleTransformerBlock": BlockStreams(hidden_index=1, encoder_index=0),
}


def block_streams(block: nn.Module) -> BlockStreams | None:
    """How ``block`` takes and returns its hidden states, or None where nothing says so (or what is said names
    an argument its forward does not take)."""
    name = type(block).__name__
    streams = BLOCK_STREAMS.get(name)
    if name not in BLOCK_STREAMS:
        TransformerBlockRegistry._register()
        for cls, metadata in TransformerBlockRegistry._registry.items():
            if cls is type(block) or cls.__name__ == name:
                streams = BlockStreams(metadata.hidden_states_argument_name, metadata.encoder_hidden_states_argument_name,
                                       metadata.return_hidden_states_index, metadata.return_encoder_hidden_states_index)
    if streams is None:
        return None
    arguments = inspect.signature(type(block).forward).parameters
    needed = [streams.hidden_argument] + ([streams.encoder_argument] if streams.encoder_index is not None else [])
    return streams if all(argument in arguments for argument in needed) else None


@dataclass
class _OpenSpan:
    """A span whose blocks are running on a full step: its first block, its input and its last output."""

    start: str
    inputs: tuple[torch.Tensor, ...]
    versions: tuple[int | None, ...]
    outputs: tuple[torch.Tensor, ...] = ()
    blocks: int = 0


class SpanTracker:
    """One call's spans: opened and closed on full steps (the roles they give each block are kept for the
    partial steps), followed on partial steps. Keys of a span's residuals in its first block's ``BlockCache``:
    ``CacheKey(RESIDUAL, 0, i)``, i the position of the stream among those the block returns (``BlockStreams``)."""

    def __init__(self, span: int):
        self.span = span
        self.roles: dict[str, str] = {}  # block -> the first block of its span
        self.open: _OpenSpan | None = None
        self.last_outputs: tuple[torch.Tensor, ...] = ()  # the last block's output in this call (partial steps)
        self.chains: list[list[str]] = []  # the unbroken runs of blocks of the last full call, in order

    def begin_call(self, full: bool) -> None:
        self.open, self.last_outputs = None, ()
        if full:
            self.chains = []

    def end_call(self, run: RunState, full: bool) -> None:
        """Close the call's last span (a full step) and hold none of the call's tensors until the next."""
        if full:
            self.close(run)
        self.last_outputs = ()

    def chained(self, inputs: tuple[torch.Tensor, ...]) -> bool:
        return len(inputs) == len(self.last_outputs) and all(a is b for a, b in zip(inputs, self.last_outputs))

    def full_block(self, run: RunState, name: str, inputs: tuple[torch.Tensor, ...]) -> None:
        """Before block ``name`` runs on a full step: continue the open span or close it and open one here."""
        chained = self.chained(inputs)
        if not chained or self.open is None or self.open.blocks >= self.span:
            self.close(run)
            versions = tuple(None if t.is_inference() else t._version for t in inputs)
            self.open = _OpenSpan(name, inputs, versions)
        if chained and self.chains:
            self.chains[-1].append(name)
        else:
            self.chains.append([name])
        self.roles[name] = self.open.start

    def full_block_done(self, outputs: tuple[torch.Tensor, ...]) -> None:
        self.open.outputs, self.open.blocks = outputs, self.open.blocks + 1
        self.last_outputs = outputs

    def close(self, run: RunState) -> None:
        """Keep the open span's residual (measuring, under error control, what its forecast missed)."""
        span, self.open = self.open, None
        if span is None or not run.caching:
            return
        for tensor, version in zip(span.inputs, span.versions):
            if version is not None and tensor._version != version:
                raise RuntimeError(
                    f"a block of the span starting at {span.start} changed its input in place, so the span's residual "
                    "cannot be taken: cache this model with cache_layout='branch'."
                )
        cache = run.block_cache(span.start)
        for index, (before, after) in enumerate(zip(span.inputs, span.outputs)):
            if after is None or before is None:  # a stream the span's last block does not return (SD3's last text)
                continue
            key, residual = CacheKey(RESIDUAL, 0, index), after - before
            if run.plan.meter is not None and key in cache:
                run.measure_kept(cache, key, residual)
            cache.store(key, residual, run.plan.step, run.settings.forecast_order)


class ResidualHook(ModelHook):
    """The hook on each block in a residual layout (outermost on the block, so that the block adapter or the
    generic path's branch hooks under it pass through). In the branch layout it passes through itself."""

    def __init__(self, run: RunState, name: str, block: nn.Module, streams: BlockStreams):
        super().__init__()
        self.run = run
        self.name = name
        self.streams = streams
        self.block = block
        self.parameters = list(inspect.signature(type(block).forward).parameters)[1:]
        self._flops: dict[tuple, int] = {}

    def _argument(self, name: str, args: tuple, kwargs: dict):
        if name in kwargs:
            return kwargs[name]
        index = self.parameters.index(name) if name in self.parameters else len(args)
        return args[index] if index < len(args) else None

    def _inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        """The hidden states (and text stream where the block returns it) the block takes, in residual-key order."""
        inputs = [self._argument(self.streams.hidden_argument, args, kwargs)]
        if self.streams.encoder_index is not None:
            inputs.append(self._argument(self.streams.encoder_argument, args, kwargs))
        return tuple(inputs)

    def _outputs(self, output) -> tuple[torch.Tensor, ...]:
        if isinstance(output, torch.Tensor):
            return (output,)
        picked = [output[self.streams.hidden_index]]
        if self.streams.encoder_index is not None:
            picked.append(output[self.streams.encoder_index])
        return tuple(picked)

    def _assemble(self, structure: tuple | None, values: tuple[torch.Tensor, ...]):
        """An output shaped as the block's (``structure``: None for a tensor, else the tuple's type and length and
        which of its streams it returns as None), holding ``values``."""
        if structure is None:
            return values[0]
        kind, length, absent = structure
        values = tuple(None if gone else value for value, gone in zip(values, absent))
        items = [None] * length
        items[self.streams.hidden_index] = values[0]
        if self.streams.encoder_index is not None:
            items[self.streams.encoder_index] = values[1]
        return kind(items)

    def new_forward(self, module: nn.Module, *args, **kwargs):
        run = self.run
        tracker = run.spans
        if not run.in_call or tracker is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        inputs = self._inputs(args, kwargs)
        was_in_block, run.in_block = run.in_block, True
        try:
            if run.plan.is_full or self.name not in tracker.roles:
                return self._full(run, tracker, inputs, args, kwargs)
            return self._partial(run, tracker, inputs)
        finally:
            run.in_block = was_in_block

    def _full(self, run: RunState, tracker: SpanTracker, inputs, args: tuple, kwargs: dict):
        if run.plan.is_full:
            tracker.full_block(run, self.name, inputs)
        # every tensor argument's shape: a block's cost also depends on what it attends to (the text's length)
        shapes = tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in (*args, *kwargs.values()))
        output, flops = measured_flops(run, self._flops, shapes, self.name, self.block, lambda: self.fn_ref.original_forward(*args, **kwargs))
        run.ledger.add_flops(flops, flops)
        outputs = self._outputs(output)
        if not isinstance(output, torch.Tensor) and len(output) != len(outputs):
            raise RuntimeError(f"{self.name} returns {len(output)} values, of which a residual layout knows {len(outputs)}: "
                               "cache this model with cache_layout='branch'.")
        if run.plan.is_full:
            tracker.full_block_done(outputs)
            structure = None if isinstance(output, torch.Tensor) else (type(output), len(output), tuple(o is None for o in outputs))
            run.block_cache(self.name).structures[RESIDUAL, 0] = (structure, flops)
        else:
            tracker.last_outputs = outputs
        return output

    def _partial(self, run: RunState, tracker: SpanTracker, inputs):
        start = tracker.roles[self.name]
        structure, flops = run.block_cache(self.name).structures[RESIDUAL, 0]
        if start == self.name:
            cache: BlockCache = run.block_cache(start)
            values, forecast_flops = [], 0
            for index, before in enumerate(inputs):
                key = CacheKey(RESIDUAL, 0, index)
                if key not in cache:  # a stream the span does not return
                    values.append(None)
                    continue
                residual = cache.current(key, run.plan.step, run.forecaster)
                forecast_flops += cache.forecast_flops(key, residual.numel(), run.forecaster) + residual.numel()
                values.append(before + residual)
            outputs = tuple(values)
            run.ledger.add_flops(forecast_flops, flops)
        else:
            if not tracker.chained(inputs):
                raise RuntimeError(
                    f"{self.name} runs inside a span of blocks whose residual is cached, but its input is not the previous "
                    "block's output on this step: the transformer changed its block order; cache it with cache_layout='branch'."
                )
            outputs = inputs
            run.ledger.add_flops(0, flops)
        tracker.last_outputs = outputs
        return self._assemble(structure, outputs)


def known_streams(blocks: list[tuple[str, nn.Module]]) -> list[BlockStreams]:
    """Each block's streams; ValueError naming a block class whose streams are unknown."""
    streams = [block_streams(block) for _, block in blocks]
    for (name, block), known in zip(blocks, streams):
        if known is None:
            raise ValueError(
                f"{name} ({type(block).__name__}): which hidden states it takes and returns is not known, so a residual "
                "cache_layout cannot serve it; use cache_layout='branch' (and no cache_memory)."
            )
    return streams


def residual_hooks(run: RunState, blocks: list[tuple[str, nn.Module]]) -> list[tuple[nn.Module, ResidualHook]]:
    """A ``ResidualHook`` per block (``known_streams`` refuses a block whose streams are unknown)."""
    return [(block, ResidualHook(run, name, block, streams)) for (name, block), streams in zip(blocks, known_streams(blocks))]
