"""Adapter for diffusers' ``BasicTransformerBlock`` with adaLN modulation.

Two forms are supported: ``ada_norm_zero`` (DiT: per-block timestep/class embedding, gated
self-attention and MLP) and ``ada_norm_single`` (PixArt-alpha/Sigma: a shared timestep embedding
plus a per-block ``scale_shift_table``, ungated cross-attention to the text).

Branches: ``attn`` (self-attention, reused whole on partial steps), ``cross_attn`` and ``mlp``
(recomputed for the selected tokens). The full path repeats diffusers' forward operation for
operation, so it gives the same numbers.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import BasicTransformerBlock, _chunked_feed_forward

from .. import scores as S
from ..kernels import gather_modulate, scatter_gate_residual
from ..config import EngineSettings
from ..flops import BranchCost, linears_flops
from ..merging import unmerge
from ..state import RunState
from ..store import BlockCache
from .base import (
    BlockAdapter,
    capture_outputs,
    gated_residual,
    gather_rows,
    query_key_taps,
    scatter_rows,
    step_table,
    split_heads,
)

SUPPORTED_NORMS = ("ada_norm_zero", "ada_norm_single")


class BasicTransformerBlockAdapter(BlockAdapter):
    def __init__(self, block: BasicTransformerBlock, name: str, layer_position: float, settings: EngineSettings):
        super().__init__(block, name, layer_position, settings)
        if block.norm_type not in SUPPORTED_NORMS:
            raise TypeError(
                f"{name}: BasicTransformerBlock with norm_type={block.norm_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_NORMS)} (DiT, PixArt-alpha, PixArt-Sigma)."
            )
        if block.pos_embed is not None or block.only_cross_attention or hasattr(block, "fuser"):
            raise TypeError(f"{name}: positional embeddings, only_cross_attention and GLIGEN are not supported.")
        self.zero = block.norm_type == "ada_norm_zero"
        attn, cross = block.attn1, block.attn2
        self.costs = {
            "attn": BranchCost({"image": (attn,)}, attention=(attn.heads, attn.inner_dim // attn.heads)),
            "mlp": BranchCost({"image": (block.ff,)}),
        } | ({"cross_attn": BranchCost({"image": (cross.to_q, cross.to_out[0])}, keys=(cross.to_k, cross.to_v),
                                       attention=(cross.heads, cross.inner_dim // cross.heads))} if cross is not None else {})
        self.branch_groups = {"cross_attn": "image", "mlp": "image"} if block.attn2 is not None else {"mlp": "image"}

    def readable_scores(self) -> tuple[tuple[str, ...], str]:
        if self.block.attn2 is not None:
            return super().readable_scores()
        return (*S.SELF_ATTENTION_SCORES, "random", *S.MEASURED_SCORES), "needs cross-attention blocks (PixArt); this model has none"

    # -- diffusers' math, piece by piece -------------------------------------------------------
    def _modulation(self, run, hidden_states, timestep, class_labels):
        """Six ``(batch, 1, dim)`` tensors: shift, scale, gate for attention, then for the MLP."""
        block = self.block
        if self.zero and not run.plan.is_full:
            scheduled = self._scheduled_modulation(run, timestep, class_labels, hidden_states.dtype)
            if scheduled is not None:
                return scheduled
        if self.zero:
            norm1 = block.norm1
            emb = norm1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)
            emb = norm1.linear(norm1.silu(emb))
            return tuple(chunk[:, None] for chunk in emb.chunk(6, dim=1))
        batch = hidden_states.shape[0]
        return (block.scale_shift_table[None] + timestep.reshape(batch, 6, -1)).chunk(6, dim=1)

    @torch.compiler.disable
    def _scheduled_modulation(self, run, timestep, class_labels, dtype):
        """DiT's per-block modulation of this step, from the run's table (``step_table``)."""

        def make():
            norm1, steps, batch = self.block.norm1, len(run.plan.schedule), class_labels.shape[0]
            timesteps = torch.tensor(run.plan.schedule, dtype=timestep.dtype, device=timestep.device)
            emb = norm1.emb(timesteps.repeat_interleave(batch), class_labels.repeat(steps), hidden_dtype=dtype)
            values = norm1.linear(norm1.silu(emb)).view(steps, batch, -1)
            entries = [tuple(chunk[:, None] for chunk in values[step].chunk(6, dim=1)) for step in range(steps)]
            return entries, linears_flops(norm1, steps * batch)

        return step_table(run, self.name, make, made_from=class_labels)

    def _attn_norm(self, hidden_states):
        return self.block.norm1.norm(hidden_states) if self.zero else self.block.norm1(hidden_states)

    def _cross_input(self, hidden_states):
        return self.block.norm2(hidden_states) if self.zero else hidden_states

    def _mlp_norm(self, hidden_states):
        return self.block.norm3(hidden_states) if self.zero else self.block.norm2(hidden_states)

    def _feed_forward(self, hidden_states):
        block = self.block
        if block._chunk_size is not None:
            return _chunked_feed_forward(block.ff, hidden_states, block._chunk_dim, block._chunk_size)
        return block.ff(hidden_states)

    # -- entry point ---------------------------------------------------------------------------
    def forward(
        self,
        run: RunState,
        cache: BlockCache,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        class_labels: torch.Tensor | None = None,
        added_cond_kwargs: dict | None = None,
    ) -> torch.Tensor:
        attn_kwargs = dict(cross_attention_kwargs or {})
        if "gligen" in attn_kwargs:
            raise ValueError("GLIGEN inputs (cross_attention_kwargs['gligen']) are not supported by ditcache.")
        modulation = self._modulation(run, hidden_states, timestep, class_labels)
        text = (encoder_hidden_states, encoder_attention_mask)
        if run.plan.is_full:
            return self._full(run, cache, hidden_states, modulation, attention_mask, text, attn_kwargs)
        return self._partial(run, cache, hidden_states, modulation, text, attn_kwargs)

    def _full(self, run, cache, hidden_states, modulation, attention_mask, text, attn_kwargs):
        block = self.block
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        encoder_hidden_states, encoder_attention_mask = text
        score = self.tapped_score
        match = self.match_tokens(run, hidden_states)
        if self.merges("attn", match) and attention_mask is not None:
            raise ValueError("token merging on self-attention needs the model to pass no self-attention mask.")
        tokens = hidden_states.shape[1]
        rows = {branch: match.merged_tokens if self.merges(branch, match) else tokens for branch in ("attn", "cross_attn", "mlp")}

        norm_hidden_states = self._attn_norm(hidden_states) * (1 + scale_msa) + shift_msa
        with capture_outputs(self._self_attention_taps(score)) as taps:
            attn = self.merged("attn", match, norm_hidden_states, lambda x: block.attn1(
                x, encoder_hidden_states=None, attention_mask=attention_mask, **attn_kwargs))
        hidden_states = gate_msa * attn + hidden_states
        self.keep(run, cache, "attn", attn)

        if block.attn2 is not None:
            cross_taps = query_key_taps(block.attn2) if score == "cross_attention_entropy" else {}
            with capture_outputs(cross_taps) as taps_cross:
                cross = self.merged("cross_attn", match, self._cross_input(hidden_states), lambda x: block.attn2(
                    x, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask, **attn_kwargs))
            hidden_states = cross + hidden_states
            self.keep(run, cache, "cross_attn", cross)
            taps.update({f"cross_{name}": value for name, value in taps_cross.items()})

        mlp = self.merged("mlp", match, self._mlp_norm(hidden_states) * (1 + scale_mlp) + shift_mlp, self._feed_forward)
        hidden_states = gate_mlp * mlp + hidden_states
        self.keep(run, cache, "mlp", mlp)

        self.recomputed_whole(cache, *self.branch_groups)
        score_flops = self._refresh_scores(run, cache, score, taps, encoder_attention_mask, hidden_states.shape, match)
        run.ledger.add_flops(self._flops(hidden_states.shape, encoder_hidden_states, rows) + score_flops,
                      self._flops(hidden_states.shape, encoder_hidden_states, None))
        return hidden_states

    def _partial(self, run, cache, hidden_states, modulation, text, attn_kwargs):
        block = self.block
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        encoder_hidden_states, encoder_attention_mask = text
        tokens = hidden_states.shape[1]
        recomputed = {}

        # One fused pass per branch over the residual stream; the first makes the tensor updated in place.
        hidden_states = gated_residual(hidden_states, gate_msa, self.reuse(run, cache, "attn"))

        if block.attn2 is not None:
            cross = self.reuse(run, cache, "cross_attn")
            selection = self.select(run, cache, "cross_attn", tokens)
            if selection is not None:
                rows = self._cross_input(gather_rows(hidden_states, selection))
                refresh = self.settings.score == "cross_attention_entropy"
                with capture_outputs({"query": query_key_taps(block.attn2)["query"]} if refresh else {}) as taps:
                    cross_rows = block.attn2(
                        rows, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask, **attn_kwargs
                    )
                self.measure(run, cross, selection, cross_rows)
                scatter_rows(cross, selection, cross_rows)
                if refresh:
                    self._refresh_entropy_rows(run, cache, taps["query"], selection.index, encoder_attention_mask)
                recomputed["cross_attn"] = selection.count
            hidden_states.add_(cross)

        mlp = self.reuse(run, cache, "mlp")
        selection = self.select(run, cache, "mlp", tokens)
        if selection is None:
            hidden_states.addcmul_(gate_mlp, mlp)
        else:
            norm = self.block.norm3 if self.zero else self.block.norm2
            rows = gather_modulate(hidden_states, selection.flat, selection.count, scale_mlp, shift_mlp, norm.eps, norm.weight, norm.bias)
            fresh = block.ff(rows)
            self.measure(run, mlp, selection, fresh)
            hidden_states = scatter_gate_residual(hidden_states, gate_mlp, mlp, fresh, selection.flat)
            recomputed["mlp"] = selection.count

        self._account_partial(run, hidden_states.shape, encoder_hidden_states, recomputed)
        return hidden_states

    @torch.compiler.disable
    def _account_partial(self, run, shape, encoder_hidden_states, rows) -> None:
        executed = self._flops(shape, encoder_hidden_states, rows, modulation=not run.plan.on_schedule)
        run.ledger.add_flops(executed, self._flops(shape, encoder_hidden_states, None))

    # -- scores --------------------------------------------------------------------------------
    def _self_attention_taps(self, score):
        """The modules giving the self-attention projections ``score`` reads (keys before any QK norm for
        ``k_norm``, as published)."""
        attn = self.block.attn1
        taps = query_key_taps(attn) if score == "attention" else {"key": attn.to_k, "value": attn.to_v}
        return {name: module for name, module in taps.items() if name in S.SCORES.get(score, ())}

    @torch.compiler.disable
    def _refresh_scores(self, run, cache, score, taps, encoder_attention_mask, shape, match) -> int:
        """Compute this full step's base score; return the FLOPs it cost. A score taken on merged tokens
        is given back to every token (a merged source gets its destination's)."""
        if score is None:
            return 0
        cross = score == "cross_attention_entropy"
        attn = self.block.attn2 if cross else self.block.attn1
        projections = {name: split_heads(value, attn.heads) for name, value in taps.items()}
        value, flops = S.token_scores(score, projections, scale=attn.scale, bias=_bias(encoder_attention_mask) if cross else None,
                                      generator=run.generator, shape=shape[:2])
        if cross:
            cache.text_keys = projections["cross_key"]
        if value.shape[-1] != shape[1]:
            value = unmerge(value[..., None], match)[..., 0]
        self.store_base_score(run, cache, "image", value)
        return flops

    @torch.compiler.disable
    def _refresh_entropy_rows(self, run, cache, query, index, encoder_attention_mask) -> None:
        """Recomputed tokens get their current cross-attention entropy."""
        cross = self.block.attn2
        projections = {"cross_query": split_heads(query, cross.heads), "cross_key": cache.text_keys}
        rows, flops = S.token_scores("cross_attention_entropy", projections, scale=cross.scale,
                                     bias=_bias(encoder_attention_mask))
        self.store_score_rows(run, cache, "image", index, rows)
        run.ledger.add_flops(flops, 0)

    # -- accounting ----------------------------------------------------------------------------
    def _flops(self, shape, encoder_hidden_states, rows: dict[str, int] | None, modulation: bool = True) -> int:
        """FLOPs of one call; ``rows`` maps branches to the tokens they computed (a missing branch: none;
        None: every branch on every token); ``modulation`` False when it came from the run's table."""
        block = self.block
        batch, tokens, _ = shape
        rows = rows if rows is not None else {"attn": tokens, "cross_attn": tokens, "mlp": tokens}
        text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else tokens
        flops = linears_flops(block.norm1, batch) if self.zero and modulation else 0
        return flops + sum(cost.flops(batch, {"image": rows.get(branch, 0)}, text if branch == "cross_attn" else 0)
                           for branch, cost in self.costs.items())


def _bias(encoder_attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The additive text mask as ``(batch, 1, 1, text)``, as the transformer passes it to the blocks."""
    if encoder_attention_mask is None:
        return None
    return encoder_attention_mask.reshape(encoder_attention_mask.shape[0], 1, 1, -1)
