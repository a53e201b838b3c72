"""FLOPs accounting, counted the way ``torch.utils.flop_counter.FlopCounterMode`` counts them:
matrix products and convolutions (2 FLOPs per multiply-add); norms, activations and softmax are free.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def linear_flops(layer: nn.Linear, rows: int) -> int:
    return 2 * rows * layer.in_features * layer.out_features


_FLOPS_PER_ROW: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


@torch.compiler.disable  # bookkeeping: a compiled graph would guard on the weak cache's changing keys
def linears_flops(module: nn.Module, rows: int) -> int:
    """All ``nn.Linear`` layers of ``module`` applied once to ``rows`` rows.

    The per-row cost is found once per module (walking its submodules on every partial step of every
    block costs tens of microseconds); layers added to the module later are not seen.
    """
    per_row = _FLOPS_PER_ROW.get(module)
    if per_row is None:
        layers = [layer for layer in module.modules() if isinstance(layer, nn.Linear)]
        per_row = _FLOPS_PER_ROW[module] = sum(linear_flops(layer, 1) for layer in layers)
    return rows * per_row


def attention_core_flops(batch: int, heads: int, queries: int, keys: int, head_dim: int) -> int:
    """``softmax(Q K^T) V``: two batched products."""
    return 4 * batch * heads * queries * keys * head_dim


@dataclass(frozen=True)
class BranchCost:
    """What one branch of a block computes, declared by its adapter: the modules each computed row runs
    through (every ``nn.Linear`` inside counts; per token group where one attention serves two, as FLUX's
    double-stream blocks), the modules each key row of another sequence runs through (a cross-attention's
    text), and the attention core ``(heads, head_dim)``, over all the rows, or the rows against the keys."""

    rows: dict[str, tuple[nn.Module, ...]]
    keys: tuple[nn.Module, ...] = ()
    attention: tuple[int, int] | None = None

    def flops(self, batch: int, rows: dict[str, int], keys: int = 0, project_keys: bool = True,
              sequences: tuple[int, int] | None = None) -> int:
        """One call's FLOPs: ``rows`` computed per sample and token group, ``keys`` key rows of the other
        sequence (0: the attention is over the rows themselves), ``project_keys`` False when they were
        projected on an earlier call; ``sequences = (count, length)`` when the attention runs over separate
        sequences instead of one per sample (OpenSora's frames or positions)."""
        computed = sum(rows.get(group, 0) for group in self.rows)
        if not computed:
            return 0
        flops = sum(linears_flops(module, batch * rows.get(group, 0)) for group, modules in self.rows.items() for module in modules)
        flops += sum(linears_flops(module, batch * keys) for module in self.keys) if project_keys else 0
        if self.attention is not None:
            count, length = sequences or (batch, computed)
            flops += attention_core_flops(count, self.attention[0], length, keys or length, self.attention[1])
        return flops


def _layer_call_flops(layer: nn.Module, output: torch.Tensor) -> int:
    if isinstance(layer, nn.Linear):
        return 2 * output.numel() * layer.in_features
    kernel = layer.weight.shape[1:].numel()  # in_channels / groups * kernel size
    return 2 * output.numel() * kernel


@contextmanager
def record_layer_flops(module: nn.Module, include: Callable[[], bool], exclude: tuple[nn.Module, ...] = ()) -> Iterator[list[int]]:
    """Sum the FLOPs of every linear and convolution call under ``module`` while ``include()`` is true,
    leaving out the layers inside ``exclude`` (counted elsewhere).

    Yields a one-element list holding the running total.
    """
    total = [0]

    def count(layer, _inputs, output):
        if include():
            total[0] += _layer_call_flops(layer, output)

    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    excluded = {id(layer) for part in exclude for layer in part.modules()}
    handles = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, layers) and id(m) not in excluded]
    try:
        yield total
    finally:
        for handle in handles:
            handle.remove()


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], object], module: nn.Module | None = None) -> tuple[object, int]:
    """Run ``fn`` under ``FlopCounterMode`` and return ``(result, FLOPs)``.

    With ``module``, only the FLOPs executed inside its calls are returned (``module`` must be called
    as a top-level model, e.g. a pipeline's transformer). Adds the CPU fused attention kernel, which
    the stock counter leaves out, so CPU and CUDA counts agree.
    """
    custom = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        result = fn()
    if module is None:
        return result, counter.get_total_flops()
    return result, sum(counter.get_flop_counts().get(type(module).__name__, {}).values())


def measured_flops(run, counted: dict, shapes: tuple, name: str, module: nn.Module, call: Callable[[], object]) -> tuple[object, int]:
    """``call()`` and its FLOPs, measured with ``FlopCounterMode`` (the counter diffusers' own numbers use) on
    the first call with these input ``shapes`` and remembered in ``counted`` for the next ones.

    Counting never breaks a run: where the counter cannot run the call (flex attention's higher-order op), it
    runs again without it and only ``module``'s linear layers are counted; ``run.flops_uncounted`` (read by
    ``CacheStats.flops_uncounted``) names ``name`` and why."""
    flops = counted.get(shapes)
    if flops is not None:
        return call(), flops
    try:
        output, flops = count_flops(call)
    except Exception as error:  # noqa: BLE001 - the model's own errors raise again from the plain call
        with record_layer_flops(module, lambda: True) as total:
            output = call()
        flops = total[0]
        why = f"{type(error).__name__}: {str(error)[:200]}"
        if not run.flops_uncounted:  # once; cache_stats lists every such call
            warnings.warn(f"{name} (and the branches that cache_stats(...).flops_uncounted names): FLOPs counted "
                          f"from their linear layers only; FlopCounterMode failed with {why}", stacklevel=3)
        run.flops_uncounted[name] = why
    counted[shapes] = flops
    return output, flops
