"""How the cache stores a tensor: as computed, or in float8 (e4m3) with one scale per token; on the device, or
offloaded to host memory (pinned where CUDA is, so that copies overlap compute).

Pure tensor math; ``ditcache.state.BlockCache`` decides what it stores with which codec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max  # 448: each row is scaled so that its largest magnitude lands here
FLOAT8_RELATIVE_ERROR = 2.0**-4  # e4m3 keeps 3 mantissa bits: rounding moves a normal value by at most 1/16 of it
# "model": as computed; "float8": values and forecast differences in float8; "float8_differences": the value as
# computed, its differences in float8 (a forecast's differences are multiplied by factors that shrink with order,
# so their rounding matters least)
CACHE_PRECISIONS = ("model", "float8_differences", "float8")


@dataclass(frozen=True)
class Float8Rows:
    """A tensor kept in float8 e4m3 with one float32 scale per row (per token, the last dimension being the
    features): 1 byte an element plus 4 a row, against 2 (bf16) or 4 (fp32). Values down to 2**-6 / 448 of their
    row's largest magnitude keep a relative error of at most ``FLOAT8_RELATIVE_ERROR``; smaller ones (e4m3's
    subnormals) an absolute error of at most 2**-10 / 448 of that largest magnitude."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @classmethod
    def encode(cls, value: torch.Tensor) -> "Float8Rows":
        scale = value.abs().amax(dim=-1, keepdim=True).float().clamp_min(torch.finfo(torch.float32).tiny) / FLOAT8_MAX
        return cls((value.float() / scale).to(FLOAT8), scale, value.dtype)

    def decode(self) -> torch.Tensor:
        return (self.data.float() * self.scale).to(self.dtype)

    def rows(self, flat: torch.Tensor) -> torch.Tensor:
        """The decoded rows ``flat`` (indices over the leading dimensions flattened), ``(len(flat), features)``."""
        features = self.data.shape[-1]
        data = self.data.view(-1, features).index_select(0, flat)
        return (data.float() * self.scale.view(-1, 1).index_select(0, flat)).to(self.dtype)

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


Stored = torch.Tensor | Float8Rows


def term_precision(precision: str, difference: bool) -> str:
    """How a cache of ``precision`` keeps a value (``difference`` False) or a forecast difference: "model" or "float8"."""
    return "float8" if precision == "float8" or (precision == "float8_differences" and difference) else "model"


def encode(value: torch.Tensor, precision: str) -> Stored:
    """``value`` as the cache keeps a term of ``precision`` ("model" or "float8", ``term_precision``)."""
    return Float8Rows.encode(value) if precision == "float8" else value


def decode(stored: Stored) -> torch.Tensor:
    return stored.decode() if isinstance(stored, Float8Rows) else stored


def rows(stored: Stored, flat: torch.Tensor) -> torch.Tensor:
    """Rows ``flat`` of a stored tensor (indices over its leading dimensions flattened)."""
    if isinstance(stored, Float8Rows):
        return stored.rows(flat)
    return stored.view(-1, stored.shape[-1]).index_select(0, flat)


def nbytes(stored: Stored | None) -> int:
    if stored is None:
        return 0
    return stored.nbytes() if isinstance(stored, Float8Rows) else stored.numel() * stored.element_size()


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type == "cpu" and not torch.cuda.is_available():
        return tensor.clone()  # a host copy of its own, so that the offloaded path runs as it would from a GPU
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    return host.copy_(tensor, non_blocking=True)


def to_host(stored: Stored) -> Stored:
    """``stored`` copied to host memory (asynchronously from a GPU, into pinned memory)."""
    if isinstance(stored, Float8Rows):
        return Float8Rows(_host_copy(stored.data), _host_copy(stored.scale), stored.dtype)
    return _host_copy(stored)


def to_device(stored: Stored, device: torch.device) -> Stored:
    """A device copy of a host ``stored`` (asynchronous from pinned memory; a copy of its own on the CPU)."""
    def copy(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone() if device.type == "cpu" else tensor.to(device, non_blocking=True)

    if isinstance(stored, Float8Rows):
        return Float8Rows(copy(stored.data), copy(stored.scale), stored.dtype)
    return copy(stored)
