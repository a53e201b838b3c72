import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

from ditcache.eval import vbench as V
from ditcache.eval.weights import MissingWeightsError


def vbench_consistency(features: torch.Tensor) -> float:
    """VBench's per-video loop, written out: one frame at a time, Python floats."""
    total, first, previous = 0.0, None, None
    for feature in features:
        feature = F.normalize(feature[None], dim=-1, p=2)
        if first is None:
            first = feature
        else:
            to_previous = max(0.0, F.cosine_similarity(previous, feature).item())
            to_first = max(0.0, F.cosine_similarity(first, feature).item())
            total += (to_previous + to_first) / 2
        previous = feature
    return total / (len(features) - 1)


def random_videos(count, frames, height, width, seed=0):
    return torch.rand(count, frames, 3, height, width, generator=torch.Generator().manual_seed(seed))


def static_video(frames, height, width, seed=0):
    return random_videos(1, 1, height, width, seed).expand(1, frames, 3, height, width)


# -- temporal flickering --------------------------------------------------------------------------
def test_temporal_flickering_of_a_still_video_is_one():
    assert V.temporal_flickering(static_video(5, 8, 12)).tolist() == [1.0]


def test_temporal_flickering_is_one_minus_the_mean_frame_difference_over_255():
    videos = torch.zeros(2, 3, 3, 4, 6, dtype=torch.uint8)
    videos[0, 1], videos[0, 2] = 10, 40  # pairs differ by 10 and 30 everywhere: MAE 20
    videos[1, 1, :, :, :2] = 255  # first pair: a third of the pixels jump by 255 (MAE 85); second pair: back (85)
    expected = torch.tensor([(255 - 20) / 255, (255 - 85) / 255], dtype=torch.float64)
    torch.testing.assert_close(V.temporal_flickering(videos), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(V.temporal_flickering(videos.float() / 255), expected, rtol=0, atol=1e-12)


def test_float_videos_are_rounded_to_uint8_like_saved_frames():
    video = torch.zeros(1, 2, 3, 2, 2)
    video[0, 1] = 0.6 / 255  # rounds to 1: MAE 1
    torch.testing.assert_close(V.temporal_flickering(video), torch.tensor([254 / 255], dtype=torch.float64))


@pytest.mark.parametrize("shape", [(2, 1, 3, 4, 4), (2, 3, 4, 4), (2, 3, 1, 4, 4)])
def test_videos_must_be_n_t_3_h_w_with_two_frames(shape):
    with pytest.raises(ValueError):
        V.temporal_flickering(torch.zeros(shape))


# -- the consistency formula ----------------------------------------------------------------------
def test_consistency_averages_similarity_to_previous_and_first_frame_clamped_at_zero():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    opposite = torch.stack([e1, -e1, e2])  # frame 1: -1 and -1, clamped; frame 2: 0 and 0
    assert V._first_and_previous_similarity(opposite).item() == 0.0
    turning = torch.stack([3 * e1, e1, e1 + e2])  # frame 1: 1 and 1; frame 2: cos 45° to both
    expected = (1 + math.cos(math.pi / 4)) / 2
    assert V._first_and_previous_similarity(turning).item() == pytest.approx(expected, abs=1e-7)
    features = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    assert V._first_and_previous_similarity(features).item() == pytest.approx(vbench_consistency(features), abs=1e-6)


# -- preprocessing, against torchvision's transforms as VBench composes them ----------------------
@pytest.mark.parametrize("size", [(37, 53), (53, 37), (224, 224), (224, 225), (240, 300), (30, 30), (30, 31)])
def test_preprocessing_matches_vbench_torchvision_transforms(size):
    transforms = pytest.importorskip("torchvision.transforms")
    InterpolationMode = transforms.InterpolationMode
    to_unit = transforms.Lambda(lambda x: x.float().div(255.0))
    dino = transforms.Compose(
        [transforms.Resize(224, antialias=False), to_unit, transforms.Normalize(V.IMAGENET_MEAN, V.IMAGENET_STD)]
    )
    clip = transforms.Compose(
        [
            transforms.Resize(224, interpolation=InterpolationMode.BICUBIC, antialias=False),
            transforms.CenterCrop(224),
            to_unit,
            transforms.Normalize(V.CLIP_MEAN, V.CLIP_STD),
        ]
    )
    frames = V._uint8_videos(random_videos(1, 2, *size))[0]
    assert torch.equal(V.dino_pixels(frames), dino(frames))
    assert torch.equal(V.clip_pixels(frames), clip(frames))


# -- DINO ------------------------------------------------------------------------------------------
def test_dino_keeps_square_position_embeddings_and_resamples_others_by_patches_plus_a_tenth():
    embeddings = torch.randn(1, 1 + 14 * 14, 8, generator=torch.Generator().manual_seed(0))
    assert V.dino_position_embeddings(embeddings, 16, 224, 224) is embeddings
    resampled = V.dino_position_embeddings(embeddings, 16, 224, 336)  # 14 x 21 patches
    grid = embeddings[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, scale_factor=(14.1 / 14, 21.1 / 14), mode="bicubic")
    assert resampled.shape == (1, 1 + 14 * 21, 8)
    assert torch.equal(resampled[:, 0], embeddings[:, 0])
    torch.testing.assert_close(resampled[0, 1:].reshape(14, 21, 8), expected[0].permute(1, 2, 0))
    # transformers resamples to the target size instead: a different grid
    to_size = F.interpolate(grid, size=(14, 21), mode="bicubic", align_corners=False)
    assert not torch.allclose(expected, to_size, atol=1e-3)


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=224)
    folder = tmp_path_factory.mktemp("dino")
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def subject_consistency(dino_folder):
    return V.SubjectConsistency(dino_folder, device="cpu")


