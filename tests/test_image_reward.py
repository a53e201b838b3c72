"""ImageReward's own loader and model, checked on a tiny random checkpoint laid out like the release.

The release (THUDM/ImageReward, ImageReward.pt) is the state dict of ``ImageReward`` in the THUDM/ImageReward
sources: ``blip`` (BLIP_Pretrain: visual_encoder, text_encoder, vision_proj, text_proj) and ``mlp``.
"""

import json

import pytest
import torch
from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig, BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from ditcache.eval.image_reward import ImageReward, VisionSizes
from ditcache.eval.weights import MissingWeightsError

VISION = VisionSizes(width=48, depth=2, patch_size=16, image_size=32, mlp_width=192)  # narrower than the text
MED_CONFIG = {  # the release's med_config.json with tiny sizes; encoder_width is overridden by the ViT width
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 40,
    "model_type": "bert",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 48,
    "encoder_width": 768,
    "add_cross_attention": True,
}
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "red", "blue", "car", "on",
         "the", "grass", "##s"]
PROMPTS = ["a photo of a cat", "A red car on the grass", "blue dogs " * 12]
WORD_PIECES = [["a", "photo", "of", "a", "cat"], ["a", "red", "car", "on", "the", "grass"], ["blue", "dog", "##s"] * 12]

# Key names of the release for this depth, from ImageReward/ImageReward.py (blip, mlp.layers), BLIP/vit.py
# (timm-style ViT) and BLIP/med.py (BertModel without pooler, crossattention in every layer).
VIT_BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                  "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                  "mlp.fc2.bias"]
BERT_ATTENTION_KEYS = ["self.query.weight", "self.query.bias", "self.key.weight", "self.key.bias", "self.value.weight",
                       "self.value.bias", "output.dense.weight", "output.dense.bias", "output.LayerNorm.weight",
                       "output.LayerNorm.bias"]
BERT_LAYER_KEYS = ([f"attention.{key}" for key in BERT_ATTENTION_KEYS]
                   + [f"crossattention.{key}" for key in BERT_ATTENTION_KEYS]
                   + ["intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight",
                      "output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias"])
RELEASED_KEYS = (
    ["blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed", "blip.visual_encoder.patch_embed.proj.weight",
     "blip.visual_encoder.patch_embed.proj.bias"]
    + [f"blip.visual_encoder.blocks.{block}.{key}" for block in range(2) for key in VIT_BLOCK_KEYS]
    + ["blip.visual_encoder.norm.weight", "blip.visual_encoder.norm.bias"]
    + ["blip.text_encoder.embeddings.word_embeddings.weight", "blip.text_encoder.embeddings.position_embeddings.weight",
       "blip.text_encoder.embeddings.LayerNorm.weight", "blip.text_encoder.embeddings.LayerNorm.bias"]
    + [f"blip.text_encoder.encoder.layer.{layer}.{key}" for layer in range(2) for key in BERT_LAYER_KEYS]
    + [f"mlp.layers.{index}.{kind}" for index in (0, 2, 4, 6, 7) for kind in ("weight", "bias")]
)
# Saved by the release but never used for the reward.
UNUSED_ENTRIES = {
    "blip.vision_proj.weight": torch.zeros(8, 48),
    "blip.vision_proj.bias": torch.zeros(8),
    "blip.text_proj.weight": torch.zeros(8, 32),
    "blip.text_proj.bias": torch.zeros(8),
    "blip.text_encoder.embeddings.position_ids": torch.arange(40)[None],
}


