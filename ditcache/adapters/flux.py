"""Adapters for FLUX.1's blocks: ``FluxTransformerBlock`` (double stream) and
``FluxSingleTransformerBlock`` (single stream).

Double stream: the joint attention (image and text outputs, after their projections) is reused whole
on partial steps; the image MLP (``mlp``) and the text MLP (``context_mlp``) are recomputed for their
selected tokens. Single stream: the block runs on ``cat([text, image])``; the attention output
(before the fused output projection) and the projection's output are cached; on partial steps the
selected tokens get their norm, modulation and MLP half, then the output projection over
``cat(cached attention rows, new MLP rows)`` (``single_mlp``). Full paths repeat diffusers' forwards
operation for operation.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

from .. import scores as S
from ..kernels import gather_modulate, scatter_gate_residual
from ..config import EngineSettings
from ..flops import BranchCost, linear_flops, linears_flops
from ..merging import TokenMatch, merge, unmerge
from ..state import RunState
from ..store import BlockCache, CacheKey
from .base import BlockAdapter, capture_outputs, gated_residual, step_table


def _clip_half(hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype == torch.float16:
        return hidden_states.clip(-65504, 65504)
    return hidden_states


def _score_taps(attn, score: str | None, joint: bool) -> dict:
    """Modules whose outputs are the projections ``score`` reads; ``joint`` adds the text projections of a
    double block (``text_<name>``)."""
    if score == "attention":
        names = {"query": "norm_q", "key": "norm_k", "text_query": "norm_added_q", "text_key": "norm_added_k"}
    elif score in ("k_norm", "v_norm"):
        # keys before the QK RMSNorm, after which every key has nearly the same norm (as published)
        if attn.fused_projections:
            raise ValueError(f"score={score!r} cannot read keys or values from fused QKV projections; unfuse them or use 'random'.")
        names = {"key": "to_k", "value": "to_v", "text_key": "add_k_proj", "text_value": "add_v_proj"}
    else:
        return {}
    taps = {name: getattr(attn, module) for name, module in names.items() if joint or not name.startswith("text_")}
    return {name: module for name, module in taps.items() if name.removeprefix("text_") in S.SCORES[score]}


def _token_scores(run: RunState, attn, score: str, taps: dict, rotary, batch: int, tokens: int) -> tuple[torch.Tensor, int]:
    """Scores of the attention's whole sequence (text first), and the FLOPs they cost."""
    projections = {}
    for name in S.SCORES[score]:
        projection = torch.cat([taps[tap] for tap in (f"text_{name}", name) if tap in taps], dim=1)
        if projection.ndim == 3:  # (batch, tokens, heads * dim): a projection before the QK norm
            projection = projection.unflatten(-1, (attn.heads, -1))
        if rotary is not None and score == "attention":  # the queries and keys the attention multiplies
            projection = apply_rotary_emb(projection, rotary, sequence_dim=1)
        projections[name] = projection.transpose(1, 2)
    return S.token_scores(score, projections, generator=run.generator, shape=(batch, tokens))


@torch.compiler.disable
def scheduled_modulation(run: RunState, key: str, linear: torch.nn.Linear, chunks: int) -> tuple | None:
    """A block's modulation (``linear(silu(temb))`` split in ``chunks``) for this step, from the run's table
    (``step_table``) over the run's timestep embeddings (``FluxAdapter.step_tables``); None when there are none."""
    if not _scheduled(run):
        return None

    def make():
        temb = run.memo.get("temb", run.stream).value
        steps, batch, dim = temb.shape
        table = linear(torch.nn.functional.silu(temb.reshape(steps * batch, dim))).view(steps, batch, -1)
        return [table[step].chunk(chunks, dim=1) for step in range(steps)], linear_flops(linear, steps * batch)

    return step_table(run, key, make)


def _scheduled(run: RunState) -> bool:
    return run.memo.get("temb", run.stream) is not None and run.plan.on_schedule


def _modulation(run: RunState, key: str, norm, temb: torch.Tensor, chunks: int) -> tuple:
    scheduled = scheduled_modulation(run, key, norm.linear, chunks)
    return scheduled if scheduled is not None else norm.linear(norm.silu(temb)).chunk(chunks, dim=1)


def _attention_cost(attn, joint: bool) -> BranchCost:
    """A FLUX attention's projections per token group (fused or not, read on each call) and its joint core."""
    fused = attn.fused_projections
    rows = {"image": ((attn.to_qkv,) if fused else (attn.to_q, attn.to_k, attn.to_v)) + (() if attn.pre_only else (attn.to_out[0],))}
    if joint:
        rows["text"] = ((attn.to_added_qkv,) if fused else (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)) + (attn.to_add_out,)
    return BranchCost(rows, attention=(attn.heads, attn.head_dim))


