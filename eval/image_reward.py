"""ImageReward (Xu et al. 2023), a learned human-preference score for text-to-image generations.

The ``image-reward`` package does not import on transformers 5, so this module assembles the model from
transformers' BLIP modules: BLIP's ViT (``BlipVisionModel``) encodes the image, BLIP's BERT ("med",
``BlipTextModel``) encodes the prompt with cross-attention to the image tokens, and a small MLP turns the [CLS]
state into a reward. The released ``ImageReward.pt`` of https://huggingface.co/THUDM/ImageReward loads with its
own key names (the ViT's are mapped to transformers' and back), checked strictly.

Facts taken from THUDM/ImageReward (``ImageReward/ImageReward.py``, ``ImageReward/models/BLIP/{vit,med,blip,
blip_pretrain}.py``, ``ImageReward/utils.py``): ViT-L/16 at 224 px (LayerNorm eps 1e-6, qkv with bias, 16 heads);
BERT without token-type embeddings whose cross-attention keys and values take the ViT width (BLIP overrides
``encoder_width`` of med_config.json with it); prompts tokenised by bert-base-uncased to 35 tokens; images resized
(bicubic, shorter side) and center-cropped to 224 px, normalised with CLIP's mean and std; reward
``(mlp(cls) - 0.16717...) / 1.03333...``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig, BlipVisionModel, PreTrainedTokenizerBase
from transformers.models.blip.modeling_blip_text import BlipTextModel

from .weights import MissingWeightsError, load_checkpoint, require_weights

CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"

# The checkpoint is the state dict of the whole training model; these entries never reach the reward:
# BLIP's contrastive projections (vision_proj, text_proj) and the persistent position_ids buffer of
# transformers 4 BERT embeddings (always 0..max_position_embeddings-1, rebuilt here).
IGNORED_CHECKPOINT_PREFIXES = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
PROMPT_TOKENS = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_HEAD_WIDTH = 64  # BLIP's ViT-B (768 wide, 12 heads) and ViT-L (1024, 16 heads) both use 64-wide heads


@dataclass(frozen=True)
class VisionSizes:
    """The ViT's sizes; all but the head count are read off the checkpoint's shapes."""

    width: int
    depth: int
    patch_size: int
    image_size: int
    mlp_width: int

    @property
    def heads(self) -> int:
        """Not stored in a state dict: BLIP's ViTs use 64-wide heads (one head for narrower test models)."""
        return max(1, self.width // VIT_HEAD_WIDTH)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], prefix: str = "blip.visual_encoder.") -> VisionSizes:
        """Sizes of the ViT saved under ``prefix``, so checkpoints of any size (tiny test ones too) load."""
        try:
            patch = state_dict[prefix + "patch_embed.proj.weight"]
            positions = state_dict[prefix + "pos_embed"].shape[1] - 1  # one position is the class token's
            mlp_width = state_dict[prefix + "blocks.0.mlp.fc1.weight"].shape[0]
        except KeyError as error:
            raise ValueError(f"not an ImageReward checkpoint: it has no {error.args[0]!r}") from None
        side = math.isqrt(positions)
        if side * side != positions:
            raise ValueError(f"{prefix}pos_embed holds {positions} patch positions, not a square grid")
        depth = sum(1 for key in state_dict if key.startswith(prefix + "blocks.") and key.endswith(".norm1.weight"))
        return cls(patch.shape[0], depth, patch.shape[-1], side * patch.shape[-1], mlp_width)


# The release's ViT (timm-style names, under ``blip.visual_encoder.``) against transformers' BlipVisionModel.
_VIT_NAMES = (("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
              ("patch_embed.proj", "embeddings.patch_embedding"), ("blocks.", "encoder.layers."), ("norm1", "layer_norm1"),
              ("norm2", "layer_norm2"), ("attn.qkv", "self_attn.qkv"), ("attn.proj", "self_attn.projection"))


def _vit_name(key: str, released: bool) -> str:
    """A ViT weight's name in transformers' ``BlipVisionModel`` (``released=False``) or in the release."""
    pairs = [(ours, theirs) for theirs, ours in _VIT_NAMES] if released else _VIT_NAMES
    final, renamed = ("post_layernorm.", "norm.") if released else ("norm.", "post_layernorm.")
    if key.startswith(final):
        return renamed + key.removeprefix(final)
    for old, new in pairs:
        key = key.replace(old, new)
    return key


def _rename(state_dict: dict, prefix: str, released: bool) -> None:
    for key in [key for key in state_dict if key.startswith(prefix)]:
        state_dict[prefix + _vit_name(key[len(prefix):], released)] = state_dict.pop(key)


def _vision_model(sizes: VisionSizes) -> BlipVisionModel:
    """transformers' BLIP ViT (the same pre-norm ViT as the release's), saved and loaded under the release's names."""
    model = BlipVisionModel(BlipVisionConfig(
        hidden_size=sizes.width, intermediate_size=sizes.mlp_width, num_hidden_layers=sizes.depth,
        num_attention_heads=sizes.heads, image_size=sizes.image_size, patch_size=sizes.patch_size, layer_norm_eps=1e-6,
        hidden_act="gelu", attention_dropout=0.0))
    model.register_state_dict_post_hook(lambda _m, state_dict, prefix, _meta: _rename(state_dict, prefix, released=True))
    model.register_load_state_dict_pre_hook(lambda _m, state_dict, prefix, *_: _rename(state_dict, prefix, released=False))
    return model


def _text_model(config: dict, image_width: int) -> BlipTextModel:
    """transformers' BLIP text encoder (BLIP's med BERT: no token-type embeddings; cross-attention keys and values
    take the ViT width), without its pooler, as the release has none."""
    return BlipTextModel(BlipTextConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"], encoder_hidden_size=image_width,
        intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"], max_position_embeddings=config["max_position_embeddings"],
        layer_norm_eps=config["layer_norm_eps"], hidden_act=config["hidden_act"], hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, bos_token_id=None, eos_token_id=None, sep_token_id=None, pad_token_id=config.get("pad_token_id", 0)),
        add_pooling_layer=False)


class _Blip(nn.Module):
    def __init__(self, med_config: dict, vision: VisionSizes):
        super().__init__()
        self.visual_encoder = _vision_model(vision)
        self.text_encoder = _text_model(med_config, image_width=vision.width)


class _RewardHead(nn.Module):
    """The reward MLP: linear layers only (at indices 0, 2, 4, 6, 7 of ``layers``, the released key names)."""

    def __init__(self, in_width: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_width, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def _resize_and_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The release's PIL ``Resize(size, BICUBIC)`` (shorter side) and ``CenterCrop(size)``, on tensors.

    Antialiased bicubic interpolation is torch's match for PIL's bicubic resampling. PIL resamples the width,
    then the height, each time into its 8-bit range, so the overshoot of each pass is clamped the same way.
    """
    height, width = images.shape[-2:]
    resized_long = int(size * max(height, width) / min(height, width))
    new_height, new_width = (size, resized_long) if height <= width else (resized_long, size)
    for pass_size in ((height, new_width), (new_height, new_width)):
        images = F.interpolate(images, size=pass_size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = int(round((new_height - size) / 2)), int(round((new_width - size) / 2))
    return images[..., top : top + size, left : left + size]


def _required_file(folder: Path, name: str) -> Path:
    file = folder / name
    if not file.is_file():
        raise MissingWeightsError(
            f"{folder} has no {name}: the image_reward metric needs {CHECKPOINT_FILE} and {MED_CONFIG_FILE} from "
            "https://huggingface.co/THUDM/ImageReward (`ditcache eval fetch image-reward` on a machine that is online)."
        )
    return file


def _checked_state_dict(
    state_dict: dict[str, torch.Tensor], expected: set[str], source: str
) -> dict[str, torch.Tensor]:
    """The checkpoint without its ignorable entries; any other difference from ``expected`` is an error."""
    used = {key: value for key, value in state_dict.items() if not key.startswith(IGNORED_CHECKPOINT_PREFIXES)}
    missing, unexpected = sorted(expected - used.keys()), sorted(used.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the ImageReward architecture: {len(missing)} missing keys {missing[:20]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:20]} (ignored: {', '.join(IGNORED_CHECKPOINT_PREFIXES)})"
        )
    return used


class ImageReward(nn.Module):
    """ImageReward v1.0: one human-preference reward per (prompt, image) pair, higher is better.

    Args:
        med_config: the BERT sizes, as in the release's ``med_config.json`` (its ``encoder_width`` is ignored:
            the cross-attention takes the ViT width, as in BLIP).
        vision: the ViT sizes, usually :meth:`VisionSizes.from_state_dict` of the checkpoint.
        tokenizer: bert-base-uncased's tokenizer (or one with the same special tokens).
    """

    def __init__(self, med_config: dict, vision: VisionSizes, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        self.blip = _Blip(med_config, vision)
        self.mlp = _RewardHead(med_config["hidden_size"])
        self.image_size = vision.image_size
        self.tokenizer = tokenizer
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(3, 1, 1), persistent=False)
        self.eval()  # a metric: dropout never runs

    @classmethod
    def from_pretrained(cls, path: str | None = None, tokenizer_path: str | None = None) -> ImageReward:
        """Load the released checkpoint without downloading anything.

        Args:
            path: folder with ``ImageReward.pt`` and ``med_config.json``; by default ``$DITCACHE_IMAGE_REWARD``
                or THUDM/ImageReward in the Hugging Face cache.
            tokenizer_path: folder with bert-base-uncased's tokenizer files; by default
                ``$DITCACHE_BERT_TOKENIZER`` or google-bert/bert-base-uncased in the Hugging Face cache.

        Raises:
            MissingWeightsError: a folder or file is missing; the message says which and how to get it.
            UnsafeCheckpointError: ``ImageReward.pt`` holds pickled objects besides tensors.
            ValueError: the checkpoint's keys differ from the architecture beyond the ignorable ones.
        """
        folder = require_weights("image-reward", path)
        checkpoint_file = _required_file(folder, CHECKPOINT_FILE)
        med_config = json.loads(_required_file(folder, MED_CONFIG_FILE).read_text())
        tokenizer = BertTokenizer.from_pretrained(str(require_weights("bert-base-uncased", tokenizer_path)))
        # BLIP's init_tokenizer adds these two; they change tokenisation only of prompts that contain them literally.
        tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})

        state_dict = load_checkpoint(checkpoint_file)
        model = cls(med_config, VisionSizes.from_state_dict(state_dict), tokenizer)
        model.load_state_dict(_checked_state_dict(state_dict, set(model.state_dict()), str(checkpoint_file)))
        return model

    @torch.no_grad()
    def score(self, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        """Rewards of ``images`` (float (N, 3, H, W) in [0, 1]) for their ``prompts`` (one each), shape (N,).

        Images of any size are resized and center-cropped like the release's PIL preprocessing.
        """
        if images.ndim != 4 or images.shape[1] != 3 or len(prompts) != len(images):
            raise ValueError(
                f"need one prompt per image and images of shape (N, 3, H, W); got {len(prompts)} prompts and "
                f"images of shape {tuple(images.shape)}"
            )
        mean, std = self.pixel_mean, self.pixel_std
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=PROMPT_TOKENS, return_tensors="pt"
        ).to(mean.device)
        pixels = (_resize_and_crop(images.to(mean.device, mean.dtype), self.image_size) - mean) / std
        image_tokens = self.blip.visual_encoder(pixels).last_hidden_state
        text = self.blip.text_encoder(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=mean.device), is_decoder=False,
        ).last_hidden_state
        rewards = self.mlp(text[:, 0])  # the [CLS] state, which has seen prompt and image
        return ((rewards - REWARD_MEAN) / REWARD_STD).squeeze(1)
