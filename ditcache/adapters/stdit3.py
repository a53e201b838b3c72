"""Adapter for OpenSora 1.2's ``STDiT3Block`` (spatial and temporal blocks alike).

Branches: ``attn`` (self-attention within a frame or across frames, reused whole on partial steps),
``cross_attn`` and ``mlp`` (recomputed for the selected tokens; each token is independent in both).
Tokens are the video's ``T * S`` patches, frame-major; scores taken on the attention's groups (frames
or positions) are laid back in that order, so a selection spans the whole video. The full path repeats
the block's forward operation for operation. Token merging works on each frame's patch grid, in the
spatial blocks (self-attention and MLP); temporal blocks attend across frames at one position, where
merging positions would mix the sequences, and stay unmerged.
"""

from __future__ import annotations

import torch

from .. import scores as S
from ..config import EngineSettings
from ..flops import BranchCost
from ..models.stdit3 import STDiT3Block, modulate
from ..state import RunState
from ..store import BlockCache, CacheKey
from .base import BlockAdapter, capture_outputs, gated_residual, gather_rows, scatter_rows


class STDiT3BlockAdapter(BlockAdapter):
    branch_groups = {"cross_attn": "image", "mlp": "image"}

    def __init__(self, block: STDiT3Block, name: str, layer_position: float, settings: EngineSettings):
        super().__init__(block, name, layer_position, settings)
        attn, cross = block.attn, block.cross_attn
        self.costs = {
            "attn": BranchCost({"image": (attn,)}, attention=(attn.heads, attn.head_dim)),
            "cross_attn": BranchCost({"image": (cross.q_linear, cross.proj)}, keys=(cross.kv_linear,), attention=(cross.heads, cross.head_dim)),
            "mlp": BranchCost({"image": (block.mlp,)}),
        }
        if settings.merging is not None and "cross_attn" in settings.merging.branches:
            raise ValueError(f"{name}: STDiT3 merges tokens for self-attention and the MLP only; set merge_crossattn=False.")
        if settings.merging is not None and "attn" in settings.merging.branches and settings.score in S.SELF_ATTENTION_SCORES:
            raise ValueError(
                f"score={settings.score!r} reads self-attention projections, which token merging changes on STDiT3; "
                "use score='cross_attention_entropy' (the OpenSora preset's) or 'random'."
            )

    def forward(
        self,
        run: RunState,
        cache: BlockCache,
        x: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        t0: torch.Tensor | None = None,
        frames: int | None = None,
        tokens_per_frame: int | None = None,
        rope=None,
    ) -> torch.Tensor:
        if x_mask is not None:
            raise ValueError("conditioning frames (`x_mask`) are not supported by ditcache's STDiT3 caching.")
        self.frames = frames  # for the spatial bonus, which the shared selection code applies per frame
        modulation = self.block.modulation(t)
        if run.plan.is_full:
            return self._full(run, cache, x, y, mask, modulation, frames, rope)
        return self._partial(run, cache, x, y, mask, modulation, frames)

    def _full(self, run, cache, x, y, mask, modulation, frames, rope):
        block = self.block
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        score = self.tapped_score

        match = None if block.temporal else self._frame_match(run, x, frames)
        x_m = modulate(block.norm1(x), shift_msa, scale_msa)
        with capture_outputs(self._taps(score)) as taps:
            attn = self._per_frame("attn", match, x_m, frames, block.attn) if self.merges("attn", match) \
                else block.self_attention(x_m, frames, rope)
        x = x + gate_msa * attn
        self.keep(run, cache, "attn", attn)

        cross_due = CacheKey("cross_attn") not in cache or self.settings.schedule.branch_due("cross_attn", run.plan.step, len(run.plan.full_step_indices))
        if cross_due:
            text = block.cross_attn.text_keys_values(y)
            query = block.cross_attn.queries(x)
            cross = block.cross_attn.attend(query, *text, mask)
            self.keep(run, cache, "cross_attn", cross)
            if self._recomputes_cross_rows():  # partial steps recompute cross-attention rows against them
                cache.text_keys, cache.text_values = text
        else:
            cross = self.reuse(run, cache, "cross_attn")
        x = x + cross

        mlp = self._per_frame("mlp", match, modulate(block.norm2(x), shift_mlp, scale_mlp), frames, block.mlp)
        x = x + gate_mlp * mlp
        self.keep(run, cache, "mlp", mlp)

        self.recomputed_whole(cache, "mlp", *(("cross_attn",) if cross_due else ()))
        cross_taps = (query, text[0]) if cross_due else None
        score_flops = self._refresh_scores(run, cache, score, taps, cross_taps, mask, x.shape, frames, rope)
        rows = {branch: x.shape[1] if not self.merges(branch, match) else frames * match.merged_tokens for branch in ("attn", "mlp")}
        rows["cross_attn"] = x.shape[1] if cross_due else 0
        run.ledger.add_flops(self._flops(x.shape, y, frames, rows) + score_flops, self._flops(x.shape, y, frames, None))
        return x

    def _recomputes_cross_rows(self) -> bool:
        return self.settings.recomputes_tokens and self.settings.schedule.module_factors.get("cross_attn", 1.0) > 0

    def bonus_frames(self, run: RunState) -> tuple[int, tuple[int, int]]:
        """The spatial bonus works on each frame's patch grid."""
        rows, cols = run.signature.grid
        return self.frames, (rows // self.frames, cols)

    def _frame_match(self, run, x, frames):
        """The merge of each frame's tokens on its patch grid (one match per frame), or None."""
        if self.settings.merging is None:
            return None
        batch, tokens, dim = x.shape
        rows, cols = run.signature.grid[0] // frames, run.signature.grid[1]
        return self.match_tokens(run, x.reshape(batch * frames, tokens // frames, dim), (rows, cols))

    def _per_frame(self, branch, match, inputs, frames, function):
        """``function`` on each frame's merged tokens when ``branch`` merges, on ``inputs`` otherwise."""
        if not self.merges(branch, match):
            return function(inputs)
        batch, tokens, dim = inputs.shape
        out = self.merged(branch, match, inputs.reshape(batch * frames, tokens // frames, dim), function)
        return out.reshape(batch, tokens, -1)

    def _partial(self, run, cache, x, y, mask, modulation, frames):
        block = self.block
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        tokens = x.shape[1]
        recomputed = {}
        x = gated_residual(x, gate_msa, self.reuse(run, cache, "attn"))

        cross = self.reuse(run, cache, "cross_attn")
        selection = self.select(run, cache, "cross_attn", tokens)
        if selection is not None:
            query = block.cross_attn.queries(gather_rows(x, selection))
            fresh = block.cross_attn.attend(query, cache.text_keys, cache.text_values, mask)
            self.measure(run, cross, selection, fresh)
            scatter_rows(cross, selection, fresh)
            if self.settings.score == "cross_attention_entropy":
                self._refresh_entropy_rows(run, cache, query, selection.index, mask)
            recomputed["cross_attn"] = selection.count
        x = x + cross

        mlp = self.reuse(run, cache, "mlp")
        selection = self.select(run, cache, "mlp", tokens)
        if selection is not None:
            rows = modulate(block.norm2(gather_rows(x, selection)), shift_mlp, scale_mlp)
            fresh = block.mlp(rows)
            self.measure(run, mlp, selection, fresh)
            scatter_rows(mlp, selection, fresh)
            recomputed["mlp"] = selection.count
        x = x + gate_mlp * mlp
        run.ledger.add_flops(self._flops(x.shape, y, frames, recomputed, text_projected=False), self._flops(x.shape, y, frames, None))
        return x

    # -- scores --------------------------------------------------------------------------------
    def _taps(self, score):
        attn = self.block.attn
        if score == "attention":
            return {"query": attn.q_norm, "key": attn.k_norm}
        if score in ("k_norm", "v_norm"):
            return {"qkv": attn.qkv}
        return {}

    @torch.compiler.disable
    def _refresh_scores(self, run, cache, score, taps, cross_taps, mask, shape, frames, rope) -> int:
        """This full step's base score per token, in frame-major order; the FLOPs it cost. ``cross_taps``:
        the cross-attention's queries and caption keys, None when it was reused on this step."""
        if score is None:
            return 0
        batch, tokens, _ = shape
        attn = self.block.attn
        if score == "cross_attention_entropy":
            if cross_taps is None:  # the cross-attention was reused on this full step: keep the last score
                return 0
            value, flops = self._entropy(*cross_taps, mask)
        else:
            projections = dict(taps)
            if score == "attention" and self.block.temporal:  # the attention the block computes: rotary after the qk norm
                projections = {name: rope(projection) for name, projection in taps.items()}
            elif "qkv" in taps:
                groups, length, _ = taps["qkv"].shape
                parts = taps["qkv"].view(groups, length, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # (3, groups, heads, length, dim)
                projections = {name: parts[index] for index, name in ((1, "key"), (2, "value")) if name in S.SCORES[score]}
            value, flops = S.token_scores(score, projections, scale=attn.scale, generator=run.generator, shape=(batch, tokens))
        if value.shape != (batch, tokens):  # per attention group (frame or position): back to frame-major
            value = self.block.groups_to_frames(value[..., None], batch, frames)[..., 0]
        self.store_base_score(run, cache, "image", value)
        return flops

    def _entropy(self, query, key, mask) -> tuple[torch.Tensor, int]:
        """Cross-attention entropy of each query token over its caption's valid tokens, and its FLOPs."""
        bias = None if mask is None else torch.zeros(mask.shape, device=key.device).masked_fill(~mask, float("-inf"))[:, None, None, :]
        projections = {"cross_query": query, "cross_key": key}
        return S.token_scores("cross_attention_entropy", projections, scale=self.block.cross_attn.head_dim**-0.5, bias=bias)

    @torch.compiler.disable
    def _refresh_entropy_rows(self, run, cache, query, index, mask) -> None:
        """Recomputed tokens get their current cross-attention entropy."""
        rows, flops = self._entropy(query, cache.text_keys, mask)
        self.store_score_rows(run, cache, "image", index, rows)
        run.ledger.add_flops(flops, 0)

    # -- accounting ----------------------------------------------------------------------------
    def _flops(self, shape, y, frames, rows: dict[str, int] | None, text_projected: bool = True) -> int:
        """FLOPs of one call; ``rows`` maps branches to the tokens they computed (None: all of them);
        ``text_projected`` False when the cross-attention used the cached caption keys and values."""
        block = self.block
        batch, tokens, _ = shape
        rows = rows if rows is not None else {"attn": tokens, "cross_attn": tokens, "mlp": tokens}
        attn_rows = rows.get("attn", 0)  # spatial: per frame (merged frames are shorter); temporal: per position
        sequences = (batch * tokens // frames, frames) if block.temporal else (batch * frames, attn_rows // frames)
        flops = self.costs["attn"].flops(batch, {"image": attn_rows}, sequences=sequences)
        flops += self.costs["cross_attn"].flops(batch, {"image": rows.get("cross_attn", 0)}, y.shape[1], project_keys=text_projected)
        return flops + self.costs["mlp"].flops(batch, {"image": rows.get("mlp", 0)})
