"""What a cache really holds, for any method (ditcache's or a peer's): the bytes of the live tensors at the start
of transformer calls during a run, less what an uncached run holds at the same calls.

Every tensor the process holds is found through the garbage collector (tensors are tracked objects) and counted
once per storage; the pipeline's weights are left out. What an uncached run holds at the same call (latents,
prompt embeddings, the scheduler's state) is the same whatever caches, so the difference is the cache: its
values, its forecasts' terms, and any state its hooks keep between calls.
"""

from __future__ import annotations

import gc
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor


def _weight_storages(pipe) -> set[int]:
    modules = [component for component in pipe.components.values() if isinstance(component, torch.nn.Module)]
    tensors = [t for module in modules for t in (*module.parameters(), *module.buffers())]
    return {t.untyped_storage().data_ptr() for t in tensors if t.device.type != "meta"}


def live_tensor_bytes(excluded: set[int]) -> int:
    """Bytes of the storages of every live tensor, each storage once, but those in ``excluded`` (and fake tensors,
    which have none: a dry run's leftovers until the collector takes them)."""
    gc.collect()
    sizes: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some module proxies warns of deprecated names
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        if isinstance(obj, FakeTensor) or obj.device.type == "meta" or obj.is_sparse:
            continue
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage of their own (fake, functional)
            continue
        pointer = storage.data_ptr()
        if pointer and pointer not in excluded:
            sizes[pointer] = max(sizes.get(pointer, 0), storage.nbytes())
    return sum(sizes.values())


@contextmanager
def live_bytes_at_calls(pipe, every: int = 5) -> Iterator[list[int]]:
    """While the body runs, the live tensor bytes (weights left out) at the start of every ``every``-th call of
    ``pipe.transformer``, from the first."""
    samples: list[int] = []
    excluded, calls = _weight_storages(pipe), [0]

    def sample(_module, _args, _kwargs):
        if calls[0] % every == 0:
            samples.append(live_tensor_bytes(excluded))
        calls[0] += 1

    handle = pipe.transformer.register_forward_pre_hook(sample, with_kwargs=True)
    try:
        yield samples
    finally:
        handle.remove()


def held_bytes(samples: list[int], uncached: list[int]) -> int:
    """The most a cached run held beyond the uncached run, over the calls sampled in both."""
    return max((max(a - b, 0) for a, b in zip(samples, uncached)), default=0)
