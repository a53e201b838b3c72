"""Models and pipelines built from config, for offline tests, benchmarks and demos.

Weights are random (seeded); the architecture is the real diffusers one. ``dit_transformer`` and
``pixart_transformer`` take a width preset: ``"tiny"`` for tests, ``"xl"`` for the DiT-XL/2 and
PixArt-alpha widths (1152 hidden, 16 heads) with a chosen number of blocks. Pipelines are written with
``save_pretrained`` and read back with ``from_pretrained``, so the real loading code runs. ``"flux"``
is FLUX.1's width (3072 hidden, 24 heads of 128); ``"xl"`` is also OpenSora 1.2's STDiT3 width.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)

WIDTHS = {"tiny": (2, 16), "xl": (16, 72), "flux": (24, 128)}  # (heads, head_dim)
ROPE_AXES = {16: (4, 6, 6), 72: (8, 32, 32), 128: (16, 56, 56)}  # FLUX rotary axes per head_dim
PROMPT_WORDS = (
    "a an the of in on with photo painting cat dog red fox snow digit seven handwritten astronaut riding horse "
    "blue green small large"
).split()


def dit_transformer(width: str = "tiny", num_layers: int = 2, sample_size: int = 8, seed: int = 0) -> DiTTransformer2DModel:
    heads, head_dim = WIDTHS[width]
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ).eval()


def pixart_transformer(
    width: str = "tiny", num_layers: int = 2, sample_size: int = 8, caption_channels: int = 32, seed: int = 0
) -> PixArtTransformer2DModel:
    heads, head_dim = WIDTHS[width]
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        cross_attention_dim=heads * head_dim,
        sample_size=sample_size,
        patch_size=2,
        caption_channels=caption_channels,
        use_additional_conditions=False,
    ).eval()


def flux_transformer(
    width: str = "tiny", num_layers: int = 1, num_single_layers: int = 2, guidance_embeds: bool = True, seed: int = 0
) -> FluxTransformer2DModel:
    heads, head_dim = WIDTHS[width]
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=ROPE_AXES[head_dim],
    ).eval()


def tiny_vae(seed: int = 0, **config) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=16,
        **config,
    ).eval()


def tiny_t5(seed: int = 0, words: tuple[str, ...] = PROMPT_WORDS, width: int = 32):
    """A two-layer T5 encoder (``d_model=width``) and a word-level T5 tokenizer of ``words`` built in code (no download)."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(f"▁{word}", -1.0) for word in dict.fromkeys(words)] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz,."]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(vocab), d_model=width, d_kv=width // 4, d_ff=2 * width, num_layers=2, num_heads=4,
                      dropout_rate=0.0)  # no dropout: a T5 trained with a transformer resumes deterministically
    return tokenizer, T5EncoderModel(config).eval()


def tiny_clip(seed: int = 0, words: tuple[str, ...] = PROMPT_WORDS):
    """A two-layer CLIP text encoder and a CLIP tokenizer built in code: each of ``words`` is one token (its
    byte-pair merges build it from its letters), other words go by character."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789,.":
        vocab[char] = len(vocab)
        vocab[f"{char}</w>"] = len(vocab)
    merges = []
    for word in sorted(dict.fromkeys(words), key=len, reverse=True):  # longer words first: no shorter word's merge cuts them
        prefix = word[0]
        for index, char in enumerate(word[1:], start=2):
            piece = char + ("</w>" if index == len(word) else "")
            merges.append((prefix, piece))
            prefix += piece
            vocab.setdefault(prefix, len(vocab))
        vocab.setdefault(f"{word}</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=77)
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return tokenizer, CLIPTextModel(config).eval()


def clip_model(path: str | Path, seed: int = 0) -> Path:
    """A two-layer CLIP (text and 32-pixel vision towers) with its processor, saved to ``path``: the
    layout of ``openai/clip-vit-large-patch14``, for the CLIP score offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer, text_encoder = tiny_clip(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text_encoder.config.to_dict(), vision_config=vision, projection_dim=32))
    size = {"shortest_edge": 32}
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size=size, crop_size={"height": 32, "width": 32}), tokenizer=tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return Path(path)


