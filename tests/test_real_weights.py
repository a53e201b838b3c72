"""The metrics with their real weights. Each test runs where its weights are on the machine (see
`ditcache eval check`) and is skipped, saying which, where they are not."""

import pytest
import torch

from ditcache.eval import weights


def requires(name: str):
    return pytest.mark.skipif(weights.find_weights(name) is None, reason=f"{name} weights not on this machine (ditcache eval check)")


def squares(colors: list[tuple[float, float, float]], size: int = 224) -> torch.Tensor:
    """A coloured square on white per colour."""
    images = torch.ones(len(colors), 3, size, size)
    for image, color in zip(images, colors):
        image[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = torch.tensor(color)[:, None, None]
    return images


@requires("inception")
def test_inception_fid_of_a_set_against_itself():
    from ditcache.eval.metrics import feature_distances

    images = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert feature_distances(images, images, kid_subset_size=4)["fid"] == pytest.approx(0.0, abs=1e-2)


@requires("lpips-alexnet")
def test_lpips_with_alexnet():
    from ditcache.eval.metrics import LPIPS

    lpips, images = LPIPS(), squares([(1, 0, 0), (0, 0, 1)], 64)
    assert torch.allclose(lpips(images, images), torch.zeros(2), atol=1e-6)
    assert (lpips(images, images.flip(0)) > 0.05).all()


@requires("clip-vit-large-patch14")
def test_clip_score_prefers_the_right_colour():
    from ditcache.eval.metrics import CLIPScorer

    scorer, images = CLIPScorer.from_pretrained(), squares([(1, 0, 0), (0, 0.6, 0)])
    right = scorer.cosines(images, ["a red square", "a green square"])
    wrong = scorer.cosines(images, ["a green square", "a red square"])
    assert (right > wrong).all() and (right > 0).all() and (right < 100).all()


@requires("image-reward")
@requires("bert-base-uncased")
def test_image_reward_loads_the_released_checkpoint_and_prefers_the_right_colour():
    from ditcache.eval.image_reward import ImageReward

    model, images = ImageReward.from_pretrained(), squares([(1, 0, 0), (0, 0.6, 0)])
    right = model.score(["a red square", "a green square"], images)
    wrong = model.score(["a green square", "a red square"], images)
    assert torch.isfinite(right).all() and right.sum() > wrong.sum()


@requires("dino-vitb16")
def test_subject_consistency_of_a_static_video_is_one():
    from ditcache.eval.vbench import SubjectConsistency

    video = squares([(1, 0, 0)], 64)[None].expand(1, 4, 3, 64, 64)
    assert SubjectConsistency()(video).item() == pytest.approx(1.0, abs=1e-3)


@requires("clip-vit-base-patch32")
def test_background_consistency_of_a_static_video_is_one():
    from ditcache.eval.vbench import BackgroundConsistency

    video = squares([(0, 0, 1)], 64)[None].expand(1, 4, 3, 64, 64)
    assert BackgroundConsistency()(video).item() == pytest.approx(1.0, abs=1e-3)
