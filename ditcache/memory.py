"""What a cache will hold, known before the run: the engine runs dry on a copy of the model without data.

The copy is the model's class built from its config with fake tensors (``torch._subclasses.fake_tensor``,
what ``torch.compile`` traces with): every tensor has its real shape, dtype and device type and no storage, so
nothing is allocated and no call computes anything, and the engine keeps tensors of exactly the sizes a real
run keeps. (The meta device would do as much, but some models' forwards refuse it, e.g. Mochi's autocast.) The
cache is largest once the forecast holds all its terms (after ``forecast order + 1`` full steps) and partial
steps have made their per-step tables; so the dry run takes that many full steps, one partial step and one full
step, and reads the engine's own count (``CacheStats.cache_bytes``) of the blocks' caches and the run's memos.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from . import codecs
from .adapters import transformer_adapter
from .budget import CacheLayout, layouts_to_try, readable_bytes
from .config import CacheConfig, EngineSettings, resolve_configs
from .hooks import _refuse_compiled, attach, residual_possible
from .schedule import FLAT
from .state import RunState

_TRAINING_STEPS = 1000  # the schedulers' timestep range, from which the dry run's timesteps are drawn


class DryRunError(ValueError):
    """The model's forward reads its inputs' values to shape its tensors, which a run without data cannot do."""


class _Timesteps:
    """A scheduler stand-in: the timesteps of a run of the requested length, in the scheduler's units (a list: a
    tensor would be read inside the fake mode, which cannot read a real tensor's values under inference mode)."""

    def __init__(self, steps: int):
        self.timesteps = torch.linspace(_TRAINING_STEPS, _TRAINING_STEPS / steps, steps).tolist()


class _DryPipeline:
    """Stands for the user's pipeline, whose scheduler tells the engine the run's step count."""

    def __init__(self, steps: int):
        self.scheduler = _Timesteps(steps)


def fake_copy(transformer: nn.Module, mode: FakeTensorMode, dtype: torch.dtype | None = None) -> nn.Module:
    """``transformer``'s class built from its config, its parameters and buffers fake CPU tensors of ``mode``
    in ``dtype`` (default: the model's floating dtype). Built on the meta device first: nothing is allocated."""
    _refuse_compiled(transformer)
    dtype = dtype or next((p.dtype for p in transformer.parameters() if p.is_floating_point()), torch.float32)
    with torch.device("meta"):
        copy = type(transformer).from_config(transformer.config)
    nn.Module.to(copy, dtype)  # nn.Module.to: diffusers' own warns of fp32-kept modules, which a copy has none of
    cpu, to_fake = torch.device("cpu"), mode.fake_tensor_converter.from_meta_and_device
    for module in copy.modules():
        for name, parameter in module._parameters.items():
            if parameter is not None:
                module._parameters[name] = nn.Parameter(to_fake(mode, parameter, cpu), requires_grad=False)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = to_fake(mode, buffer, cpu)
    return copy.eval()