def write_vocab(folder):
    folder.mkdir(exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return folder


def write_folder(folder, state_dict):
    """A folder laid out like the release plus a tokenizer: ImageReward.pt, med_config.json, vocab.txt."""
    write_vocab(folder)
    torch.save(state_dict, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(MED_CONFIG))
    return folder


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny random checkpoint with the release's layout (unused entries included), and its folder."""
    folder = write_vocab(tmp_path_factory.mktemp("image_reward"))
    model = ImageReward(MED_CONFIG, VISION, BertTokenizer.from_pretrained(str(folder)))
    generator = torch.Generator().manual_seed(0)
    state_dict = {key: 0.3 * torch.randn(value.shape, generator=generator) for key, value in model.state_dict().items()}
    write_folder(folder, state_dict | UNUSED_ENTRIES)
    return folder, state_dict


@pytest.fixture
def model(released):
    folder, _ = released
    return ImageReward.from_pretrained(str(folder), tokenizer_path=str(folder))


def images(count, height=32, width=32, seed=1):
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_state_dict_has_the_released_key_names(released, model):
    folder, state_dict = released
    assert sorted(state_dict) == sorted(RELEASED_KEYS)
    assert sorted(model.state_dict()) == sorted(RELEASED_KEYS)
    saved = torch.load(folder / "ImageReward.pt", weights_only=True)
    assert all(torch.equal(model.state_dict()[key], saved[key]) for key in RELEASED_KEYS)
    # cross-attention keys and values read the ViT width (48), not med_config's encoder_width
    assert saved["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape == (32, 48)


def test_vision_sizes_are_read_off_the_checkpoint(released):
    _, state_dict = released
    assert VisionSizes.from_state_dict(state_dict) == VISION
    vit_large = {  # shapes of the release's ViT-L/16 at 224 px
        "blip.visual_encoder.patch_embed.proj.weight": torch.empty(1024, 3, 16, 16, device="meta"),
        "blip.visual_encoder.pos_embed": torch.empty(1, 197, 1024, device="meta"),
        "blip.visual_encoder.blocks.0.mlp.fc1.weight": torch.empty(4096, 1024, device="meta"),
    } | {f"blip.visual_encoder.blocks.{block}.norm1.weight": torch.empty(1024, device="meta") for block in range(24)}
    sizes = VisionSizes.from_state_dict(vit_large)
    assert sizes == VisionSizes(width=1024, depth=24, patch_size=16, image_size=224, mlp_width=4096)
    assert sizes.heads == 16


def test_scores_are_finite_deterministic_and_depend_on_prompt_and_image(model):
    pictures = images(3)
    rewards = model.score(PROMPTS, pictures)
    assert rewards.shape == (3,) and torch.isfinite(rewards).all()
    assert torch.equal(rewards, model.score(PROMPTS, pictures))
    same_image = model.score(PROMPTS, pictures[:1].expand(3, -1, -1, -1))
    assert len(set(same_image.tolist())) == 3
    same_prompt = model.score(PROMPTS[:1] * 3, pictures)
    assert len(set(same_prompt.tolist())) == 3
    one_by_one = torch.cat([model.score([prompt], picture[None]) for prompt, picture in zip(PROMPTS, pictures)])
    torch.testing.assert_close(rewards, one_by_one)


def test_padding_tokens_do_not_change_the_score(model):
    rewards = model.score(PROMPTS, images(3))
    with torch.no_grad():
        model.blip.text_encoder.embeddings.word_embeddings.weight[0] += 5.0  # [PAD]
    torch.testing.assert_close(model.score(PROMPTS, images(3)), rewards, rtol=0, atol=0)


VIT_NAMES_IN_TRANSFORMERS = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                             "patch_embed.proj": "embeddings.patch_embedding", "blocks.": "encoder.layers.",
                             "norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                             "attn.proj": "self_attn.projection"}


def vit_key_in_transformers(key):
    key = key.removeprefix("blip.visual_encoder.")
    if key.startswith("norm."):
        return key.replace("norm.", "post_layernorm.")
    for name, name_in_transformers in VIT_NAMES_IN_TRANSFORMERS.items():
        key = key.replace(name, name_in_transformers)
    return key


def released_tokens():
    """bert-base-uncased's word pieces as ImageReward.py asks for them: [CLS] ... [SEP], cut and padded to 35."""
    rows = [["[CLS]", *pieces[:33], "[SEP]"] for pieces in WORD_PIECES]
    input_ids = torch.tensor([[VOCAB.index(token) for token in row] + [0] * (35 - len(row)) for row in rows])
    return input_ids, (input_ids != VOCAB.index("[PAD]")).long()


def reference_rewards(state_dict, pixels):
    """ImageReward recomputed with transformers' BLIP modules (the same BLIP ViT and med BERT) and a plain MLP."""
    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=1, image_size=32,
        patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu"))
    vision.load_state_dict({vit_key_in_transformers(key): value for key, value in state_dict.items()
                            if key.startswith("blip.visual_encoder.")})
    text = BlipTextModel(BlipTextConfig(
        vocab_size=48, hidden_size=32, encoder_hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=40, layer_norm_eps=1e-12, hidden_act="gelu",
        is_decoder=True, bos_token_id=None, eos_token_id=None, sep_token_id=None), add_pooling_layer=False)
    text.load_state_dict({key.removeprefix("blip.text_encoder."): value for key, value in state_dict.items()
                          if key.startswith("blip.text_encoder.")})
    input_ids, attention_mask = released_tokens()
    with torch.no_grad():
        image_tokens = vision.eval()(pixel_values=pixels).last_hidden_state
        features = text.eval()(input_ids=input_ids, attention_mask=attention_mask,
                               encoder_hidden_states=image_tokens,
                               encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long),
                               is_decoder=False).last_hidden_state[:, 0]
    return released_head(state_dict, features)


def released_head(state_dict, cls_features):
    """ImageReward.py: ``(mlp(cls) - mean) / std``, the MLP's linear layers at indices 0, 2, 4, 6, 7, no activation."""
    rewards = cls_features
    for index in (0, 2, 4, 6, 7):
        rewards = rewards @ state_dict[f"mlp.layers.{index}.weight"].T + state_dict[f"mlp.layers.{index}.bias"]
    return (rewards.squeeze(1) - 0.16717362830052426) / 1.0333394966054072


def test_score_matches_an_independent_recomputation(released, model):
    _, state_dict = released
    pictures = images(3)  # already at the model's 32 px: preprocessing is the normalisation only
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    expected = reference_rewards(state_dict, (pictures - mean) / std)
    torch.testing.assert_close(model.score(PROMPTS, pictures), expected, rtol=1e-5, atol=1e-5)


def test_reward_is_the_released_head_and_normalisation_of_the_cls_state(released, model):
    _, state_dict = released
    cls_states = []
    hook = model.mlp.register_forward_pre_hook(lambda module, args: cls_states.append(args[0]))
    rewards = model.score(PROMPTS, images(3))
    hook.remove()
    torch.testing.assert_close(rewards, released_head(state_dict, cls_states[0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("height, width", [(48, 70), (70, 48), (20, 26)])
def test_preprocessing_matches_the_released_pil_transform(model, height, width):
    transforms = pytest.importorskip("torchvision.transforms")
    from PIL import Image

    pixels_8bit = (images(1, height, width) * 255).round().to(torch.uint8)[0]
    released_transform = transforms.Compose([
        transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(32),
        transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])
    expected = released_transform(Image.fromarray(pixels_8bit.permute(1, 2, 0).numpy()))
    seen = []
    hook = model.blip.visual_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model.score(PROMPTS[:1], pixels_8bit[None] / 255)
    hook.remove()
    # PIL rounds each pass to 8 bits: about one level apart at most, 1/255/0.26 = 0.015 after normalisation
    torch.testing.assert_close(seen[0][0], expected, rtol=0, atol=0.02)


def test_missing_weights_name_the_missing_file(released, tmp_path):
    folder, state_dict = released
    with pytest.raises(MissingWeightsError, match="absent"):
        ImageReward.from_pretrained(str(tmp_path / "absent"), tokenizer_path=str(folder))
    with pytest.raises(MissingWeightsError, match="absent"):
        ImageReward.from_pretrained(str(folder), tokenizer_path=str(tmp_path / "absent"))
    write_folder(tmp_path / "no_checkpoint", state_dict).joinpath("ImageReward.pt").unlink()
    with pytest.raises(MissingWeightsError, match="ImageReward.pt"):
        ImageReward.from_pretrained(str(tmp_path / "no_checkpoint"), tokenizer_path=str(folder))
    write_folder(tmp_path / "no_config", state_dict).joinpath("med_config.json").unlink()
    with pytest.raises(MissingWeightsError, match="med_config.json"):
        ImageReward.from_pretrained(str(tmp_path / "no_config"), tokenizer_path=str(folder))


def test_a_checkpoint_with_other_keys_is_refused(released, tmp_path):
    folder, state_dict = released
    extra = "blip.text_encoder.embeddings.token_type_embeddings.weight"  # transformers' BertModel has it, med has not
    write_folder(tmp_path / "extra", state_dict | {extra: torch.zeros(2, 32)})
    with pytest.raises(ValueError, match=r"1 unexpected keys \['blip\.text_encoder\.embeddings\.token_type"):
        ImageReward.from_pretrained(str(tmp_path / "extra"), tokenizer_path=str(folder))
    renamed = {key.replace("mlp.layers.7.", "mlp.layers.8."): value for key, value in state_dict.items()}
    write_folder(tmp_path / "renamed", renamed)
    with pytest.raises(ValueError, match=r"2 missing keys \['mlp\.layers\.7\.bias', 'mlp\.layers\.7\.weight'\]"):
        ImageReward.from_pretrained(str(tmp_path / "renamed"), tokenizer_path=str(folder))
