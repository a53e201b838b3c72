"""ImageReward (Xu et al. 2023), a learned human-preference score for text-to-image generations.

The ``image-reward`` package does not import on transformers 5, so this module rebuilds the model: BLIP's ViT
encodes the image, BLIP's BERT ("med") encodes the prompt with cross-attention to the image tokens, and a small
MLP turns the [CLS] state into a reward. The modules are named so that the released ``ImageReward.pt`` of
https://huggingface.co/THUDM/ImageReward loads with its own key names, checked strictly.

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
from transformers import BertTokenizer, PreTrainedTokenizerBase
from transformers.activations import ACT2FN

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


class _PatchEmbedding(nn.Module):
    def __init__(self, sizes: VisionSizes):
        super().__init__()
        self.proj = nn.Conv2d(3, sizes.width, sizes.patch_size, stride=sizes.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)


class _VisionAttention(nn.Module):
    def __init__(self, sizes: VisionSizes):
        super().__init__()
        self.heads = sizes.heads
        self.qkv = nn.Linear(sizes.width, 3 * sizes.width)
        self.proj = nn.Linear(sizes.width, sizes.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, width = tokens.shape
        query, key, value = self.qkv(tokens).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(query, key, value)
        return self.proj(mixed.transpose(1, 2).reshape(batch, length, width))


class _VisionMlp(nn.Module):
    def __init__(self, sizes: VisionSizes):
        super().__init__()
        self.fc1 = nn.Linear(sizes.width, sizes.mlp_width)
        self.fc2 = nn.Linear(sizes.mlp_width, sizes.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(tokens)))


class _VisionBlock(nn.Module):
    def __init__(self, sizes: VisionSizes):
        super().__init__()
        self.norm1 = nn.LayerNorm(sizes.width, eps=1e-6)
        self.attn = _VisionAttention(sizes)
        self.norm2 = nn.LayerNorm(sizes.width, eps=1e-6)
        self.mlp = _VisionMlp(sizes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attn(self.norm1(tokens))
        return tokens + self.mlp(self.norm2(tokens))


class _VisionTransformer(nn.Module):
    """BLIP's pre-norm ViT; returns every token (class token first) after the final LayerNorm."""

    def __init__(self, sizes: VisionSizes):
        super().__init__()
        self.patch_embed = _PatchEmbedding(sizes)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, sizes.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (sizes.image_size // sizes.patch_size) ** 2 + 1, sizes.width))
        self.blocks = nn.ModuleList(_VisionBlock(sizes) for _ in range(sizes.depth))
        self.norm = nn.LayerNorm(sizes.width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(pixels)
        tokens = torch.cat([self.cls_token.expand(len(patches), -1, -1), patches], dim=1) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)


class _TextEmbeddings(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.word_embeddings = nn.Embedding(config["vocab_size"], config["hidden_size"])
        self.position_embeddings = nn.Embedding(config["max_position_embeddings"], config["hidden_size"])
        self.LayerNorm = nn.LayerNorm(config["hidden_size"], eps=config["layer_norm_eps"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class _AttentionProjections(nn.Module):
    """Query from the text, key and value from ``context`` (the text itself, or the image tokens)."""

    def __init__(self, config: dict, context_width: int):
        super().__init__()
        self.heads = config["num_attention_heads"]
        self.query = nn.Linear(config["hidden_size"], config["hidden_size"])
        self.key = nn.Linear(context_width, config["hidden_size"])
        self.value = nn.Linear(context_width, config["hidden_size"])

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        def split_heads(states: torch.Tensor) -> torch.Tensor:
            return states.view(*states.shape[:2], self.heads, -1).transpose(1, 2)

        query = split_heads(self.query(hidden))
        key, value = split_heads(self.key(context)), split_heads(self.value(context))
        mixed = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask)
        return mixed.transpose(1, 2).flatten(2)


class _AddAndNorm(nn.Module):
    """BERT's post-norm residual: ``LayerNorm(dense(update) + residual)``."""

    def __init__(self, config: dict, in_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, config["hidden_size"])
        self.LayerNorm = nn.LayerNorm(config["hidden_size"], eps=config["layer_norm_eps"])

    def forward(self, update: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(update) + residual)


class _TextAttention(nn.Module):
    def __init__(self, config: dict, context_width: int):
        super().__init__()
        self.self = _AttentionProjections(config, context_width)
        self.output = _AddAndNorm(config, config["hidden_size"])

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(hidden, context, key_mask), hidden)


class _Intermediate(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.dense = nn.Linear(config["hidden_size"], config["intermediate_size"])
        self.activation = ACT2FN[config["hidden_act"]]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden))


class _TextLayer(nn.Module):
    """One med BERT layer in its "multimodal" mode: self-attention, cross-attention to the image, feed-forward."""

    def __init__(self, config: dict, image_width: int):
        super().__init__()
        self.attention = _TextAttention(config, config["hidden_size"])
        self.crossattention = _TextAttention(config, image_width)
        self.intermediate = _Intermediate(config)
        self.output = _AddAndNorm(config, config["intermediate_size"])

    def forward(self, hidden: torch.Tensor, token_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(hidden, hidden, token_mask)
        hidden = self.crossattention(hidden, image_tokens, None)  # every image token is attended to
        return self.output(self.intermediate(hidden), hidden)


class _TextLayers(nn.Module):
    def __init__(self, config: dict, image_width: int):
        super().__init__()
        self.layer = nn.ModuleList(_TextLayer(config, image_width) for _ in range(config["num_hidden_layers"]))


class _TextEncoder(nn.Module):
    """BLIP's med BERT: no token-type embeddings, no pooler; cross-attention keys and values take the ViT width."""

    def __init__(self, config: dict, image_width: int):
        super().__init__()
        self.embeddings = _TextEmbeddings(config)
        self.encoder = _TextLayers(config, image_width)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.embeddings(input_ids)
        token_mask = attention_mask[:, None, None, :].bool()  # padding is never attended to
        for layer in self.encoder.layer:
            hidden = layer(hidden, token_mask, image_tokens)
        return hidden


class _Blip(nn.Module):
    def __init__(self, med_config: dict, vision: VisionSizes):
        super().__init__()
        self.visual_encoder = _VisionTransformer(vision)
        self.text_encoder = _TextEncoder(med_config, image_width=vision.width)


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
        image_tokens = self.blip.visual_encoder(pixels)
        text = self.blip.text_encoder(tokens["input_ids"], tokens["attention_mask"], image_tokens)
        rewards = self.mlp(text[:, 0])  # the [CLS] state, which has seen prompt and image
        return ((rewards - REWARD_MEAN) / REWARD_STD).squeeze(1)