def _fake(value, dtype: torch.dtype):
    """A call argument as the copy takes it (inside the fake mode): tensors of the same shape, floating ones in
    ``dtype``."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_fake(item, dtype) for item in value)
    return value


def estimate_cache_bytes(
    transformer: nn.Module,
    config: CacheConfig | list[CacheConfig],
    *,
    num_inference_steps: int = 50,
    calls_per_step: int = 1,
    dtype: torch.dtype | None = None,
    **call,
) -> int:
    """The most bytes ``config``'s cache holds during a run of ``transformer``, without running it on data.
    With a ``cache_memory`` budget: what the layout the budget chooses holds (``ValueError`` where none fits).

    Args:
        transformer: the model, or one built on the meta device from a released config.json; it is not
            changed (the estimate runs on a copy without data).
        config: the caching config, as for ``apply_cache``.
        num_inference_steps: the run's step count (per-step tables grow with it).
        calls_per_step: transformer calls per denoising step: 2 where the pipeline runs classifier-free
            guidance as two calls (Wan, true CFG); 1 where it batches them (then ``call``'s batch holds both).
        dtype: the model's compute dtype (default: its parameters').
        **call: the keyword arguments of one transformer call; only its tensors' shapes and dtypes are read
            (they may be on the meta device).
    """
    return estimate_cache(transformer, config, num_inference_steps=num_inference_steps, calls_per_step=calls_per_step,
                          dtype=dtype, **call)[0]


def estimate_cache(transformer: nn.Module, config: CacheConfig | list[CacheConfig], *, num_inference_steps: int = 50,
                   calls_per_step: int = 1, dtype: torch.dtype | None = None, **call) -> tuple[int, CacheLayout | None]:
    """``estimate_cache_bytes``, and the layout the cache keeps (None where nothing is cached)."""
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
    if not isinstance(calls_per_step, int) or calls_per_step < 1:
        raise ValueError(f"`calls_per_step` must be an integer >= 1, got {calls_per_step!r}.")
    _refuse_compiled(transformer)
    model = transformer_adapter(transformer)
    settings = resolve_configs(config, model.family)
    if not settings.caches:
        return 0, None
    if settings.cache_memory is not None:
        plan = choose_layout(transformer, settings, model.dry_arguments(call), calls_per_step, num_inference_steps, dtype)
        settings = with_layout(settings, plan.layout)
    return _dry_run(transformer, settings, call, num_inference_steps, calls_per_step, dtype).ledger.cache_bytes, settings.layout


def with_layout(settings: EngineSettings, layout: CacheLayout) -> EngineSettings:
    """``settings`` keeping their caches in ``layout``, with no budget left to apply."""
    return replace(settings, cache_span=layout.span, cache_precision=layout.precision, forecast_order=layout.order, cache_memory=None)


def _dry_run(transformer: nn.Module, settings: EngineSettings, call: dict, steps: int, calls_per_step: int,
             dtype: torch.dtype | None, dry_steps: int | None = None) -> RunState:
    """The engine run on a fake copy of ``transformer`` with ``settings``: full steps until the forecast holds all
    its terms, then a partial step (which makes the per-step tables partial steps read), then the full step
    that counts it all (``dry_steps`` first calls only, where given); the run state it leaves."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    copy = fake_copy(transformer, mode, dtype)
    dtype = next(copy.parameters()).dtype
    model = transformer_adapter(copy)
    order = settings.forecast_order
    schedule = replace(settings.schedule, full_steps_at_start=order + 1, cache_interval=2, full_step_rule="interval",
                       interval_divisor=FLAT, forced_interval=None)
    dry = replace(settings, schedule=schedule, control=None)
    pipeline = _DryPipeline(steps)  # held here: the step hook keeps it by weak reference
    run = attach(copy, model, dry, None, pipeline, model.block_adapters(dry), model.branch_adapters(dry))
    run.keep_after_run = True
    timesteps = pipeline.scheduler.timesteps
    with mode, torch.no_grad():
        arguments = {name: _fake(value, dtype) for name, value in call.items()}
        for step in range(min(steps, dry_steps or order + 3)):
            model.dry_timestep = timesteps[step] * model.timestep_scale + model.timestep_offset
            for _ in range(calls_per_step):
                try:
                    copy(**arguments)
                except (DataDependentOutputException, DynamicOutputShapeException) as error:
                    raise DryRunError(
                        f"{type(transformer).__name__}'s forward reads its inputs' values to shape its tensors "
                        f"({error.func}), which a run without data cannot: measure the cache on a real run instead "
                        "(ditcache.cache_stats(...).cache_bytes)."
                    ) from None
    return run


def _terms_bytes(stored, layout: CacheLayout) -> int:
    """Bytes of a kept value and its ``layout.order`` differences (each of its shape) in ``layout.precision``."""
    return (_stored_bytes(stored, codecs.term_precision(layout.precision, False))
            + layout.order * _stored_bytes(stored, codecs.term_precision(layout.precision, True)))


def _stored_bytes(stored, precision: str) -> int:
    """Bytes of a kept tensor if it were kept in ``precision`` ("model" or "float8")."""
    shape = stored.data.shape if isinstance(stored, codecs.Float8Rows) else stored.shape
    numel = math.prod(shape)
    if precision == "float8":
        return numel + numel // shape[-1] * 4
    dtype = stored.dtype
    return numel * dtype.itemsize


