import math

import pytest
import torch

from ditcache import scores as S
from ditcache.kernels import attention_score


def explicit_map(query, key, scale, bias=None):
    logits = query @ key.transpose(-1, -2) * scale
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1)


@pytest.mark.parametrize("budget", [attention_score.SCORE_BLOCK_BYTES, 2 * 3 * 40 * 4 * 7])  # one block / 7-query blocks
def test_attention_received_matches_the_explicit_map(monkeypatch, budget):
    monkeypatch.setattr(attention_score, "SCORE_BLOCK_BYTES", budget)
    torch.manual_seed(0)
    query, key = torch.randn(2, 3, 40, 8), torch.randn(2, 3, 40, 8)
    expected = explicit_map(query, key, 8**-0.5).mean(1).sum(1)
    torch.testing.assert_close(S.attention_received(query, key, 8**-0.5), expected)


def test_cross_attention_entropy_matches_the_explicit_map_with_mask():
    torch.manual_seed(1)
    query, key = torch.randn(2, 4, 30, 8), torch.randn(2, 4, 6, 8)
    bias = torch.zeros(2, 1, 1, 6)
    bias[1, ..., 4:] = -10000.0
    probs = explicit_map(query, key, 8**-0.5, bias).mean(1)
    expected = 1 - (probs * torch.log(probs + 1e-7)).sum(-1)
    torch.testing.assert_close(S.cross_attention_entropy(query, key, 8**-0.5, bias), expected)
    # masked text tokens carry no attention: uniform attention over 4 tokens has entropy log 4
    flat = S.cross_attention_entropy(torch.zeros(1, 1, 2, 8), torch.randn(1, 1, 6, 8), 1.0, bias[1:])
    torch.testing.assert_close(flat, torch.full((1, 2), 1 + math.log(4)), atol=1e-5, rtol=0)


def test_projection_norm_is_mean_over_heads_of_token_norms():
    projection = torch.zeros(1, 2, 3, 4)
    projection[0, 0, :, 0] = torch.tensor([3.0, 0.0, 1.0])
    projection[0, 1, :, 1] = torch.tensor([1.0, 2.0, 1.0])
    torch.testing.assert_close(S.projection_norm(projection), torch.tensor([[2.0, 1.0, 1.0]]))


def test_random_scores_are_seeded():
    first = S.random_scores(2, 10, torch.Generator().manual_seed(3))
    assert torch.equal(first, S.random_scores(2, 10, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, S.random_scores(2, 10, torch.Generator().manual_seed(4)))


def test_guidance_halves_share_one_score_row():
    scores = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, 2.0], [0.0, 1.0]])
    torch.testing.assert_close(S.merge_guidance_halves(scores), torch.tensor([[2.0, 1.0], [1.0, 1.0]]))


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (5, 2)])
def test_spatial_bonus_boosts_one_best_token_per_cell(grid):
    height, width = grid
    torch.manual_seed(2)
    scores = torch.rand(2, height * width)
    boosted = S.spatial_bonus(scores, grid, cell=2, bonus=0.5)
    gained = (boosted - scores) > 0
    for b in range(2):
        grid_scores = scores[b].view(height, width)
        for top in range(0, height, 2):
            for left in range(0, width, 2):
                cell = grid_scores[top : top + 2, left : left + 2]
                winners = gained[b].view(height, width)[top : top + 2, left : left + 2]
                assert winners.sum() == 1 and cell[winners].item() == cell.max().item()
        # the published rule: the winner's score times (1 + bonus), not a share of the global maximum
        torch.testing.assert_close(boosted[b][gained[b]], 1.5 * scores[b][gained[b]])


def test_spatial_bonus_scales_each_cell_by_its_own_maximum():
    scores = torch.tensor([[1.0, 0.1, 0.2, 0.3]])  # one row, cells of 2 tokens: [1.0, 0.1] and [0.2, 0.3]
    boosted = S.spatial_bonus(scores, (1, 4), cell=2, bonus=0.6)
    torch.testing.assert_close(boosted, torch.tensor([[1.6, 0.1, 0.2, 0.48]]))


def test_top_tokens_and_normalisation():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    assert set(S.top_tokens(scores, 2)[0].tolist()) == {1, 3}
    torch.testing.assert_close(S.l2_normalize(scores).norm(dim=-1), torch.ones(1))


@pytest.mark.parametrize("score", [score for score in S.SCORES if score not in S.MEASURED_SCORES])
def test_each_score_reads_only_the_projections_it_declares(score):
    """Adapters capture the taps ``SCORES`` names; the score must need nothing else, and cost what it reads."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"query": (2, 3, 10, 8), "key": (2, 3, 10, 8), "value": (2, 3, 10, 8), "cross_query": (2, 3, 10, 8), "cross_key": (2, 3, 6, 8)}
    projections = {name: torch.randn(shapes[name], generator=generator) for name in S.SCORES[score]}
    value, flops = S.token_scores(score, projections, scale=0.3, generator=torch.Generator().manual_seed(1), shape=(2, 10))
    assert value.shape == (2, 10)
    expected = {
        "attention": lambda p: (S.attention_received(p["query"], p["key"], 0.3), 2 * 2 * 3 * 10 * 8 * 10),
        "cross_attention_entropy": lambda p: (S.cross_attention_entropy(p["cross_query"], p["cross_key"], 0.3), 2 * 2 * 3 * 10 * 8 * 6),
        "k_norm": lambda p: (S.projection_norm(p["key"]), 0),
        "v_norm": lambda p: (S.projection_norm(p["value"]), 0),
        "random": lambda p: (S.random_scores(2, 10, torch.Generator().manual_seed(1)), 0),
    }[score](projections)
    torch.testing.assert_close(value, expected[0])
    assert flops == expected[1]
