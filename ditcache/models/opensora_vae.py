"""OpenSora 1.2's video VAE as a diffusers model: a per-frame SD-XL-style ``AutoencoderKL`` (8 x 8 in
space) followed by a causal 3D temporal VAE (4 x in time, in independent 17-frame chunks), with
per-channel latent normalisation ``(z - shift) / scale``.

Parameter and buffer names follow the released checkpoint (``hpcai-tech/OpenSora-VAE-v1.2``:
``spatial_vae.module.*``, ``temporal_vae.*``, ``scale``, ``shift``), so its ``model.safetensors`` loads
as it is, without the 2D VAE it was initialised from.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .released import ReleasedCheckpointMixin

SPATIAL_SCALE = 0.18215  # the released code scales 2D latents by this, not by the 2D config's factor
# The released model's 2D VAE (SD-XL VAE layout, as in PixArt-Sigma's repository).
RELEASED_SPATIAL = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    norm_num_groups=32, act_fn="silu", down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.13025, sample_size=1024,
)
RELEASED_SCALE = (3.85, 2.32, 2.33, 3.06)
RELEASED_SHIFT = (-0.10, 0.34, 0.27, 0.98)


def frame_chunks(frames: int, micro_frame_size: int | None) -> list[int]:
    """The lengths of the chunks the temporal VAE codes independently (one chunk without a size)."""
    size = micro_frame_size or frames
    return [min(size, frames - start) for start in range(0, frames, size)]


def latent_frames(frames: int, micro_frame_size: int | None = 17, time_factor: int = 4) -> int:
    """Latent frames of a ``frames``-frame video: each chunk padded in front to whole groups of ``time_factor``."""
    return sum(math.ceil(n / time_factor) for n in frame_chunks(frames, micro_frame_size))


class CausalConv3d(nn.Module):
    """A 3D convolution that sees only past frames: zero frames before the clip, none after; spatial
    zero padding keeps the size. Temporal stride ``stride``, spatial stride 1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = True):
        super().__init__()
        self.time_pad = (kernel_size - 1) + (1 - stride)
        self.space_pad = kernel_size // 2
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=(stride, 1, 1), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.space_pad
        return self.conv(F.pad(x, (p, p, p, p, self.time_pad, 0)))


class ResBlock3d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, bias=False)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, bias=False)
        if in_channels != out_channels:
            self.conv3 = CausalConv3d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv3(x) if hasattr(self, "conv3") else x
        return self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x)))))) + residual


