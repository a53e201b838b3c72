"""Per-model facts as data: one ``ModelSpec`` per transformer class ditcache caches.

A spec says where a call's latents and timestep are and in which units and direction the timestep runs,
which lists hold the blocks, which submodules of each block class are its cached branches and how their
tokens line up with the attention, and which pipelines call it. Adding a model is one ``register`` call:
``ditcache.adapters.generic`` turns a spec into hooks on its branches. A family whose blocks need their
own math for token-wise caching (DiT, PixArt, FLUX.1, OpenSora: ``ditcache.adapters``) names its
adapter in the spec; everything else (config, pipelines, benchmarks, peers) reads the spec alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class ModelSpec:
    """How ditcache reads and caches one transformer class.

    Args:
        family: the model family (names its preset; one without a preset of its own takes the generic one).
        transformer: the transformer's class name (diffusers' or ditcache's).
        block_lists: the attributes holding its blocks, in the order they run.
        branches: per block class name, the submodules whose outputs a partial step reuses. Each must
            enter the residual through the block's own gate and add, so that reuse keeps the current
            step's modulation; absent submodules (e.g. a last block without a text MLP) are skipped.
        partial_branches: per block class, the branches that map each token of their first input on its
            own (feed-forwards, cross-attention queries, an output projection), each with its token group
            (``"image"``, ``"text"``, or ``"all"`` for a joint sequence): ``ToCaConfig`` recomputes chosen
            tokens of these on partial steps and reuses the rest; every other branch is reused whole. The
            branches of one group recompute the same tokens in a block call (a single-stream block's MLP
            and output projection must).
        attention_sequences: per block class, the branch whose attention is scored (``score="attention"``
            and ``"v_norm"`` read its ``scaled_dot_product_attention`` call, ``"k_norm"`` its ``to_k`` and,
            for text, ``add_k_proj``) and the token groups of its sequence in order (one, or two: the first
            and the last). A block class without one chooses tokens by ``score="random"`` only.
        latents_argument, timestep_argument: the forward arguments holding them.
        timestep_scale, timestep_offset: the model's timestep is ``scale * t + offset`` for the scheduler's
            ``t`` (FLUX.2 and Qwen-Image take ``t / 1000``, Z-Image ``(1000 - t) / 1000``).
        timestep_rises: the timestep grows during a run (Mochi's scheduler runs ``1000 * (1 - sigma)``),
            so that on a bare transformer a new run shows as a timestep that falls back.
        pipelines: the diffusers pipelines that call this transformer the standard way.
        adapter: ``"module:Class"`` of a ``TransformerAdapter`` with block adapters of its own (token-wise
            caching from the blocks' own math, token merging); None: the generic path.
        tiny: the name of the function in ``ditcache.eval.builders`` that builds a tiny pipeline of the family
            (seeded random weights) for tests, sweeps and ``ditcache bench``; None when there is none.
    """

    family: str
    transformer: str
    block_lists: tuple[str, ...]
    branches: Mapping[str, tuple[str, ...]]
    partial_branches: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: MappingProxyType({}))
    attention_sequences: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    latents_argument: str = "hidden_states"
    timestep_argument: str = "timestep"
    timestep_scale: float = 1.0
    timestep_offset: float = 0.0
    timestep_rises: bool = False
    pipelines: tuple[str, ...] = field(default=())
    adapter: str | None = None
    tiny: str | None = None


SPECS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Make ``spec`` the one for its transformer class (replacing an earlier one)."""
    SPECS[spec.transformer] = spec
    return spec


def spec_for(transformer) -> ModelSpec | None:
    """The spec of ``transformer``'s class or of its nearest registered base class."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in SPECS:
            return SPECS[cls.__name__]
    return None


def _branches(**per_block) -> Mapping:
    return MappingProxyType(per_block)


def _groups(**group_of_branch: str) -> Mapping[str, str]:
    return MappingProxyType(group_of_branch)


# The families with block adapters of their own: token-wise caching with every score, and token merging.
register(ModelSpec(
    family="dit", transformer="DiTTransformer2DModel", block_lists=("transformer_blocks",),
    branches=_branches(BasicTransformerBlock=("attn1", "ff")), pipelines=("DiTPipeline",),
    adapter="ditcache.adapters:BasicBlocksAdapter", tiny="dit_pipeline",
))
register(ModelSpec(
    family="pixart", transformer="PixArtTransformer2DModel", block_lists=("transformer_blocks",),
    branches=_branches(BasicTransformerBlock=("attn1", "attn2", "ff")), pipelines=("PixArtAlphaPipeline", "PixArtSigmaPipeline"),
    adapter="ditcache.adapters:BasicBlocksAdapter", tiny="pixart_pipeline",
))
register(ModelSpec(
    family="flux", transformer="FluxTransformer2DModel", block_lists=("transformer_blocks", "single_transformer_blocks"),
    branches=_branches(FluxTransformerBlock=("attn", "ff", "ff_context"), FluxSingleTransformerBlock=("attn", "proj_mlp", "proj_out")),
    timestep_scale=1 / 1000, adapter="ditcache.adapters:FluxAdapter", tiny="flux_pipeline",
    pipelines=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxKontextPipeline", "FluxControlPipeline",
               "FluxFillPipeline"),
))
register(ModelSpec(
    family="opensora", transformer="STDiT3Model", block_lists=("spatial_blocks", "temporal_blocks"),
    branches=_branches(STDiT3Block=("attn", "cross_attn", "mlp")), latents_argument="x", pipelines=("OpenSoraPipeline",),
    adapter="ditcache.adapters:STDiT3Adapter", tiny="opensora_pipeline",
))


# The two block shapes of FLUX-like models: a double-stream block with an MLP per stream, and a single-stream
# block on cat(image, text) or cat(text, image) whose output projection runs over cat(attention, MLP), so that
# its MLP and its projection recompute the same tokens.
_DOUBLE = _groups(ff="image", ff_context="text")
_SINGLE = _groups(proj_mlp="all", proj_out="all")


def _flux_like(order: tuple[str, str], *pairs: tuple[str, str]) -> dict:
    """The branches, token groups and scored attentions of a FLUX-like family, for each (double-stream,
    single-stream) pair of block classes: the double-stream block's joint attention runs its streams in
    ``order``, the single-stream block works on their joint sequence."""
    doubles, singles = [double for double, _ in pairs], [single for _, single in pairs]
    return dict(
        branches=_branches(**dict.fromkeys(doubles, ("attn", "ff", "ff_context")), **dict.fromkeys(singles, ("attn", "proj_mlp", "proj_out"))),
        partial_branches=_branches(**dict.fromkeys(doubles, _DOUBLE), **dict.fromkeys(singles, _SINGLE)),
        attention_sequences=_branches(**dict.fromkeys(doubles, ("attn", *order)), **dict.fromkeys(singles, ("attn", "all"))),
    )


register(ModelSpec(
    family="sd3", transformer="SD3Transformer2DModel", block_lists=("transformer_blocks",),
    branches=_branches(JointTransformerBlock=("attn", "attn2", "ff", "ff_context")),
    partial_branches=_branches(JointTransformerBlock=_DOUBLE),
    attention_sequences=_branches(JointTransformerBlock=("attn", "image", "text")),
    pipelines=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
))
register(ModelSpec(
    family="wan", transformer="WanTransformer3DModel", block_lists=("blocks",),
    branches=_branches(WanTransformerBlock=("attn1", "attn2", "ffn")),
    partial_branches=_branches(WanTransformerBlock=_groups(attn2="image", ffn="image")),
    attention_sequences=_branches(WanTransformerBlock=("attn1", "image")),
    pipelines=("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline"), tiny="wan_pipeline",
))
register(ModelSpec(
    family="qwenimage", transformer="QwenImageTransformer2DModel", block_lists=("transformer_blocks",),
    branches=_branches(QwenImageTransformerBlock=("attn", "img_mlp", "txt_mlp")), timestep_scale=1 / 1000,
    partial_branches=_branches(QwenImageTransformerBlock=_groups(img_mlp="image", txt_mlp="text")),
    attention_sequences=_branches(QwenImageTransformerBlock=("attn", "text", "image")),
    pipelines=("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"),
))
register(ModelSpec(
    family="hunyuanvideo", transformer="HunyuanVideoTransformer3DModel",
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    # Image-to-video with image_condition_type="token_replace": the first frame's tokens take their own modulation.
    **_flux_like(("image", "text"), ("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"),
                 ("HunyuanVideoTokenReplaceTransformerBlock", "HunyuanVideoTokenReplaceSingleTransformerBlock")),
    pipelines=("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline"),
))
register(ModelSpec(
    family="flux2", transformer="Flux2Transformer2DModel", block_lists=("transformer_blocks", "single_transformer_blocks"),
    branches=_branches(Flux2TransformerBlock=("attn", "ff", "ff_context"), Flux2SingleTransformerBlock=("attn",)),
    partial_branches=_branches(Flux2TransformerBlock=_DOUBLE),
    attention_sequences=_branches(Flux2TransformerBlock=("attn", "text", "image")),
    timestep_scale=1 / 1000, pipelines=("Flux2Pipeline",),
))
register(ModelSpec(
    family="cogvideox", transformer="CogVideoXTransformer3DModel", block_lists=("transformer_blocks",),
    branches=_branches(CogVideoXBlock=("attn1", "ff")),
    partial_branches=_branches(CogVideoXBlock=_groups(ff="all")),  # its feed-forward runs on cat(text, image)
    attention_sequences=_branches(CogVideoXBlock=("attn1", "all")),
    pipelines=("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline"),
))
register(ModelSpec(
    family="ltx", transformer="LTXVideoTransformer3DModel", block_lists=("transformer_blocks",),
    branches=_branches(LTXVideoTransformerBlock=("attn1", "attn2", "ff")),
    partial_branches=_branches(LTXVideoTransformerBlock=_groups(attn2="image", ff="image")),
    attention_sequences=_branches(LTXVideoTransformerBlock=("attn1", "image")),
    pipelines=("LTXPipeline", "LTXImageToVideoPipeline"),
))
register(ModelSpec(
    family="mochi", transformer="MochiTransformer3DModel", block_lists=("transformer_blocks",),
    branches=_branches(MochiTransformerBlock=("attn1", "ff", "ff_context")),
    partial_branches=_branches(MochiTransformerBlock=_DOUBLE),
    timestep_rises=True, pipelines=("MochiPipeline",),
))
register(ModelSpec(
    family="cogview4", transformer="CogView4Transformer2DModel", block_lists=("transformer_blocks",),
    branches=_branches(CogView4TransformerBlock=("attn1", "ff")), partial_branches=_branches(CogView4TransformerBlock=_groups(ff="tokens")),
    pipelines=("CogView4Pipeline", "CogView4ControlPipeline"),
))
register(ModelSpec(
    family="bria", transformer="BriaTransformer2DModel", block_lists=("transformer_blocks", "single_transformer_blocks"),
    **_flux_like(("text", "image"), ("BriaTransformerBlock", "BriaSingleTransformerBlock")),
    pipelines=("BriaPipeline",),
))
register(ModelSpec(
    family="hunyuanimage", transformer="HunyuanImageTransformer2DModel",
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    **_flux_like(("image", "text"), ("HunyuanImageTransformerBlock", "HunyuanImageSingleTransformerBlock")),
    pipelines=("HunyuanImagePipeline",),
))
register(ModelSpec(
    family="motifvideo", transformer="MotifVideoTransformer3DModel",
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    **_flux_like(("image", "text"), ("MotifVideoTransformerBlock", "MotifVideoSingleTransformerBlock")),
    pipelines=("MotifVideoPipeline", "MotifVideoImage2VideoPipeline"),
))
register(ModelSpec(
    family="zimage", transformer="ZImageTransformer2DModel", block_lists=("noise_refiner", "context_refiner", "layers"),
    branches=_branches(ZImageTransformerBlock=("attention", "feed_forward")), latents_argument="x", timestep_argument="t",
    partial_branches=_branches(ZImageTransformerBlock=_groups(feed_forward="all")),
    timestep_scale=-1 / 1000, timestep_offset=1.0, timestep_rises=True, pipelines=("ZImagePipeline",),
))
register(ModelSpec(
    family="kandinsky5", transformer="Kandinsky5Transformer3DModel",
    block_lists=("text_transformer_blocks", "visual_transformer_blocks"),
    branches=_branches(
        Kandinsky5TransformerEncoderBlock=("self_attention", "feed_forward"),
        Kandinsky5TransformerDecoderBlock=("self_attention", "cross_attention", "feed_forward"),
    ),
    partial_branches=_branches(
        Kandinsky5TransformerEncoderBlock=_groups(feed_forward="text"), Kandinsky5TransformerDecoderBlock=_groups(feed_forward="image"),
    ),
    pipelines=("Kandinsky5T2VPipeline", "Kandinsky5I2VPipeline", "Kandinsky5T2IPipeline", "Kandinsky5I2IPipeline"),
))