def _merged_rotary(rotary, match: TokenMatch, text: int):
    """The rotary embedding of ``cat(text, merged image)``: a merged token keeps its destination's position."""
    if rotary is None:
        return None
    order = torch.cat([match.kept[0], match.destinations[0]]) + text
    index = torch.cat([torch.arange(text, device=order.device), order])
    return tuple(part.index_select(0, index) for part in rotary)


def _unmerge_image(joint: torch.Tensor, match: TokenMatch, text: int) -> torch.Tensor:
    """``cat(text, merged image)`` rows back to ``cat(text, image)``."""
    return torch.cat([joint[:, :text], unmerge(joint[:, text:], match)], dim=1)


class _FluxMerging:
    """FLUX merges image tokens only, with one matching for the whole batch (the rotary embedding the
    attention takes is shared by the batch); text tokens are never merged. Its blocks have no cross-attention
    to score."""

    def readable_scores(self) -> tuple[tuple[str, ...], str]:
        return (*S.SELF_ATTENTION_SCORES, "random", *S.MEASURED_SCORES), (
            "needs cross-attention blocks (PixArt, OpenSora); FLUX attends to text and image jointly")

    def batch_match(self, run: RunState, image_tokens: torch.Tensor) -> TokenMatch | None:
        match = self.match_tokens(run, image_tokens.mean(dim=0, keepdim=True))
        if match is None:
            return None
        batch = image_tokens.shape[0]
        return TokenMatch(*(index.expand(batch, -1) for index in (match.destinations, match.kept, match.merged, match.targets)), match.tokens)