@dataclass(frozen=True)
class BranchCosts:
    """What the branch layout holds per guidance stream, from a dry run: each kept value (a key's differences
    have its shape), the other per-block state (scores, counters) and the run's memos, in bytes."""

    values: tuple
    other: int
    memo: int

    def bytes(self, layout: CacheLayout) -> int:
        return self.memo + self.other + sum(_terms_bytes(v, layout) for v in self.values)


@dataclass(frozen=True)
class ResidualCosts:
    """What the residual layouts hold per guidance stream, from a dry call: the unbroken chains of blocks, each
    block's residual tensors, the run's memos; ``hidden`` is H, the largest block's residual in bytes."""

    chains: tuple
    residuals: dict
    memo: int
    hidden: int

    def bytes(self, layout: CacheLayout) -> int:
        spans = [start for chain in self.chains for start in chain[:: layout.span]]
        return self.memo + sum(_terms_bytes(v, layout) for start in spans for v in self.residuals[start])


def branch_costs(transformer: nn.Module, settings: EngineSettings, call: dict, steps: int, dtype: torch.dtype | None) -> BranchCosts:
    run = _dry_run(transformer, with_layout(settings, settings.layout), call, steps, 1, dtype)
    caches = list(run.caches.blocks.values())
    values = tuple(entry.value for cache in caches for entry in cache.entries.values())
    kept = sum(codecs.nbytes(term) for cache in caches for term in cache.stored())
    return BranchCosts(values, sum(cache.nbytes() for cache in caches) - kept, run.memo.nbytes())


def residual_costs(transformer: nn.Module, settings: EngineSettings, call: dict, steps: int, dtype: torch.dtype | None) -> ResidualCosts:
    run = _dry_run(transformer, with_layout(settings, CacheLayout(1, "model", 0)), call, steps, 1, dtype, dry_steps=1)
    residuals = {name: tuple(entry.value for entry in cache.entries.values()) for (name, _), cache in run.caches.blocks.items()}
    hidden = max(sum(codecs.nbytes(v) for v in values) for values in residuals.values())
    return ResidualCosts(tuple(tuple(chain) for chain in run.spans.chains), residuals, run.memo.nbytes(), hidden)


@dataclass(frozen=True)
class LayoutPlan:
    """What a budget chose for a call: the layout, the budget in bytes there, and what the layout holds."""

    layout: CacheLayout
    limit: int
    size: int


def choose_layout(transformer: nn.Module, settings: EngineSettings, call: dict, streams: int, steps: int,
                  dtype: torch.dtype | None = None, residual: bool | None = None) -> LayoutPlan:
    """The first of ``ditcache.budget.layouts_to_try`` whose cache, for ``streams`` guidance streams of this
    call, fits ``settings.cache_memory``; ``ValueError`` stating the smallest where none does."""
    if residual is None:
        residual = residual_possible(transformer_adapter(transformer), settings)
    residual = residual or settings.cache_span > 0
    own = settings.layout
    residuals = residual_costs(transformer, settings, call, steps, dtype) if residual else None
    branches = None
    if own.span == 0:
        # every branch layout holds at least a residual per block (each block's attention returns a tensor of the
        # hidden states' size) and more memos: where that does not fit, the branch layout's dry run is skipped
        floor = streams * residuals.bytes(CacheLayout(1, own.precision, own.order)) if residuals else 0
        limit = settings.cache_memory.limit(residuals.hidden) if residuals else None
        if limit is None or floor <= limit:
            branches = branch_costs(transformer, settings, call, steps, dtype)
    hidden = residuals.hidden if residuals else max(_stored_bytes(v, "model") for v in branches.values)
    limit = settings.cache_memory.limit(hidden)
    sizes = []
    for layout in layouts_to_try(own, residual):
        costs = residuals if layout.span else branches
        if costs is None:
            continue
        size = streams * costs.bytes(layout)
        if size <= limit:
            return LayoutPlan(layout, limit, size)
        sizes.append((size, layout))
    smallest, layout = min(reversed(sizes), key=lambda item: item[0])  # the coarsest of equal sizes
    raise ValueError(
        f"cache_memory={settings.cache_memory} ({readable_bytes(limit)} here, H = {readable_bytes(hidden)}) is below what any "
        f"layout can keep for this call and {streams} guidance stream(s): the smallest is {readable_bytes(smallest)} "
        f"({smallest / hidden:.2f}H, {layout}). Give at least that, or leave cache_memory out."
    )