def random_features(dim: int = 16, seed: int = 0) -> torch.nn.Module:
    """A small seeded random convolutional feature extractor, for running FID/KID offline (its distances
    show the mechanics only; they are not FID)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, dim, 3, stride=2),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
    ).eval()


def dit_pipeline(
    path: str | Path | None = None, width: str = "tiny", num_layers: int = 2, sample_size: int = 8
) -> DiTPipeline:
    """A DiT pipeline (DDIM) with a tiny VAE; saved to and loaded from ``path`` when given."""
    pipe = DiTPipeline(
        transformer=dit_transformer(width, num_layers, sample_size),
        vae=tiny_vae(),
        scheduler=DDIMScheduler(),
    )
    pipe.register_to_config(id2label={0: "zero", 1: "one"})  # saved in model_index.json, as on the hub
    pipe.labels = {"zero": 0, "one": 1}
    return _round_trip(pipe, path)


def pixart_pipeline(
    path: str | Path | None = None, width: str = "tiny", num_layers: int = 2, sample_size: int = 8, sigma: bool = False
) -> PixArtAlphaPipeline | PixArtSigmaPipeline:
    """A PixArt-alpha (or Sigma) pipeline (DPM-Solver) with a tiny T5 and VAE; saved to and loaded
    from ``path`` when given."""
    tokenizer, text_encoder = tiny_t5()
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = cls(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=tiny_vae(),
        transformer=pixart_transformer(width, num_layers, sample_size),
        scheduler=DPMSolverMultistepScheduler(),
    )
    return _round_trip(pipe, path)


def flux_pipeline(
    path: str | Path | None = None,
    width: str = "tiny",
    num_layers: int = 1,
    num_single_layers: int = 2,
    guidance_embeds: bool = True,
) -> FluxPipeline:
    """A FLUX.1 pipeline (flow matching, guidance-distilled by default) with tiny CLIP, T5 and VAE;
    saved to and loaded from ``path`` when given. Images must be a multiple of 4 pixels."""
    tokenizer, text_encoder = tiny_clip()
    tokenizer_2, text_encoder_2 = tiny_t5()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(shift_factor=0.0, scaling_factor=1.0),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=flux_transformer(width, num_layers, num_single_layers, guidance_embeds),
    )
    return _round_trip(pipe, path)


def wan_pipeline(path: str | Path | None = None, num_layers: int = 2, two_experts: bool = False):
    """A Wan 2.1 text-to-video pipeline (flow matching, guidance 5) with a tiny T5 and Wan VAE, for the
    generic (layer caching) path; with ``two_experts``, Wan 2.2's layout: a second transformer takes the
    low-noise half of the steps (``boundary_ratio=0.5``). Saved to and loaded from ``path`` when given.
    Frames: 4 k + 1; sides: 16 k."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

    tokenizer, text_encoder = tiny_t5()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()

    def transformer():
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                     out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=num_layers,
                                     rope_max_seq_len=32).eval()

    experts = {"transformer": transformer()}
    if two_experts:
        experts |= {"transformer_2": transformer(), "boundary_ratio": 0.5}
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       **experts)
    return _round_trip(pipe, path)


def stdit3_transformer(width: str = "tiny", depth: int = 2, caption_channels: int = 32, text_tokens: int = 16, seed: int = 0):
    """OpenSora 1.2's STDiT3 at a width preset with ``depth`` spatial + temporal block pairs (the released
    model has 28); every parameter random, so that no zero-initialised layer hides a mistake."""
    from ditcache.models import STDiT3Model

    heads, head_dim = WIDTHS[width]
    torch.manual_seed(seed)
    model = STDiT3Model(hidden_size=heads * head_dim, depth=depth, num_heads=heads, caption_channels=caption_channels,
                        model_max_length=text_tokens, input_sq_size=64 if width == "tiny" else 512).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.02)
    return model


def tiny_opensora_vae(seed: int = 0):
    """OpenSora 1.2's VAE layout at a tiny size: a two-level 2D VAE (x2 in space), the temporal VAE
    with one residual block per level (x4 in time over 17-frame chunks)."""
    from ditcache.models import OpenSoraVAE

    torch.manual_seed(seed)
    spatial = dict(block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                   norm_num_groups=8, sample_size=16)
    return OpenSoraVAE(spatial_config=spatial, temporal_filters=8, temporal_res_blocks=1, temporal_groups=4).eval()


def opensora_pipeline(path: str | Path | None = None, width: str = "tiny", depth: int = 2, text_tokens: int = 16):
    """An OpenSora 1.2 text-to-video pipeline (rectified flow) with a tiny T5 and VAE; saved to and loaded
    from ``path`` when given. Captions are padded to ``text_tokens`` (the released model: 300)."""
    from ditcache.pipelines.opensora import OpenSoraPipeline

    tokenizer, text_encoder = tiny_t5()
    pipe = OpenSoraPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=stdit3_transformer(width, depth, text_tokens=text_tokens),
        vae=tiny_opensora_vae(), scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    return _round_trip(pipe, path)


def _round_trip(pipe, path):
    if path is None:
        return pipe.to("cpu")
    pipe.save_pretrained(path)
    return type(pipe).from_pretrained(path).to("cpu")


def bench_pipeline(spec, args) -> tuple[DiffusionPipeline, dict]:
    """The tiny pipeline of ``spec``'s family (``spec.tiny``) sized by ``ditcache bench``'s arguments, and
    the arguments of one call: both read from the builder's and the pipeline's signatures, so that a
    family with a tiny builder needs nothing here."""
    builder = globals()[spec.tiny]
    height, width = args.latent_size
    sizes = {"width": args.width, "num_layers": args.layers, "depth": args.layers, "num_single_layers": args.single_layers,
             "sample_size": height, "text_tokens": args.text_tokens}
    accepted = inspect.signature(builder).parameters
    pipe = builder(**{name: value for name, value in sizes.items() if name in accepted})
    takes = inspect.signature(type(pipe).__call__).parameters
    if "height" not in takes and height != width:
        raise ValueError(f"{type(pipe).__name__} generates square latents: give --size as one number.")
    call = {"num_inference_steps": args.steps, "output_type": "np" if "num_frames" in takes else "pt"}
    if "class_labels" in takes:  # class-conditional (DiT)
        call |= {"class_labels": list(range(args.batch)), "guidance_scale": 4.0}
    else:
        call["prompt"] = ["a red fox in snow"] * args.batch
    if "height" in takes:
        scale = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None) or pipe.vae.spatial_compression
        call |= {"height": height * scale, "width": width * scale}
    optional = {"num_frames": args.frames, "max_sequence_length": args.text_tokens, "use_resolution_binning": False, "clean_caption": False}
    call |= {name: value for name, value in optional.items() if name in takes}
    return pipe, call