class FluxDoubleBlockAdapter(_FluxMerging, BlockAdapter):
    def __init__(self, block: FluxTransformerBlock, name: str, layer_position: float, settings: EngineSettings):
        super().__init__(block, name, layer_position, settings)
        self.branch_groups = {"mlp": "image", "context_mlp": "text"}
        self.costs = {"mlp": BranchCost({"image": (block.ff,)}), "context_mlp": BranchCost({"text": (block.ff_context,)})}

    def forward(
        self,
        run: RunState,
        cache: BlockCache,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb=None,
        joint_attention_kwargs: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attn_kwargs = joint_attention_kwargs or {}
        if run.plan.is_full:
            return self._full(run, cache, hidden_states, encoder_hidden_states, temb, image_rotary_emb, attn_kwargs)
        return self._partial(run, cache, hidden_states, encoder_hidden_states, temb)

    def _full(self, run, cache, hidden_states, encoder_hidden_states, temb, rotary, attn_kwargs):
        block = self.block
        score = self.tapped_score
        batch, image = hidden_states.shape[:2]
        text = encoder_hidden_states.shape[1]
        match = self.batch_match(run, hidden_states)
        merge_attn, merge_mlp = self.merges("attn", match), self.merges("mlp", match)
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
        norm_context, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(encoder_hidden_states, emb=temb)
        if merge_attn:
            norm_hidden_states, rotary = merge(norm_hidden_states, match), _merged_rotary(rotary, match, text)
        with capture_outputs(_score_taps(block.attn, score, joint=True)) as taps:
            outputs = block.attn(
                hidden_states=norm_hidden_states, encoder_hidden_states=norm_context, image_rotary_emb=rotary, **attn_kwargs
            )
        attn, context_attn = outputs[0], outputs[1]
        if merge_attn:
            attn = unmerge(attn, match)

        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn
        mlp = self.merged("mlp", match, block.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None], block.ff)
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * mlp
        if len(outputs) == 3:  # IP-Adapter
            hidden_states = hidden_states + outputs[2]
            self.keep(run, cache, "ip_attn", outputs[2])

        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn
        context_mlp = block.ff_context(block.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None])
        encoder_hidden_states = _clip_half(encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_mlp)
        for branch, output in (("attn", attn), ("context_attn", context_attn), ("mlp", mlp), ("context_mlp", context_mlp)):
            self.keep(run, cache, branch, output)

        self.recomputed_whole(cache, "mlp", "context_mlp")
        score_flops = 0
        if score is not None:
            attended = text + (match.merged_tokens if merge_attn else image)
            scores, score_flops = _token_scores(run, block.attn, score, taps, rotary, batch, attended)
            if merge_attn:
                scores = _unmerge_image(scores[..., None], match, text)[..., 0]
            self.store_base_score(run, cache, "text", scores[:, :text])
            self.store_base_score(run, cache, "image", scores[:, text:])
        rows = {"attn": match.merged_tokens if merge_attn else image, "mlp": match.merged_tokens if merge_mlp else image, "context_mlp": text}
        self.add_call_flops(run, (batch, image, text), rows, True, score_flops)
        return encoder_hidden_states, hidden_states

    def _partial(self, run, cache, hidden_states, encoder_hidden_states, temb):
        block = self.block
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(run, f"{self.name}.norm1", block.norm1, temb, 6)
        _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _modulation(
            run, f"{self.name}.norm1_context", block.norm1_context, temb, 6
        )
        recomputed = {}

        hidden_states = gated_residual(hidden_states, gate_msa.unsqueeze(1), self.reuse(run, cache, "attn"))
        hidden_states, recomputed["mlp"] = self._partial_mlp(
            run, cache, "mlp", block.ff, block.norm2, hidden_states, shift_mlp, scale_mlp, gate_mlp
        )
        if CacheKey("ip_attn") in cache:
            hidden_states = hidden_states + self.reuse(run, cache, "ip_attn")

        encoder_hidden_states = gated_residual(encoder_hidden_states, c_gate_msa.unsqueeze(1), self.reuse(run, cache, "context_attn"))
        encoder_hidden_states, recomputed["context_mlp"] = self._partial_mlp(
            run, cache, "context_mlp", block.ff_context, block.norm2_context, encoder_hidden_states, c_shift_mlp, c_scale_mlp, c_gate_mlp
        )
        self._account_partial(run, encoder_hidden_states.shape[0], hidden_states.shape[1], encoder_hidden_states.shape[1], recomputed)
        return _clip_half(encoder_hidden_states), hidden_states

    @torch.compiler.disable
    def _account_partial(self, run, batch, image, text, recomputed) -> None:
        self.add_call_flops(run, (batch, image, text), recomputed, not _scheduled(run))

    def _partial_mlp(self, run, cache, branch, ff, norm, hidden_states, shift, scale, gate):
        """``hidden_states`` (owned by this call) gets the gated MLP output added in place."""
        output = self.reuse(run, cache, branch)
        selection = self.select(run, cache, branch, hidden_states.shape[1])
        if selection is None:
            return hidden_states.addcmul_(gate.unsqueeze(1), output), 0
        rows = gather_modulate(
            hidden_states, selection.flat, selection.count, scale[:, None], shift[:, None], norm.eps, norm.weight, norm.bias
        )
        fresh = ff(rows)
        self.measure(run, output, selection, fresh)
        return scatter_gate_residual(hidden_states, gate.unsqueeze(1), output, fresh, selection.flat), selection.count

    def _flops(self, batch: int, image: int, text: int, rows: dict[str, int] | None, modulation: bool = True) -> int:
        """FLOPs of one call; ``rows`` maps branches to the tokens they computed (a missing ``attn``: the
        attention was reused; None: every branch on every token)."""
        block = self.block
        rows = rows if rows is not None else {"attn": image, "mlp": image, "context_mlp": text}
        flops = linears_flops(block.norm1.linear, batch) + linears_flops(block.norm1_context.linear, batch) if modulation else 0
        if "attn" in rows:
            flops += _attention_cost(block.attn, joint=True).flops(batch, {"image": rows["attn"], "text": text})
        return flops + sum(self.costs[branch].flops(batch, {group: rows[branch]}) for branch, group in self.branch_groups.items())