# -- `ditcache memory`: each method's cache at a model's size -----------------------------------------------
RELEASED_CONFIGS = Path(__file__).parent / "models" / "configs"  # released transformers' config.json, by name
MEMORY_METHODS = ("fora:4", "fora:4:order=1", "toca:4:0.9:auto:auto", "ditcache:memory=none", "ditcache")


def load_config(source: str) -> dict:
    """A transformer's config: a released name (``RELEASED_CONFIGS``), a config.json, or a model folder (a
    pipeline's, with ``transformer/config.json``, or the transformer's own)."""
    path = Path(source)
    candidates = [RELEASED_CONFIGS / f"{source}.json", path, path / "transformer" / "config.json", path / "config.json"]
    found = next((candidate for candidate in candidates if candidate.is_file()), None)
    if found is None:
        names = ", ".join(sorted(p.stem for p in RELEASED_CONFIGS.glob("*.json")))
        raise ValueError(f"{source!r} is neither a released name ({names}) nor a config.json or a model folder with one.")
    config = json.loads(found.read_text())
    if not isinstance(config, dict) or "_class_name" not in config:
        raise ValueError(f"{found} is not a diffusers model config (it has no `_class_name`).")
    return config


def vae_scale(source: str) -> int | None:
    """The spatial downsampling of the pipeline's VAE, from a pipeline folder's ``vae/config.json``; None without
    one (then the family's released VAE's, ``PipelineGeometry.scale``)."""
    path = Path(source) / "vae" / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    if "scale_factor_spatial" in config:  # Wan's VAE
        return int(config["scale_factor_spatial"])
    if "spatial_compression_ratio" in config:  # LTX-Video's
        return int(config["spatial_compression_ratio"])
    return 2 ** (len(config.get("block_out_channels", (0,) * 4)) - 1)


def meta_transformer(config: dict) -> nn.Module:
    """The transformer ``config`` describes, built on the meta device (no memory)."""
    import diffusers

    cls = getattr(diffusers, config["_class_name"], None)
    if cls is None:
        raise ValueError(f"diffusers has no model class {config['_class_name']!r}.")
    with torch.device("meta"):
        return cls.from_config(config)


@dataclass(frozen=True)
class CallAtSize:
    """One transformer call of a pipeline at an image or video size: its arguments (meta tensors), the calls
    per step (two where the pipeline runs guidance as two calls) and H, one hidden-state tensor of a call."""

    arguments: dict
    calls_per_step: int
    hidden_bytes: int


@dataclass(frozen=True)
class Size:
    """An image or video size as a pipeline call gets it, and the VAE's downsampling in space and time."""

    height: int
    width: int
    frames: int
    batch: int
    text_tokens: int
    scale: int
    temporal: int

    def latent(self, patch: int = 1) -> tuple[int, int]:
        return self.height // (self.scale * patch), self.width // (self.scale * patch)

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // self.temporal + 1


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _flux(config, size: Size, dtype):  # VAE, then 2x2 patches packed into tokens
    b, (h, w), text = size.batch, size.latent(2), size.text_tokens
    arguments = {"hidden_states": _meta(b, h * w, config.in_channels, dtype=dtype),
                 "encoder_hidden_states": _meta(b, text, config.joint_attention_dim, dtype=dtype),
                 "pooled_projections": _meta(b, config.pooled_projection_dim, dtype=dtype), "timestep": _meta(b, dtype=dtype),
                 "img_ids": _meta(h * w, 3, dtype=dtype), "txt_ids": _meta(text, 3, dtype=dtype)}
    if config.guidance_embeds:
        arguments["guidance"] = _meta(b, dtype=dtype)
    return arguments, h * w + text


