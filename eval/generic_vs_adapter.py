"""``ditcache bench`` of DiT-XL and FLUX.1 (real widths, few blocks, bfloat16) through their block adapters and
through the generic path (hooks on their branch modules, from a copy of their spec without its adapter),
alternating, two rounds, in one process: whether a block adapter still pays for itself.

    HF_HUB_OFFLINE=1 python -m ditcache.eval.generic_vs_adapter [dit] [flux]
"""
import sys
from dataclasses import replace
from types import MappingProxyType as M

from ditcache.eval import speed
from ditcache.specs import SPECS, register

GENERIC = {
    "DiTTransformer2DModel": dict(partial_branches=M({"BasicTransformerBlock": M({"ff": "image"})}),
                                  attention_sequences=M({"BasicTransformerBlock": ("attn1", "image")})),
    "FluxTransformer2DModel": dict(
        partial_branches=M({"FluxTransformerBlock": M({"ff": "image", "ff_context": "text"}),
                            "FluxSingleTransformerBlock": M({"proj_mlp": "all", "proj_out": "all"})}),
        attention_sequences=M({"FluxTransformerBlock": ("attn", "text", "image"), "FluxSingleTransformerBlock": ("attn", "all")})),
}
RUNS = {
    "dit": ["--model", "dit", "--width", "xl", "--layers", "4", "--size", "32"],
    "flux": ["--model", "flux", "--width", "flux", "--layers", "1", "--single-layers", "2", "--size", "32", "--text-tokens", "64"],
}
COMMON = ["--steps", "10", "--repeats", "2", "--warmup", "1", "--quiet", "--dtype", "bfloat16",
          "--methods", "uncached", "fora:3", "toca:3:0.9:random", "toca:3:0.9:attention"]
for model in sys.argv[1:] or RUNS:
    name = {"dit": "DiTTransformer2DModel", "flux": "FluxTransformer2DModel"}[model]
    original = SPECS[name]
    for round_ in (1, 2):
        for path in ("adapter", "generic"):
            register(replace(original, adapter=None, **GENERIC[name]) if path == "generic" else original)
            print(f"=== {model} round {round_} {path}", flush=True)
            speed.main(RUNS[model] + COMMON)
    register(original)
