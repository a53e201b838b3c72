"""Block adapters against diffusers' own block forward."""

import pytest
import torch
from torch import nn

from ditcache import FORAConfig, ToCaConfig, apply_cache
from ditcache.adapters import transformer_adapter
from ditcache.adapters.basic_transformer import BasicTransformerBlockAdapter
from ditcache.config import SCORES
from ditcache.eval.builders import dit_transformer, pixart_transformer
from ditcache.state import CallSignature, RunState
from ditcache.store import BlockCache, CacheKey

BATCH, GRID, TEXT = 4, (4, 6), 7
TOKENS = GRID[0] * GRID[1]


def dit_block_inputs(block, seed, guidance=False):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, TOKENS, block.dim, generator=generator)
    if guidance:
        hidden[BATCH // 2 :] = hidden[: BATCH // 2]
    timestep = torch.randint(0, 1000, (BATCH,), generator=generator)
    labels = torch.randint(0, 1000, (BATCH,), generator=generator)
    return (hidden,), {"timestep": timestep, "class_labels": labels}


def pixart_block_inputs(block, seed, guidance=False):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, TOKENS, block.dim, generator=generator)
    if guidance:
        hidden[BATCH // 2 :] = hidden[: BATCH // 2]
    mask = torch.zeros(BATCH, 1, TEXT)
    mask[0, :, 5:] = -10000.0
    return (hidden,), {
        "encoder_hidden_states": torch.randn(BATCH, TEXT, block.dim, generator=generator),
        "encoder_attention_mask": mask,
        "timestep": torch.randn(BATCH, 6 * block.dim, generator=generator),
    }


FAMILIES = {
    "dit": (lambda: dit_transformer(num_layers=1).transformer_blocks[0], dit_block_inputs),
    "pixart": (lambda: pixart_transformer(num_layers=1).transformer_blocks[0], pixart_block_inputs),
}


def make_run(config, family, guidance=False):
    run = RunState(config.resolve(family))
    run.start(CallSignature(BATCH, GRID, torch.float32, torch.device("cpu")), 999.0, None, guidance)
    run.begin_step(999.0)
    return run


def replace_output(module: nn.Module, value: torch.Tensor):
    return module.register_forward_hook(lambda _m, _i, _o: value)


@pytest.mark.parametrize(
    ("family", "score"),
    [(family, score) for family in FAMILIES for score in SCORES if not (family == "dit" and score == "cross_attention_entropy")],
)  # DiT has no cross-attention
def test_full_path_equals_diffusers_block(family, score):
    make_block, make_inputs = FAMILIES[family]
    block = make_block()
    adapter = BasicTransformerBlockAdapter(block, "block", 0.5, ToCaConfig(cache_interval=3, score=score).resolve(family))
    args, kwargs = make_inputs(block, seed=0)
    run = make_run(ToCaConfig(cache_interval=3, score=score), family)
    with torch.no_grad():
        expected = block(*args, **kwargs)
        cache = BlockCache()
        actual = adapter.forward(run, cache, *args, **kwargs)
    assert (actual - expected).abs().max().item() <= 1e-6
    assert cache.base_scores["image"].shape == (BATCH, TOKENS)
    assert {key.branch for key in cache.entries} == ({"attn", "mlp"} if family == "dit" else {"attn", "cross_attn", "mlp"})


@pytest.mark.parametrize("family", FAMILIES)
def test_fora_partial_step_reuses_every_branch_with_current_gates(family):
    make_block, make_inputs = FAMILIES[family]
    block = make_block()
    config = FORAConfig(cache_interval=3)
    adapter = BasicTransformerBlockAdapter(block, "block", 0.5, config.resolve(family))
    run, cache = make_run(config, family), BlockCache()
    with torch.no_grad():
        adapter.forward(run, cache, *make_inputs(block, seed=0)[0], **make_inputs(block, seed=0)[1])
        cached = {key.branch: cache.kept(key).clone() for key in cache.entries}
        run.begin_step(900.0)
        assert not run.plan.is_full
        args, kwargs = make_inputs(block, seed=1)
        actual = adapter.forward(run, cache, *args, **kwargs)
        modules = {"attn": block.attn1, "cross_attn": block.attn2, "mlp": block.ff}
        handles = [replace_output(modules[name], value) for name, value in cached.items()]
        expected = block(*args, **kwargs)
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("guidance", [False, True])
def test_toca_partial_step_recomputes_the_selected_rows_only(family, guidance):
    make_block, make_inputs = FAMILIES[family]
    block = make_block()
    config = ToCaConfig(cache_interval=3, cache_ratio=0.5, schedule="constant", score="random")
    adapter = BasicTransformerBlockAdapter(block, "block", 0.5, config.resolve(family))
    run, cache = make_run(config, family, guidance), BlockCache()
    with torch.no_grad():
        args, kwargs = make_inputs(block, seed=0, guidance=guidance)
        adapter.forward(run, cache, *args, **kwargs)
        cached = {key.branch: cache.kept(key).clone() for key in cache.entries}
        run.begin_step(900.0)
        args, kwargs = make_inputs(block, seed=1, guidance=guidance)
        actual = adapter.forward(run, cache, *args, **kwargs)

        # Branch by branch, diffusers' block with the earlier branches pinned to their expected
        # values tells what the fresh output of the next branch is.
        modules = {"attn": block.attn1, "cross_attn": block.attn2, "mlp": block.ff}
        expected_branches = {"attn": cached["attn"]}
        for name in adapter.branch_groups:
            fresh = {}
            handles = [replace_output(modules[done], value) for done, value in expected_branches.items()]
            handles.append(modules[name].register_forward_hook(lambda _m, _i, out: fresh.__setitem__("out", out)))
            block(*args, **kwargs)
            for handle in handles:
                handle.remove()
            selected = cache.since_recompute[name] == 0
            if guidance:
                selected = torch.cat([selected, selected])
            assert selected.sum(-1).eq(TOKENS // 2).all()
            expected_branches[name] = torch.where(selected[..., None], fresh["out"], cached[name])
            torch.testing.assert_close(cache.kept(CacheKey(name)), expected_branches[name], atol=1e-6, rtol=0)
        handles = [replace_output(modules[name], value) for name, value in expected_branches.items()]
        expected = block(*args, **kwargs)
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


def test_guidance_halves_recompute_the_same_tokens():
    block = FAMILIES["dit"][0]()
    config = ToCaConfig(cache_interval=3, cache_ratio=0.75, schedule="constant", score="attention")
    adapter = BasicTransformerBlockAdapter(block, "block", 0.5, config.resolve("dit"))
    run, cache = make_run(config, "dit", guidance=True), BlockCache()
    with torch.no_grad():
        adapter.forward(run, cache, *dit_block_inputs(block, 0, True)[0], **dit_block_inputs(block, 0, True)[1])
        before = cache.kept(CacheKey("mlp")).clone()
        run.begin_step(900.0)
        args, kwargs = dit_block_inputs(block, 1, True)
        adapter.forward(run, cache, *args, **kwargs)
    changed = (cache.kept(CacheKey("mlp")) != before).any(-1)
    assert changed.sum() == BATCH * TOKENS // 4
    assert torch.equal(changed[: BATCH // 2], changed[BATCH // 2 :])


def test_unsupported_blocks_and_models_are_refused():
    block = dit_transformer(num_layers=1).transformer_blocks[0]
    block.norm_type = "layer_norm"
    with pytest.raises(TypeError, match="ada_norm_zero, ada_norm_single"):
        BasicTransformerBlockAdapter(block, "b", 0.0, ToCaConfig().resolve("dit"))
    with pytest.raises(TypeError, match="supported transformers: DiTTransformer2DModel"):
        transformer_adapter(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="supported transformers"):
        apply_cache(nn.Linear(2, 2), ToCaConfig())
    with pytest.raises(ValueError, match="cross_attention_entropy"):
        apply_cache(dit_transformer(num_layers=1), ToCaConfig(score="cross_attention_entropy"))
    with pytest.raises(TypeError, match="ToCaConfig, FORAConfig or ToMeConfig"):
        apply_cache(dit_transformer(num_layers=1), {"cache_interval": 3})


def test_dit_partial_steps_take_the_modulation_from_the_run_table():
    block = FAMILIES["dit"][0]()
    config = FORAConfig(cache_interval=3)
    adapter = BasicTransformerBlockAdapter(block, "block", 0.5, config.resolve("dit"))
    args, kwargs = dit_block_inputs(block, 0)
    kwargs["timestep"] = torch.full((BATCH,), 900)
    outputs = {}
    for schedule in (None, (999.0, 900.0, 800.0)):
        run, cache = RunState(config.resolve("dit")), BlockCache()
        run.start(CallSignature(BATCH, GRID, torch.float32, torch.device("cpu")), 999.0, schedule, False)
        run.begin_step(999.0)
        with torch.no_grad():
            adapter.forward(run, cache, *args, **(kwargs | {"timestep": torch.full((BATCH,), 999)}))
            run.begin_step(900.0)
            outputs[schedule is None] = adapter.forward(run, cache, *args, **kwargs)
        assert (run.memo.get("block", 0) is not None) == (schedule is not None)
    torch.testing.assert_close(outputs[False], outputs[True], atol=1e-5, rtol=1e-5)
