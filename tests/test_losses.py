"""The per-sample losses against hand computations (single process: world size 1)."""

import math

import pytest
import torch

from pipeline import losses as L
from pipeline.levels import token_similarity

SIM = torch.tensor([[0.9, 0.2, 0.5, -0.1],
                    [0.3, 0.1, 0.8, 0.4]])
TARGET = torch.tensor([0, 2])


def test_infonce_matches_hand_computation_with_masked_columns():
    neg = torch.tensor([[False, True, False, True],   # column 2 masked (e.g. same video)
                        [True, True, False, False]])  # column 3 masked (e.g. empty slot)
    loss, p = L.infonce(SIM, TARGET, neg, torch.tensor(10.0))
    row0 = -(9.0 - math.log(math.exp(9.0) + math.exp(2.0) + math.exp(-1.0)))
    row1 = -(8.0 - math.log(math.exp(8.0) + math.exp(3.0) + math.exp(1.0)))
    assert loss.tolist() == pytest.approx([row0, row1], abs=1e-6)
    assert p.tolist() == pytest.approx([math.exp(-row0), math.exp(-row1)], abs=1e-6)


def test_infonce_without_negatives_is_zero_and_target_never_counts_as_negative():
    neg = torch.ones(2, 4, dtype=torch.bool)  # target columns marked too: must be ignored as negatives
    loss, _ = L.infonce(SIM, TARGET, neg, torch.tensor(1.0))
    row0 = -(0.9 - math.log(sum(math.exp(s) for s in SIM[0].tolist())))
    assert loss[0].item() == pytest.approx(row0, rel=1e-6)
    none, _ = L.infonce(SIM, TARGET, torch.zeros(2, 4, dtype=torch.bool), torch.tensor(1.0))
    assert none.tolist() == [0.0, 0.0]


def test_learnable_scale_gets_finite_grad_when_masked_columns_are_inf():
    sim = SIM.clone()
    sim[0, 3] = float("-inf")  # what the token similarity yields for an empty queue slot
    scale = torch.tensor(5.0, requires_grad=True)
    neg = torch.tensor([[False, True, True, False], [True, True, False, True]])
    loss, _ = L.infonce(sim, TARGET, neg, scale)
    loss.sum().backward()
    assert torch.isfinite(scale.grad)


def test_marginal_enhancement_upweights_only_negatives_within_margin():
    neg = torch.tensor([[False, True, True, True], [True, True, False, True]])
    loss, _ = L.infonce(SIM, TARGET, neg, torch.tensor(1.0), enhance_weight=1.0, margin=0.5)
    # row 0: s_pos 0.9, hard = s > 0.4 -> column 2 (0.5) counts twice
    row0 = -(0.9 - math.log(math.exp(0.9) + math.exp(0.2) + 2 * math.exp(0.5) + math.exp(-0.1)))
    assert loss[0].item() == pytest.approx(row0, rel=1e-6)


def test_hinge_uses_hardest_allowed_negative():
    neg = torch.tensor([[False, True, True, True], [True, True, False, False]])
    out = L.hinge(SIM, TARGET, neg, margin=0.2)
    # row 0: hardest 0.5 -> 0.2 - 0.9 + 0.5 = -0.2 -> 0; row 1: hardest 0.3 -> 0.2 - 0.8 + 0.3 < 0 -> 0
    assert out.tolist() == pytest.approx([0.0, 0.0])
    out = L.hinge(SIM, TARGET, neg, margin=0.6)
    assert out.tolist() == pytest.approx([0.2, 0.1], abs=1e-6)
    assert L.hinge(SIM, TARGET, torch.zeros(2, 4, dtype=torch.bool), 0.2).tolist() == [0.0, 0.0]


def test_global_mean_ignores_padded_samples():
    per = torch.tensor([1.0, 3.0, 100.0])
    valid = torch.tensor([True, True, False])
    assert L.global_mean(per, valid, L.global_count(valid)).item() == pytest.approx(2.0)
    per_nan = torch.tensor([1.0, 3.0, float("nan")])
    assert L.global_mean(per_nan, valid, L.global_count(valid)).item() == pytest.approx(2.0)


def test_denoise_weights_average_one_over_valid_and_follow_p():
    p = torch.tensor([0.8, 0.2, 0.5, 0.9])
    valid = torch.tensor([True, True, True, False])
    w = L.denoise_weights(p, valid, L.global_count(valid), gamma=1.0)
    assert w[:3].mean().item() == pytest.approx(1.0)
    assert w[0] > w[2] > w[1]


def test_token_similarity_is_wti_by_hand():
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])  # 1 caption, 3 words (last padded)
    mask = torch.tensor([[True, True, False]])
    v = torch.tensor([[[1.0, 0.0], [0.8, 0.6]]])  # 1 video, 2 frames
    # word->best frame: w0 1.0, w1 0.6 -> mean 0.8; frame->best valid word: f0 1.0, f1 0.8 -> 0.9
    assert token_similarity(t, mask, v).item() == pytest.approx(0.85)
    # blocked computation over many videos gives the same numbers
    vs = torch.randn(7, 2, 2)
    full = token_similarity(t, mask, vs)
    assert torch.allclose(full, token_similarity(t, mask, vs, max_elements=6))
