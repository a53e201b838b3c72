"""Wall-clock time of a call, the one way every command and benchmark of ditcache measures it: on a CUDA
device the stream is synchronised before each reading, so that a time covers the work, not its launch.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

import torch
from torch import nn

T = TypeVar("T")


class Clock:
    """Readings on ``device``; ``timed`` gives a call's result and seconds, and with ``inner`` also the
    seconds spent inside that module's calls (a pipeline's transformer: the part whose FLOPs a cache cuts)."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = str(device)
        self.cuda = self.device.startswith("cuda")
        self.inner = 0.0  # seconds inside ``inner`` during the last timed call

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def timed(self, call: Callable[[], T], inner: nn.Module | None = None) -> tuple[T, float]:
        entered: list[float] = []
        self.inner = 0.0

        def leave(*_):
            self.inner += self.now() - entered.pop()

        handles = [] if inner is None else [
            inner.register_forward_pre_hook(lambda *_: entered.append(self.now())),
            inner.register_forward_hook(leave),
        ]
        start = self.now()
        try:
            result = call()
        finally:
            for handle in handles:
                handle.remove()
        return result, self.now() - start
