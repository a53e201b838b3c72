"""FLOPs and wall-clock time of the generic path's families at their real width: the transformer alone,
built from its released configuration with few blocks and random weights, called for one run of steps
on fixed inputs, uncached against FORA, forecasts, ToCa (each score it reads) and diffusers' caches.

    python -m ditcache.eval.transformer_speed --families sd3.5-large wan2.1-1.3b --steps 10

Prints one table per family (the columns of ``ditcache bench``); ``--out`` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import dataclass

import torch

from ditcache import cli
from ditcache.specs import spec_for
from ditcache.timing import Clock

from .speed import Row, count_methods, format_table, parse_method, time_methods


@dataclass(frozen=True)
class Geometry:
    """A released model's transformer configuration with ``layers`` blocks, and one call's inputs."""

    model: str  # the diffusers class name
    config: dict
    inputs: object  # (dtype) -> the call's arguments but the timestep
    tokens: str  # what the inputs hold, for the table's title


def _randn(*shape, dtype):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)), dtype=torch.float32).to(dtype)


def geometries(layers: int, image: int, text: int, frames: int) -> dict[str, Geometry]:
    """Released widths (heads x head dim, MLP, text width) with ``layers`` blocks (HunyuanVideo: as many
    double- as single-stream blocks) and ``image`` image tokens (a square grid; video: per frame)."""
    side = int(image**0.5)
    return {
        "sd3.5-large": Geometry(
            "SD3Transformer2DModel",
            dict(sample_size=128, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64, num_attention_heads=38,
                 joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
                 pos_embed_max_size=192, qk_norm="rms_norm"),
            lambda dtype: {"hidden_states": _randn(1, 16, 2 * side, 2 * side, dtype=dtype),
                           "encoder_hidden_states": _randn(1, text, 4096, dtype=dtype), "pooled_projections": _randn(1, 2048, dtype=dtype)},
            f"{side * side} image + {text} text",
        ),
        "wan2.1-1.3b": Geometry(
            "WanTransformer3DModel",
            dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                 freq_dim=256, ffn_dim=8960, num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6),
            lambda dtype: {"hidden_states": _randn(1, 16, frames, 2 * side, 2 * side, dtype=dtype),
                           "encoder_hidden_states": _randn(1, text, 4096, dtype=dtype)},
            f"{frames} x {side * side} video, {text} text (cross-attention)",
        ),
        "qwen-image": Geometry(
            "QwenImageTransformer2DModel",
            dict(patch_size=2, in_channels=64, out_channels=16, num_layers=layers, attention_head_dim=128, num_attention_heads=24,
                 joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
            lambda dtype: {"hidden_states": _randn(1, side * side, 64, dtype=dtype), "encoder_hidden_states": _randn(1, text, 3584, dtype=dtype),
                           "encoder_hidden_states_mask": torch.ones(1, text, dtype=torch.long), "img_shapes": [[(1, side, side)]]},
            f"{side * side} image + {text} text",
        ),
        "hunyuanvideo": Geometry(
            "HunyuanVideoTransformer3DModel",
            dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=layers,
                 num_single_layers=layers, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                 text_embed_dim=4096, pooled_projection_dim=768, rope_axes_dim=(16, 56, 56)),
            lambda dtype: {"hidden_states": _randn(1, 16, frames, 2 * side, 2 * side, dtype=dtype),
                           "encoder_hidden_states": _randn(1, text, 4096, dtype=dtype), "encoder_attention_mask": torch.ones(1, text),
                           "pooled_projections": _randn(1, 768, dtype=dtype), "guidance": torch.full((1,), 6000.0, dtype=dtype)},
            f"{frames} x {side * side} video + {text} text",
        ),
    }


DEFAULT_METHODS = ("uncached", "fora:3", "fora:3:order=1", "toca:3:0.9:attention", "toca:3:0.9:v_norm", "toca:3:0.9:random",
                   "fbc", "taylorseer:3", "magcache")


def build(geometry: Geometry, dtype: torch.dtype):
    import diffusers

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in the benchmark's dtype: no float32 copy of a real-width model
    try:
        return getattr(diffusers, geometry.model)(**geometry.config).eval()
    finally:
        torch.set_default_dtype(default)


def run_once(model, inputs: dict, timesteps: list[torch.Tensor], argument: str) -> float:
    """Seconds of one run: a call per timestep."""
    return Clock("cpu").timed(lambda: [model(**inputs, **{argument: t}, return_dict=False) for t in timesteps])[1]


def benchmark(name: str, geometry: Geometry, args) -> list[Row]:
    dtype = getattr(torch, args.dtype)
    model = build(geometry, dtype)
    spec = spec_for(model)
    inputs = geometry.inputs(dtype)
    values = torch.linspace(999, 20, args.steps) * spec.timestep_scale + spec.timestep_offset
    timesteps = [torch.full((1,), float(v), dtype=dtype) for v in values]
    methods = {text: parse_method(text) for text in args.methods}
    rows = {text: Row(text) for text in methods}
    failed: dict[str, str] = {}
    run = lambda: run_once(model, inputs, timesteps, spec.timestep_argument)  # noqa: E731
    with torch.inference_mode():
        count_methods(methods, rows, model, run, model, args.steps, args.quiet, failed)
        time_methods(methods, rows, model, run, args.steps, 1, args.repeats, args.quiet)  # a warm-up round, then alternating
    return list(rows.values()), failed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ditcache.eval.transformer_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=["sd3.5-large", "wan2.1-1.3b", "qwen-image", "hunyuanvideo"])
    parser.add_argument("--layers", type=int, default=2, help="blocks (HunyuanVideo: double and single each)")
    parser.add_argument("--image-tokens", type=int, default=1024, help="image tokens (a square; video: per frame)")
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--frames", type=int, default=1, help="latent frames of the video models")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per method after a warm-up run")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> dict[str, list[Row]]:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    known = geometries(args.layers, args.image_tokens, args.text_tokens, args.frames)
    unknown = [name for name in args.families if name not in known]
    if unknown or args.methods[0] != "uncached":
        raise SystemExit(f"families must be among {', '.join(known)} and the first method 'uncached' (got {unknown or args.methods[0]})")
    cli.steady_cpu_allocator("cpu")
    device = platform.processor() or "cpu"
    tables = {}
    for name in args.families:
        geometry = known[name]
        tables[name], failed = benchmark(name, geometry, args)
        print(f"\n{name} ({geometry.model}) layers={args.layers} tokens: {geometry.tokens} steps={args.steps} dtype={args.dtype} "
              f"({device}, {torch.get_num_threads()} threads)")
        print(format_table(tables[name]))
        for text, error in failed.items():
            print(f"{text}: does not run on {geometry.model}: {error}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "tables": {name: [vars(r) | {"median": r.median} for r in rows] for name, rows in tables.items()}},
                      f, indent=2)
    return tables


if __name__ == "__main__":
    main()