class FluxSingleBlockAdapter(_FluxMerging, BlockAdapter):
    def __init__(self, block: FluxSingleTransformerBlock, name: str, layer_position: float, settings: EngineSettings):
        super().__init__(block, name, layer_position, settings)
        self.branch_groups = {"single_mlp": "joint"}
        # the MLP's input projection and the output projection over cat(attention, MLP), per computed row
        self.costs = {"mlp": BranchCost({"image": (block.proj_mlp,)}), "out": BranchCost({"image": (block.proj_out,)})}

    def forward(
        self,
        run: RunState,
        cache: BlockCache,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb=None,
        joint_attention_kwargs: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # owned by this call
        if run.plan.is_full:
            hidden_states = self._full(run, cache, hidden_states, temb, image_rotary_emb, joint_attention_kwargs or {}, text)
        else:
            hidden_states = self._partial(run, cache, hidden_states, temb)
        hidden_states = _clip_half(hidden_states)
        return hidden_states[:, :text], hidden_states[:, text:]

    def _full(self, run, cache, hidden_states, temb, rotary, attn_kwargs, text):
        block = self.block
        batch, tokens = hidden_states.shape[:2]
        score = self.tapped_score
        match = self.batch_match(run, hidden_states[:, text:])
        merge_attn, merge_mlp = self.merges("attn", match), self.merges("mlp", match)
        norm_hidden_states, gate = block.norm(hidden_states, emb=temb)

        # Text rows as they are, image rows merged: one merge serves both branches.
        merged_norm = torch.cat([norm_hidden_states[:, :text], merge(norm_hidden_states[:, text:], match)], dim=1) if merge_attn or merge_mlp else None
        mlp = block.act_mlp(block.proj_mlp(merged_norm if merge_mlp else norm_hidden_states))
        if merge_mlp:
            mlp = _unmerge_image(mlp, match, text)
        attn_rotary = _merged_rotary(rotary, match, text) if merge_attn else rotary
        with capture_outputs(_score_taps(block.attn, score, joint=False)) as taps:
            attn = block.attn(hidden_states=merged_norm if merge_attn else norm_hidden_states, image_rotary_emb=attn_rotary, **attn_kwargs)
        if merge_attn:
            attn = _unmerge_image(attn, match, text)
        output = block.proj_out(torch.cat([attn, mlp], dim=2))
        self.keep(run, cache, "attn", attn)
        self.keep(run, cache, "output", output)
        self.recomputed_whole(cache, "single_mlp")
        score_flops = 0
        if score is not None:
            attended = text + match.merged_tokens if merge_attn else tokens
            scores, score_flops = _token_scores(run, block.attn, score, taps, attn_rotary, batch, attended)
            if merge_attn:
                scores = _unmerge_image(scores[..., None], match, text)[..., 0]
            self.store_base_score(run, cache, "joint", scores)
        rows = {"attn": text + match.merged_tokens if merge_attn else tokens,
                "mlp": text + match.merged_tokens if merge_mlp else tokens, "out": tokens}
        self.add_call_flops(run, (batch, tokens), rows, True, score_flops)
        return hidden_states + gate.unsqueeze(1) * output

    def _partial(self, run, cache, hidden_states, temb):
        block = self.block
        shift, scale, gate = _modulation(run, f"{self.name}.norm", block.norm, temb, 3)
        output = self.reuse(run, cache, "output")
        selection = self.select(run, cache, "single_mlp", hidden_states.shape[1])
        self._account_partial(run, *hidden_states.shape[:2], 0 if selection is None else selection.count)
        if selection is None:
            return hidden_states.addcmul_(gate.unsqueeze(1), output)
        norm = block.norm.norm
        rows = gather_modulate(
            hidden_states, selection.flat, selection.count, scale[:, None], shift[:, None], norm.eps, norm.weight, norm.bias
        )
        attn_rows = self.reuse_rows(run, cache, "attn", selection)
        new_rows = block.proj_out(torch.cat([attn_rows, block.act_mlp(block.proj_mlp(rows))], dim=2))
        self.measure(run, output, selection, new_rows)
        return scatter_gate_residual(hidden_states, gate.unsqueeze(1), output, new_rows, selection.flat)

    @torch.compiler.disable
    def _account_partial(self, run, batch, tokens, recomputed) -> None:
        self.add_call_flops(run, (batch, tokens), {"mlp": recomputed, "out": recomputed}, not _scheduled(run))

    @property
    def measured_branches(self) -> tuple[str, ...]:
        """Partial steps recompute the fused output projection's rows (their attention half forecast, the MLP
        half fresh); a full step measures the same output, both halves fresh."""
        return ("output",)

    @property
    def error_groups(self) -> dict[str, str]:
        return {"output": "joint"}

    def _flops(self, batch: int, tokens: int, rows: dict[str, int] | None, modulation: bool = True) -> int:
        """FLOPs of one call; ``rows`` maps ``attn``, ``mlp`` (the MLP's input projection) and ``out``
        (the fused output projection) to the tokens they computed (None: all tokens, all three)."""
        block = self.block
        rows = rows if rows is not None else {"attn": tokens, "mlp": tokens, "out": tokens}
        flops = linears_flops(block.norm.linear, batch) if modulation else 0
        if "attn" in rows:
            flops += _attention_cost(block.attn, joint=False).flops(batch, {"image": rows["attn"]})
        return flops + sum(cost.flops(batch, {"image": rows[branch]}) for branch, cost in self.costs.items())
