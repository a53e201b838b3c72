"""OpenSora 1.2's spatial-temporal DiT (STDiT3) as a diffusers model.

Written from the published architecture: patch embedding (1, 2, 2) of video latents, 2D sin-cos
positions per frame (scaled to the training resolution), timestep + fps conditioning through one
adaLN-single table, T5 captions through a two-layer projection, then pairs of blocks: a spatial block
attends within each frame, a temporal block across frames at each position (with rotary positions
over time); every block has qk-RMSNorm self-attention, cross-attention to the caption and an MLP.
Parameter and buffer names follow the released checkpoint (``hpcai-tech/OpenSora-STDiT-v3``), so its
``model.safetensors`` loads as it is (:meth:`STDiT3Model.from_pretrained` reads both that layout and
the diffusers one that :meth:`save_pretrained` writes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .released import ReleasedCheckpointMixin


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def sinusoidal_embedding(values: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """``[cos(v f), sin(v f)]`` with ``f = max_period ** (-i / half)``, in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a scalar (timestep or fps) through ``Linear, SiLU, Linear``."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(values.reshape(-1), self.frequency_size).to(dtype))


class FeedForward(nn.Module):
    """``fc1, GELU (tanh), fc2``."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """T5 features to the hidden size; ``y_embedding`` is the learned empty caption (guidance)."""

    def __init__(self, caption_channels: int, hidden_size: int, token_num: int):
        super().__init__()
        self.y_proj = FeedForward(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj(caption)


class RMSNorm(nn.Module):
    """RMS norm over the last dimension, in float32, with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class TemporalRotary(nn.Module):
    """Rotary positions over the sequence dimension, rotating interleaved channel pairs."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)  # saved in the released checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., sequence, dim)``."""
        positions = torch.arange(x.shape[-2], device=x.device, dtype=self.freqs.dtype)
        angles = (positions[:, None] * self.freqs[None]).repeat_interleave(2, dim=-1)
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return (x * angles.cos() + rotated * angles.sin()).to(x.dtype)