def _wan(config, size: Size, dtype):  # VAE / 4 in time, then 1x2x2 patches
    b, (h, w), f = size.batch, size.latent(), size.latent_frames
    patch = config.patch_size
    arguments = {"hidden_states": _meta(b, config.in_channels, f, h, w, dtype=dtype),
                 "encoder_hidden_states": _meta(b, size.text_tokens, config.text_dim, dtype=dtype), "timestep": _meta(b, dtype=dtype)}
    return arguments, (f // patch[0]) * (h // patch[1]) * (w // patch[2])


def _sd3(config, size: Size, dtype):  # guidance batched; image and text tokens attend jointly
    b, (h, w) = 2 * size.batch, size.latent()
    arguments = {"hidden_states": _meta(b, config.in_channels, h, w, dtype=dtype),
                 "encoder_hidden_states": _meta(b, size.text_tokens, config.joint_attention_dim, dtype=dtype),
                 "pooled_projections": _meta(b, config.pooled_projection_dim, dtype=dtype), "timestep": _meta(b, dtype=dtype)}
    return arguments, (h // config.patch_size) * (w // config.patch_size) + size.text_tokens


def _pixart(config, size: Size, dtype):  # guidance batched; text by cross-attention
    b, (h, w) = 2 * size.batch, size.latent()
    arguments = {"hidden_states": _meta(b, config.in_channels, h, w, dtype=dtype),
                 "encoder_hidden_states": _meta(b, size.text_tokens, config.caption_channels, dtype=dtype),
                 "encoder_attention_mask": _meta(b, size.text_tokens, dtype=dtype), "timestep": _meta(b, dtype=dtype),
                 "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    return arguments, (h // config.patch_size) * (w // config.patch_size)


def _dit(config, size: Size, dtype):  # guidance batched; a class label, no text
    b, (h, w) = 2 * size.batch, size.latent()
    arguments = {"hidden_states": _meta(b, config.in_channels, h, w, dtype=dtype), "timestep": _meta(b, dtype=dtype),
                 "class_labels": _meta(b, dtype=torch.long)}
    return arguments, (h // config.patch_size) * (w // config.patch_size)


def _hunyuan_video(config, size: Size, dtype):  # guidance embedded (one call); image and text tokens attend jointly
    b, (h, w), f = size.batch, size.latent(), size.latent_frames
    arguments = {"hidden_states": _meta(b, config.in_channels, f, h, w, dtype=dtype), "timestep": _meta(b, dtype=dtype),
                 "encoder_hidden_states": _meta(b, size.text_tokens, config.text_embed_dim, dtype=dtype),
                 "encoder_attention_mask": _meta(b, size.text_tokens, dtype=dtype),
                 "pooled_projections": _meta(b, config.pooled_projection_dim, dtype=dtype), "guidance": _meta(b, dtype=dtype)}
    patch = (config.patch_size_t, config.patch_size, config.patch_size)
    return arguments, (f // patch[0]) * (h // patch[1]) * (w // patch[2]) + size.text_tokens


def _cogvideox(config, size: Size, dtype):  # guidance batched; frames before channels; joint attention
    b, (h, w), f = 2 * size.batch, size.latent(), size.latent_frames
    arguments = {"hidden_states": _meta(b, f, config.in_channels, h, w, dtype=dtype),
                 "encoder_hidden_states": _meta(b, size.text_tokens, config.text_embed_dim, dtype=dtype), "timestep": _meta(b, dtype=dtype)}
    return arguments, f * (h // config.patch_size) * (w // config.patch_size) + size.text_tokens


def _ltx_video(config, size: Size, dtype):  # guidance batched; latent tokens packed, the grid given as numbers
    b, (h, w), f = 2 * size.batch, size.latent(), size.latent_frames
    arguments = {"hidden_states": _meta(b, f * h * w, config.in_channels, dtype=dtype),
                 "encoder_hidden_states": _meta(b, size.text_tokens, config.caption_channels, dtype=dtype),
                 "encoder_attention_mask": _meta(b, size.text_tokens, dtype=dtype), "timestep": _meta(b, dtype=dtype),
                 "num_frames": f, "height": h, "width": w,
                 "rope_interpolation_scale": (size.temporal / 25.0, size.scale, size.scale)}
    return arguments, f * h * w


@dataclass(frozen=True)
class PipelineGeometry:
    """What a family's released pipeline makes of a size: its VAE's downsampling, its prompt length, how it runs
    guidance, and ``call`` (config, ``Size``, dtype) -> one call's arguments and its tokens."""

    call: object
    scale: int = 8
    temporal: int = 0  # frames per latent frame (0: images)
    text_tokens: int = 0
    calls_per_step: int = 1  # 2: guidance as two calls (each with its own cache); else batched or embedded


GEOMETRIES = {
    "FluxTransformer2DModel": PipelineGeometry(_flux, text_tokens=512),
    "WanTransformer3DModel": PipelineGeometry(_wan, temporal=4, text_tokens=512, calls_per_step=2),
    "SD3Transformer2DModel": PipelineGeometry(_sd3, text_tokens=333),  # 77 CLIP + 256 T5
    "PixArtTransformer2DModel": PipelineGeometry(_pixart, text_tokens=300),
    "DiTTransformer2DModel": PipelineGeometry(_dit),
    "HunyuanVideoTransformer3DModel": PipelineGeometry(_hunyuan_video, temporal=4, text_tokens=256),
    "CogVideoXTransformer3DModel": PipelineGeometry(_cogvideox, temporal=4, text_tokens=226),
    "LTXVideoTransformer3DModel": PipelineGeometry(_ltx_video, scale=32, temporal=8, text_tokens=128),
}


def call_at_size(transformer: nn.Module, height: int, width: int, frames: int, batch: int, text_tokens: int | None,
                 dtype: torch.dtype, scale: int | None = None) -> CallAtSize:
    """The call that the family's released pipeline makes at ``height`` x ``width`` (x ``frames``), with its prompt
    length unless ``text_tokens`` is given, its VAE downsampling unless ``scale`` is."""
    name = type(transformer).__name__
    geometry = GEOMETRIES.get(name)
    if geometry is None:
        raise ValueError(f"`ditcache memory` builds the calls of {', '.join(sorted(GEOMETRIES))}, not {name}'s: "
                         "call ditcache.estimate_cache_bytes with one call's arguments.")
    size = Size(height, width, frames if geometry.temporal else 1, batch, geometry.text_tokens if text_tokens is None else text_tokens,
                scale or geometry.scale, geometry.temporal or 1)
    arguments, tokens = geometry.call(transformer.config, size, dtype)
    hidden = arguments["hidden_states"].shape[0] * tokens * transformer.config.num_attention_heads * transformer.config.attention_head_dim
    return CallAtSize(arguments, geometry.calls_per_step, hidden * dtype.itemsize)


def run(args) -> list[tuple[str, int, float]]:
    """``ditcache memory``: each method's cache at the model's size, in GiB and in H; the rows."""
    from .cli import CommandError
    from .eval.speed import parse_method

    try:
        methods = [parse_method(spec) for spec in args.methods or MEMORY_METHODS]
        transformer = meta_transformer(load_config(args.model))
        dtype = getattr(torch, args.dtype)
        call = call_at_size(transformer, args.height, args.width, args.frames, args.batch, args.text_tokens, dtype, vae_scale(args.model))
    except (ValueError, OSError) as error:
        raise CommandError(str(error)) from None
    rows = []
    for method in methods:
        if method.config is None:
            raise CommandError(f"{method.spec}: `ditcache memory` estimates ditcache's own methods (fora, toca, ditcache).")
        size, layout = estimate_cache(transformer, method.config, num_inference_steps=args.steps, calls_per_step=call.calls_per_step,
                                      dtype=dtype, **call.arguments)
        rows.append((method.spec, size, size / call.hidden_bytes, layout))
    video = GEOMETRIES[type(transformer).__name__].temporal
    print(f"{args.model} at {args.height}x{args.width}" + (f"x{args.frames}" if video else "")
          + f", batch {args.batch}, {args.dtype}, {args.steps} steps, {call.calls_per_step} call(s) per step; "
          f"H = {call.hidden_bytes / 2**20:.0f} MiB")
    print(f"{'method':<24} {'cache':>10} {'in H':>8}  layout")
    for name, size, in_h, layout in rows:
        print(f"{name:<24} {size / 2**30:>6.2f} GiB {in_h:>8.1f}  {layout}")
    return rows