class TemporalEncoder(nn.Module):
    def __init__(self, channels: int, latent_channels: int, filters: int, res_blocks: int, multipliers, downsample, groups: int):
        super().__init__()
        self.conv_in = CausalConv3d(channels, filters, 3, bias=False)
        self.block_res_blocks, self.conv_blocks = nn.ModuleList(), nn.ModuleList()
        previous = filters
        for level, multiplier in enumerate(multipliers):
            width = filters * multiplier
            self.block_res_blocks.append(nn.ModuleList(
                [ResBlock3d(previous if i == 0 else width, width, groups) for i in range(res_blocks)]))
            previous = width
            if level < len(multipliers) - 1:
                self.conv_blocks.append(CausalConv3d(width, width, 3, stride=2) if downsample[level] else nn.Identity())
        self.res_blocks = nn.ModuleList([ResBlock3d(previous, previous, groups) for _ in range(res_blocks)])
        self.norm1 = nn.GroupNorm(groups, previous)
        self.conv2 = CausalConv3d(previous, latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)
            if level < len(self.conv_blocks):
                x = self.conv_blocks[level](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(F.silu(self.norm1(x)))


class TemporalDecoder(nn.Module):
    def __init__(self, channels: int, latent_channels: int, filters: int, res_blocks: int, multipliers, downsample, groups: int):
        super().__init__()
        deepest = filters * multipliers[-1]
        self.time_strides = [2 if down else 1 for down in downsample]
        self.conv1 = CausalConv3d(latent_channels, deepest, 3)
        self.res_blocks = nn.ModuleList([ResBlock3d(deepest, deepest, groups) for _ in range(res_blocks)])
        blocks, convs = [None] * len(multipliers), [None] * (len(multipliers) - 1)
        previous = deepest
        for level in reversed(range(len(multipliers))):
            width = filters * multipliers[level]
            blocks[level] = nn.ModuleList([ResBlock3d(previous if i == 0 else width, width, groups) for i in range(res_blocks)])
            previous = width
            if level > 0:
                stride = self.time_strides[level - 1]
                convs[level - 1] = CausalConv3d(width, width * stride, 3) if stride > 1 else nn.Identity()
        self.block_res_blocks, self.conv_blocks = nn.ModuleList(blocks), nn.ModuleList(convs)
        self.norm1 = nn.GroupNorm(groups, previous)
        self.conv_out = CausalConv3d(previous, channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv1(z)
        for block in self.res_blocks:
            x = block(x)
        for level in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[level]:
                x = block(x)
            if level > 0:
                stride = self.time_strides[level - 1]
                x = self.conv_blocks[level - 1](x)
                if stride > 1:  # depth to time: channel c * stride + k becomes frame t * stride + k
                    batch, channels, frames, height, width = x.shape
                    x = x.view(batch, channels // stride, stride, frames, height, width).permute(0, 1, 3, 2, 4, 5)
                    x = x.reshape(batch, channels // stride, frames * stride, height, width)
        return self.conv_out(F.silu(self.norm1(x)))


class TemporalVAE(nn.Module):
    def __init__(self, channels: int = 4, latent_channels: int = 4, filters: int = 128, res_blocks: int = 4,
                 multipliers=(1, 2, 2, 4), downsample=(False, True, True), groups: int = 32):
        super().__init__()
        self.time_factor = 2 ** sum(downsample)
        self.encoder = TemporalEncoder(channels, 2 * latent_channels, filters, res_blocks, multipliers, downsample, groups)
        self.quant_conv = CausalConv3d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = CausalConv3d(latent_channels, latent_channels, 1)
        self.decoder = TemporalDecoder(channels, latent_channels, filters, res_blocks, multipliers, downsample, groups)

    def front_padding(self, frames: int) -> int:
        return -frames % self.time_factor

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A latent sample (the mean without ``generator``) of ``x`` padded in front to whole groups."""
        x = F.pad(x, (0, 0, 0, 0, self.front_padding(x.shape[2]), 0))
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        if generator is None:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean)
        return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))[:, :, self.front_padding(num_frames):]


class SpatialVAE(nn.Module):
    """A 2D ``AutoencoderKL`` applied frame by frame, ``micro_batch_size`` frames at a time."""

    def __init__(self, config: dict, micro_batch_size: int | None):
        super().__init__()
        self.module = AutoencoderKL(**config)
        self.micro_batch_size = micro_batch_size

    def _per_frame(self, x: torch.Tensor, function) -> torch.Tensor:
        batch, _, frames = x.shape[:3]
        flat = x.transpose(1, 2).flatten(0, 1)
        size = self.micro_batch_size or flat.shape[0]
        out = torch.cat([function(flat[i : i + size]) for i in range(0, flat.shape[0], size)])
        return out.unflatten(0, (batch, frames)).transpose(1, 2)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        def encode_frames(frames):
            posterior = self.module.encode(frames).latent_dist
            return (posterior.mean if generator is None else posterior.sample(generator)) * SPATIAL_SCALE

        return self._per_frame(x, encode_frames)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._per_frame(z, lambda frames: self.module.decode(frames / SPATIAL_SCALE).sample)


class OpenSoraVAE(ReleasedCheckpointMixin, ModelMixin, ConfigMixin):
    """OpenSora 1.2's VAE: video ``(B, 3, T, H, W)`` in [-1, 1] to normalised latents
    ``(B, 4, T', H / 8, W / 8)`` with ``T' = 5 * (T // 17) + ceil((T % 17) / 4)``, and back.

    Defaults are the released model; ``spatial_config`` is the 2D ``AutoencoderKL``'s config and the
    ``temporal_*`` fields the temporal VAE's; ``latent_scale``/``latent_shift`` fill the buffers ``scale`` and
    ``shift`` (the released names).
    """

    @register_to_config
    def __init__(
        self,
        spatial_config: dict | None = None,
        micro_batch_size: int | None = 4,
        micro_frame_size: int | None = 17,
        temporal_filters: int = 128,
        temporal_res_blocks: int = 4,
        temporal_multipliers: tuple[int, ...] = (1, 2, 2, 4),
        temporal_downsample: tuple[bool, ...] = (False, True, True),
        temporal_groups: int = 32,
        latent_scale: tuple[float, ...] = RELEASED_SCALE,
        latent_shift: tuple[float, ...] = RELEASED_SHIFT,
    ):
        super().__init__()
        spatial = dict(spatial_config or RELEASED_SPATIAL)
        latent = spatial["latent_channels"]
        self.spatial_vae = SpatialVAE(spatial, micro_batch_size)
        self.temporal_vae = TemporalVAE(latent, latent, temporal_filters, temporal_res_blocks,
                                        tuple(temporal_multipliers), tuple(temporal_downsample), temporal_groups)
        self.register_buffer("scale", torch.tensor(latent_scale, dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.register_buffer("shift", torch.tensor(latent_shift, dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.spatial_compression = 2 ** (len(spatial["block_out_channels"]) - 1)

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        factor = self.spatial_compression
        return latent_frames(num_frames, self.config.micro_frame_size, self.temporal_vae.time_factor), height // factor, width // factor

    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised latents; the posteriors' means without ``generator``, samples with it."""
        spatial = self.spatial_vae.encode(video, generator)
        latents, start = [], 0
        for length in frame_chunks(video.shape[2], self.config.micro_frame_size):
            latents.append(self.temporal_vae.encode(spatial[:, :, start : start + length], generator))
            start += length
        return (torch.cat(latents, dim=2) - self.shift.to(spatial.dtype)) / self.scale.to(spatial.dtype)

    def decode(self, latents: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Video ``(B, 3, num_frames, 8 h, 8 w)``, not clamped."""
        z = latents * self.scale.to(latents.dtype) + self.shift.to(latents.dtype)
        spatial, start = [], 0
        for length in frame_chunks(num_frames, self.config.micro_frame_size):
            size = math.ceil(length / self.temporal_vae.time_factor)
            spatial.append(self.temporal_vae.decode(z[:, :, start : start + size], num_frames=length))
            start += size
        return self.spatial_vae.decode(torch.cat(spatial, dim=2))

    @classmethod
    def from_released_config(cls, config: dict) -> "OpenSoraVAE":
        """The released ``config.json`` names the 2D VAE it started from and fixes the sizes; the weights
        file holds every tensor, so the 2D VAE is built here, not downloaded."""
        return cls(
            micro_batch_size=(config.get("vae_2d") or {}).get("micro_batch_size", 4),
            micro_frame_size=config.get("micro_frame_size", 17),
            latent_scale=tuple(config.get("scale", RELEASED_SCALE)),
            latent_shift=tuple(config.get("shift", RELEASED_SHIFT)),
        )