def test_dino_loader_drops_the_pooler_and_uses_dino_layer_norm_epsilon(subject_consistency):
    model = subject_consistency.model
    assert model.pooler is None and model.layernorm.eps == V.DINO_LAYER_NORM_EPS and not model.training


def test_subject_consistency_of_a_still_video_is_one(subject_consistency):
    scores = subject_consistency(static_video(4, 24, 40))
    torch.testing.assert_close(scores, torch.ones(1, dtype=torch.float64), rtol=0, atol=1e-6)


def test_subject_consistency_matches_vbench_loop_on_features(subject_consistency):
    videos = random_videos(3, 4, 40, 40)  # square: DINO and transformers both keep the position embeddings
    model = subject_consistency.model
    expected = []
    for frames in V._uint8_videos(videos):
        pixels = V.dino_pixels(frames)
        with torch.no_grad():  # one frame at a time, the CLS token after the final norm, as VBench
            features = torch.cat([model(pixel_values=pixel[None]).last_hidden_state[:, 0] for pixel in pixels])
        expected.append(vbench_consistency(features))
    scores = subject_consistency(videos)
    assert scores.shape == (3,) and scores.dtype == torch.float64
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-5)
    assert ((scores >= 0) & (scores <= 1)).all() and (scores < 1 - 1e-6).all()


def test_subject_consistency_uses_dino_position_embeddings_on_wide_frames(subject_consistency):
    model = subject_consistency.model
    frames = V._uint8_videos(random_videos(1, 2, 24, 40))[0]  # resized to 224 x 373: 14 x 23 patches
    features = subject_consistency.features(frames)
    assert "interpolate_pos_encoding" not in vars(model.embeddings)  # the model is left as it was
    with torch.no_grad():
        transformers_features = model(pixel_values=V.dino_pixels(frames), interpolate_pos_encoding=True)
    assert features.shape == (2, 32)
    assert not torch.allclose(features, transformers_features.last_hidden_state[:, 0], atol=1e-4)
    scores = subject_consistency(random_videos(2, 3, 24, 40))
    assert ((scores >= 0) & (scores <= 1)).all()