class SelfAttention(nn.Module):
    """Fused ``qkv`` projection, qk RMS norm per head, optional rotary positions, ``proj``."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: TemporalRotary | None = None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        query, key, value = self.qkv(x).view(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        query, key = self.q_norm(query), self.k_norm(key)
        if rope is not None:
            query, key = rope(query), rope(key)
        out = F.scaled_dot_product_attention(query, key, value, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to their own caption's valid tokens."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def text_keys_values(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(batch, heads, text, head_dim)`` keys and values of the caption ``y`` ``(batch, text, dim)``."""
        batch, text, _ = y.shape
        return self.kv_linear(y).view(batch, text, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return self.q_linear(x).view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``mask``: ``(batch, text)``, True on the caption tokens to attend to; None for all."""
        key, value = self.text_keys_values(y)
        return self.attend(self.queries(x), key, value, mask)

    def attend(self, query, key, value, mask) -> torch.Tensor:
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
        batch, _, tokens, _ = query.shape
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class STDiT3Block(nn.Module):
    """One spatial (``temporal=False``) or temporal block. Tokens enter as ``(batch, T * S, dim)``,
    frame-major; the self-attention regroups them per frame (spatial) or per position (temporal)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = FeedForward(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def modulation(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """shift, scale, gate of attention, then of the MLP, each ``(batch, 1, dim)``."""
        return (self.scale_shift_table[None] + t.reshape(t.shape[0], 6, -1)).chunk(6, dim=1)

    def frames_to_groups(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """``(B, T*S, C)`` to the attention's sequences: ``(B*T, S, C)`` or, temporal, ``(B*S, T, C)``."""
        batch, tokens, dim = x.shape
        x = x.view(batch, frames, tokens // frames, dim)
        if self.temporal:
            x = x.transpose(1, 2)
        return x.reshape(-1, x.shape[2], dim)

    def groups_to_frames(self, x: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        _, length, dim = x.shape
        x = x.view(batch, -1, length, dim)
        if self.temporal:
            x = x.transpose(1, 2)
        return x.reshape(batch, -1, dim)

    def self_attention(self, x_modulated: torch.Tensor, frames: int, rope: TemporalRotary | None) -> torch.Tensor:
        out = self.attn(self.frames_to_groups(x_modulated, frames), rope if self.temporal else None)
        return self.groups_to_frames(out, x_modulated.shape[0], frames)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        t0: torch.Tensor | None = None,
        T: int | None = None,
        S: int | None = None,
        rope: TemporalRotary | None = None,
    ) -> torch.Tensor:
        """``t``: the ``(batch, 6 * dim)`` adaLN-single vector; ``t0`` and ``x_mask`` ``(batch, T)``: frames
        where ``x_mask`` is False are conditioning frames, modulated as at timestep 0."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(t)
        zero = self.modulation(t0) if x_mask is not None else None

        x_m = self._modulate(self.norm1(x), shift_msa, scale_msa, zero, 0, x_mask, T)
        attn = self.self_attention(x_m, T, rope)
        x = x + self._gate(attn, gate_msa, zero, 2, x_mask, T)
        x = x + self.cross_attn(x, y, mask)
        x_m = self._modulate(self.norm2(x), shift_mlp, scale_mlp, zero, 3, x_mask, T)
        return x + self._gate(self.mlp(x_m), gate_mlp, zero, 5, x_mask, T)

    @staticmethod
    def _modulate(x, shift, scale, zero, first, x_mask, frames):
        out = modulate(x, shift, scale)
        if zero is None:
            return out
        return select_frames(x_mask, out, modulate(x, zero[first], zero[first + 1]), frames)

    @staticmethod
    def _gate(x, gate, zero, index, x_mask, frames):
        out = gate * x
        if zero is None:
            return out
        return select_frames(x_mask, out, zero[index] * x, frames)


def select_frames(x_mask: torch.Tensor, x: torch.Tensor, x_zero: torch.Tensor, frames: int) -> torch.Tensor:
    """Per frame, ``x`` where ``x_mask`` is True, ``x_zero`` elsewhere (tokens frame-major)."""
    batch, tokens, dim = x.shape
    keep = x_mask[:, :, None, None]
    out = torch.where(keep, x.view(batch, frames, -1, dim), x_zero.view(batch, frames, -1, dim))
    return out.reshape(batch, tokens, dim)


class PositionEmbedding2D(nn.Module):
    """2D sin-cos positions of one frame's ``height x width`` patches, stretched to ``base_size`` and
    divided by ``scale`` (the resolution against the training one), as the released model computes them."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half)), persistent=False)

    def _sin_cos(self, positions: torch.Tensor) -> torch.Tensor:
        angles = positions[:, None] * self.inv_freq[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    def forward(self, height: int, width: int, scale: float, base_size: int | None, dtype, device) -> torch.Tensor:
        rows = torch.arange(height, device=device, dtype=torch.float32) / scale
        cols = torch.arange(width, device=device, dtype=torch.float32) / scale
        if base_size is not None:
            rows, cols = rows * (base_size / height), cols * (base_size / width)
        row_grid, col_grid = torch.meshgrid(rows, cols, indexing="ij")
        embedding = torch.cat([self._sin_cos(col_grid.reshape(-1)), self._sin_cos(row_grid.reshape(-1))], dim=-1)
        return embedding[None].to(dtype)


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W)``, zero-padded up to whole patches, to ``(B, T*H*W patches, hidden)``."""
        pt, ph, pw = self.patch_size
        _, _, frames, height, width = x.shape
        x = F.pad(x, (0, -width % pw, 0, -height % ph, 0, -frames % pt))
        return self.proj(x).flatten(2).transpose(1, 2)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_volume: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, patch_volume * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x, t, x_mask=None, t0=None, frames=None) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        out = modulate(self.norm_final(x), shift, scale)
        if x_mask is not None:  # as released: the timestep-0 frames re-normalise the modulated tensor
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)
            out = select_frames(x_mask, out, modulate(self.norm_final(out), shift0, scale0), frames)
        return self.linear(out)


class STDiT3Model(ReleasedCheckpointMixin, ModelMixin, ConfigMixin):
    """OpenSora 1.2's STDiT3. Defaults are the released 1.2 model (``hpcai-tech/OpenSora-STDiT-v3``).

    Call: ``model(x, timestep, y, mask, x_mask=None, fps=None, height=None, width=None)``: latents
    ``(B, C, T, H, W)``, timesteps in [0, 1000], T5 features ``(B, 1, L, caption_channels)``, caption mask
    ``(B, L)`` (1 on tokens), fps ``(B,)``, and the video's pixel height and width ``(B,)`` (they set the
    positions' scale against ``input_sq_size``). Returns ``(B, out_channels, T, H, W)``, the first
    ``in_channels`` being the predicted velocity (the rest, with ``pred_sigma``, is unused by the sampler).
    """

    _supports_gradient_checkpointing = False
    _no_split_modules = ["STDiT3Block"]

    @register_to_config
    def __init__(
        self,
        input_sq_size: int = 512,
        in_channels: int = 4,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        pred_sigma: bool = True,
        drop_path: float = 0.0,
        caption_channels: int = 4096,
        model_max_length: int = 300,
        qk_norm: bool = True,
        skip_y_embedder: bool = False,
    ):
        super().__init__()
        if drop_path:
            raise ValueError("`drop_path` must be 0: ditcache runs STDiT3 for inference only.")
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.patch_size = tuple(patch_size)
        self.pos_embed = PositionEmbedding2D(hidden_size)
        self.rope = TemporalRotary(hidden_size // num_heads)
        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.fps_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, model_max_length)
        self.spatial_blocks = nn.ModuleList(
            [STDiT3Block(hidden_size, num_heads, mlp_ratio, qk_norm, temporal=False) for _ in range(depth)]
        )
        self.temporal_blocks = nn.ModuleList(
            [STDiT3Block(hidden_size, num_heads, mlp_ratio, qk_norm, temporal=True) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, math.prod(self.patch_size), self.out_channels)

    def token_grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        """(frames, height, width) in patches, counting the zero padding up to whole patches."""
        return tuple(-(-size // patch) for size, patch in zip(latents.shape[2:], self.patch_size))

    def null_caption(self, batch: int) -> torch.Tensor:
        """The learned empty caption ``(batch, 1, L, caption_channels)`` for classifier-free guidance."""
        return self.y_embedder.y_embedding[None, None].expand(batch, 1, -1, -1)

    def encode_caption(self, y: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projected caption ``(B, L, hidden)`` and its boolean token mask ``(B, L)`` (None: all tokens)."""
        if not self.config.skip_y_embedder:
            y = self.y_embedder(y)
        y = y.squeeze(1)
        if mask is None:
            return y, None
        mask = mask.reshape(mask.shape[0], -1)
        if mask.shape[0] != y.shape[0]:
            mask = mask.repeat(y.shape[0] // mask.shape[0], 1)
        return y, mask.bool()

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        height: torch.Tensor | None = None,
        width: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        dtype = self.x_embedder.proj.weight.dtype
        batch, _, frames_in, height_in, width_in = x.shape
        x = x.to(dtype)
        frames, rows, cols = self.token_grid(x)
        tokens_per_frame = rows * cols
        timestep = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep.reshape(-1)
        timestep = timestep.to(dtype)  # rounded to the model's dtype before the sinusoid, as released

        if height is None or width is None:
            scale = 1.0  # positions as at the training resolution
        else:  # a product of Python floats, as released (not in the tensors' dtype)
            scale = (float(height.reshape(-1)[0]) * float(width.reshape(-1)[0])) ** 0.5 / self.config.input_sq_size
        positions = self.pos_embed(rows, cols, scale, round(tokens_per_frame**0.5), dtype, x.device)

        fps_embedding = 0
        if fps is not None:  # one value, one per prompt, or one per row: repeated to the batch, as released
            fps = torch.as_tensor(fps, device=x.device).reshape(-1)
            fps_embedding = self.fps_embedder(fps.repeat(batch // fps.numel()), dtype)
        t = self.t_embedder(timestep, dtype) + fps_embedding
        t_mlp = self.t_block(t)
        t0 = t0_mlp = None
        if x_mask is not None:
            t0 = self.t_embedder(torch.zeros_like(timestep), dtype) + fps_embedding
            t0_mlp = self.t_block(t0)

        y, caption_mask = self.encode_caption(y.to(dtype), mask)
        x = self.x_embedder(x)
        x = (x.view(batch, frames, tokens_per_frame, -1) + positions[:, None]).reshape(batch, frames * tokens_per_frame, -1)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            x = spatial(x, y, t_mlp, caption_mask, x_mask, t0_mlp, frames, tokens_per_frame, rope=None)
            x = temporal(x, y, t_mlp, caption_mask, x_mask, t0_mlp, frames, tokens_per_frame, rope=self.rope)
        x = self.final_layer(x, t, x_mask, t0, frames)
        out = self.unpatchify(x, frames, rows, cols)[:, :, :frames_in, :height_in, :width_in].float()
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def unpatchify(self, x: torch.Tensor, frames: int, rows: int, cols: int) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        batch = x.shape[0]
        x = x.view(batch, frames, rows, cols, pt, ph, pw, self.out_channels)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(batch, self.out_channels, frames * pt, rows * ph, cols * pw)

    @classmethod
    def from_released_config(cls, config: dict) -> "STDiT3Model":
        """The released ``config.json`` holds this model's arguments (and training-only ones, ignored)."""
        return cls.from_config(config)
