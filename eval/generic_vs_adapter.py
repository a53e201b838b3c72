"""DiT-XL and FLUX.1 through their block adapters against the generic path (hooks on their branch modules,
from a copy of their spec without its adapter), in one process: whether a block adapter still pays for itself.

    HF_HUB_OFFLINE=1 python -m ditcache.eval.generic_vs_adapter speed [dit] [flux]   # ditcache bench, real widths
    HF_HUB_OFFLINE=1 python -m ditcache.eval.generic_vs_adapter quality [STEPS]      # the reference FLUX model

``speed`` alternates the two paths for two rounds of ``ditcache bench`` (bfloat16, few blocks); ``quality``
generates the ten digits with two seeds on the committed reference FLUX model and prints the PSNR of each
method against uncached, with its FLOPs speedup, on both paths.
"""

import sys
from contextlib import contextmanager
from dataclasses import replace
from types import MappingProxyType as M

import torch

from ditcache import apply_cache, cache_stats, remove_cache
from ditcache.eval import speed as bench
from ditcache.specs import SPECS, register

GENERIC = {
    "DiTTransformer2DModel": dict(partial_branches=M({"BasicTransformerBlock": M({"ff": "image"})}),
                                  attention_sequences=M({"BasicTransformerBlock": ("attn1", "image")})),
    "FluxTransformer2DModel": dict(
        partial_branches=M({"FluxTransformerBlock": M({"ff": "image", "ff_context": "text"}),
                            "FluxSingleTransformerBlock": M({"proj_mlp": "all", "proj_out": "all"})}),
        attention_sequences=M({"FluxTransformerBlock": ("attn", "text", "image"), "FluxSingleTransformerBlock": ("attn", "all")})),
}
TRANSFORMERS = {"dit": "DiTTransformer2DModel", "flux": "FluxTransformer2DModel"}
BENCH = {
    "dit": ["--model", "dit", "--width", "xl", "--layers", "4", "--size", "32"],
    "flux": ["--model", "flux", "--width", "flux", "--layers", "1", "--single-layers", "2", "--size", "32", "--text-tokens", "64"],
}
BENCH_COMMON = ["--steps", "10", "--repeats", "2", "--warmup", "1", "--quiet", "--dtype", "bfloat16",
                "--methods", "uncached", "fora:3", "toca:3:0.9:random", "toca:3:0.9:attention"]
QUALITY_METHODS = ("fora:3", "fora:3:order=1", "toca:3:0.9:attention", "toca:3:0.9:k_norm", "toca:3:0.9:v_norm", "toca:3:0.9:random")


@contextmanager
def path(transformer: str, which: str):
    """The registry with ``transformer``'s own spec (``adapter``) or its generic copy (``generic``)."""
    original = SPECS[transformer]
    register(replace(original, adapter=None, **GENERIC[transformer]) if which == "generic" else original)
    try:
        yield
    finally:
        register(original)


def speed(models: list[str]) -> None:
    for model in models or BENCH:
        for round_ in (1, 2):
            for which in ("adapter", "generic"):
                print(f"=== {model} round {round_} {which}", flush=True)
                with path(TRANSFORMERS[model], which):
                    bench.main(BENCH[model] + BENCH_COMMON)


def quality(steps: int) -> None:
    from diffusers import FluxPipeline

    from ditcache.eval import digits
    from ditcache.eval.metrics import psnr

    pipe = FluxPipeline.from_pretrained(digits.reference_pipeline_path(digits.TEXT_MODEL))
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = [digits.prompt(label) for label in range(10)], (0, 1)

    def images() -> torch.Tensor:
        return torch.cat([pipe(prompt, **(digits.TEXT_MODEL_CALL | {"num_inference_steps": steps, "output_type": "pt"}),
                               generator=torch.Generator().manual_seed(seed)).images
                          for prompt in prompts for seed in seeds])

    with torch.inference_mode():
        uncached = images()
        print(f"reference FLUX model, {steps} steps, {len(prompts) * len(seeds)} images; PSNR against uncached (FLOPs speedup)")
        print(f"{'method':<24} {'adapter':>18} {'generic':>18}")
        for method in QUALITY_METHODS:
            cells = []
            for which in ("adapter", "generic"):
                with path("FluxTransformer2DModel", which):
                    apply_cache(pipe, bench.parse_method(method).config)
                    cached = images()
                    cells.append(f"{psnr(cached, uncached).mean():.1f} dB ({cache_stats(pipe).flops_speedup:.2f}x)")
                    remove_cache(pipe)
            print(f"{method:<24} {cells[0]:>18} {cells[1]:>18}", flush=True)


if __name__ == "__main__":
    command, *rest = sys.argv[1:] or ["speed"]
    speed(rest) if command == "speed" else quality(int(rest[0]) if rest else 50)