# -- CLIP ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_model_and_folder(tmp_path_factory):
    """A tiny full CLIP checkpoint, laid out like openai/clip-vit-base-patch32."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=99),
        vision_config=dict(tower, image_size=224, patch_size=32),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def background_consistency(clip_model_and_folder):
    return V.BackgroundConsistency(clip_model_and_folder[1], device="cpu")


def test_clip_loader_keeps_only_the_float32_image_tower_on_cpu(background_consistency):
    from transformers import CLIPVisionModelWithProjection

    model = background_consistency.model
    assert isinstance(model, CLIPVisionModelWithProjection) and model.dtype == torch.float32
    assert model.visual_projection.out_features == 16


def test_background_consistency_of_a_still_video_is_one(background_consistency):
    scores = background_consistency(static_video(4, 30, 50))
    torch.testing.assert_close(scores, torch.ones(1, dtype=torch.float64), rtol=0, atol=1e-6)


def test_background_consistency_matches_vbench_loop_on_clip_model_features(
    clip_model_and_folder, background_consistency
):
    clip_model = clip_model_and_folder[0]
    videos = random_videos(3, 5, 30, 50, seed=1)
    expected = []
    for frames in V._uint8_videos(videos):
        with torch.no_grad():
            output = clip_model.get_image_features(pixel_values=V.clip_pixels(frames))
        features = output if isinstance(output, torch.Tensor) else output.pooler_output
        expected.append(vbench_consistency(features))
    expected = torch.tensor(expected, dtype=torch.float64)
    scores = background_consistency(videos)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    assert ((scores >= 0) & (scores <= 1)).all() and (scores < 1 - 1e-6).all()
    # a full CLIPModel given directly scores the same
    torch.testing.assert_close(V.BackgroundConsistency(clip_model)(videos), expected, rtol=0, atol=1e-5)


def test_missing_weights_say_where_to_put_them(tmp_path):
    with pytest.raises(MissingWeightsError, match="dino-vitb16"):
        V.SubjectConsistency(tmp_path / "absent")
    with pytest.raises(MissingWeightsError, match="clip-vit-base-patch32"):
        V.BackgroundConsistency(tmp_path / "absent")


# -- the official VBench ---------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("vbench") is not None, reason="vbench is installed here")
def test_official_vbench_missing_raises_import_error_with_install_steps(tmp_path):
    with pytest.raises(ImportError, match="pip install vbench"):
        V.run_official_vbench(tmp_path, ["temporal_flickering"], tmp_path / "out")


def test_official_vbench_runs_custom_input_mode_and_reads_its_results(tmp_path, stand_in_vbench):
    """A stand-in vbench package with VBench's API records the call and writes VBench's results file."""
    stand_in_vbench(
        "import json, os\n"
        "class VBench:\n"
        "    def __init__(self, device, full_info_dir, output_path):\n"
        "        self.call = {'device': device, 'full_info_dir': full_info_dir}\n"
        "        self.output_path = output_path\n"
        "        os.makedirs(output_path, exist_ok=True)\n"
        "    def evaluate(self, videos_path, name, prompt_list=[], dimension_list=None, mode='vbench_standard'):\n"
        "        self.call.update(videos_path=videos_path, dimensions=dimension_list, mode=mode)\n"
        "        videos = [os.path.join(videos_path, 'a cat-0.mp4')]\n"
        "        results = {d: [0.5, [{'video_path': videos[0], 'video_results': 0.5}]] for d in dimension_list}\n"
        "        results['call'] = self.call\n"
        "        with open(os.path.join(self.output_path, name + '_eval_results.json'), 'w') as f:\n"
        "            json.dump(results, f)\n"
    )
    output = tmp_path / "out"
    scores = V.run_official_vbench(tmp_path / "videos", ["subject_consistency"], output, device="cpu", name="run")
    assert scores == {"subject_consistency": V.OfficialScore(0.5, {str(tmp_path / "videos" / "a cat-0.mp4"): 0.5})}
    call = json.loads((output / "run_eval_results.json").read_text())["call"]
    assert call["mode"] == "custom_input" and call["device"] == "cpu" and call["dimensions"] == ["subject_consistency"]
    assert call["videos_path"] == str(tmp_path / "videos") and call["full_info_dir"].endswith("VBench_full_info.json")


def test_official_vbench_rejects_dimensions_that_need_its_prompt_suite(tmp_path):
    with pytest.raises(ValueError, match="object_class"):
        V.run_official_vbench(tmp_path, ["object_class", "temporal_flickering"], tmp_path / "out")
