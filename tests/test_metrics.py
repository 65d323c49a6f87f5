"""hiervl.eval.metrics against independent references: CLIP4Clip's compute_metrics (tie-free),
brute-force pessimistic ranks (ties), blocked == unblocked, multi-caption and DSL by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hiervl.eval.metrics import (
    blocked_ranks,
    dual_softmax,
    metrics_from_ranks,
    multi_caption_metrics,
    retrieval_metrics,
)


def clip4clip_compute_metrics(x: np.ndarray) -> dict:
    """CLIP4Clip's `compute_metrics` (metrics.py), rewritten here as the independent reference."""
    sx = np.sort(-x, axis=1)
    d = np.diag(-x)[:, np.newaxis]
    ind = np.where(sx - d == 0)[1]
    return {"R1": float(np.sum(ind == 0)) * 100 / len(ind), "R5": float(np.sum(ind < 5)) * 100 / len(ind),
            "R10": float(np.sum(ind < 10)) * 100 / len(ind), "MdR": np.median(ind) + 1, "MnR": np.mean(ind) + 1}


def brute_pessimistic_ranks(x: np.ndarray) -> np.ndarray:
    """Rank of the diagonal item when it is placed after every item with an equal score."""
    ranks = []
    for i in range(x.shape[0]):
        order = sorted(range(x.shape[1]), key=lambda j: (-x[i, j], j == i))
        ranks.append(order.index(i))
    return np.array(ranks)


def random_sim(n: int, m: int | None = None, seed: int = 0, signal: float = 1.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, m or n))
    x[np.arange(n), np.arange(n)] += signal  # a learnable-ish matrix: R@1 neither 0 nor 100
    return x


@pytest.mark.parametrize("n,m,block", [(200, 200, None), (150, 150, 7), (64, 300, 5), (1, 1, None)])
def test_tie_free_matches_clip4clip_reference(n, m, block):
    x = random_sim(n, m, seed=n + m)
    got = retrieval_metrics(x, block_rows=block)
    ref = clip4clip_compute_metrics(x)
    for key in ("R1", "R5", "R10", "MdR", "MnR"):
        assert got[key] == pytest.approx(ref[key]), key
    assert got["tied_queries"] == 0 and got["queries"] == n
    if n > 1:
        assert 0 < got["R1"] < 100  # the test matrix is not degenerate
        xt = x[:, :n].T  # video-to-text: videos as queries over the n captions
        gotT, refT = retrieval_metrics(xt), clip4clip_compute_metrics(xt)
        assert gotT["R1"] == pytest.approx(refT["R1"]) and gotT["MnR"] == pytest.approx(refT["MnR"])


def test_torch_and_numpy_inputs_agree():
    x = random_sim(80, seed=3).astype(np.float32)
    assert retrieval_metrics(x) == retrieval_metrics(torch.from_numpy(x))


def test_ties_are_pessimistic_and_counted():
    x = np.array([[0.5, 0.5, 0.5],   # gt tied with both others: rank 2
                  [0.9, 0.7, 0.7],   # gt tied with one other, one better: rank 2
                  [0.1, 0.2, 0.3]])  # clean top-1
    got = retrieval_metrics(x)
    assert got["R1"] == pytest.approx(100 / 3)
    assert got["MnR"] == pytest.approx((3 + 3 + 1) / 3)
    assert got["MdR"] == 3.0
    assert got["tied_queries"] == 2
    # the reference counts tied rows several times (its known bug): different denominator
    assert len(np.where(np.sort(-x, axis=1) - np.diag(-x)[:, None] == 0)[1]) == 6


def test_ties_random_match_brute_force():
    rng = np.random.default_rng(7)
    x = rng.integers(0, 4, size=(60, 60)).astype(np.float32)  # many ties
    ranks = brute_pessimistic_ranks(x)
    got = retrieval_metrics(x, block_rows=11)
    want = metrics_from_ranks(ranks)
    for key in ("R1", "R5", "R10", "MdR", "MnR"):
        assert got[key] == pytest.approx(want[key]), key
    tied = sum(int(np.sum(x[i] == x[i, i]) > 1) for i in range(60))
    assert got["tied_queries"] == tied > 0


@pytest.mark.parametrize("block", [1, 3, 16, 1000])
def test_blocked_equals_unblocked(block):
    rng = np.random.default_rng(block)
    x = rng.integers(0, 6, size=(40, 40)).astype(np.float64) + rng.standard_normal((40, 40)) * (rng.random((40, 40)) > 0.5)
    c2v = np.repeat(np.arange(20), 2)
    x = x[:, :20]
    assert retrieval_metrics(x[:20], block_rows=block) == retrieval_metrics(x[:20], block_rows=20)
    assert multi_caption_metrics(x, c2v, block_rows=block, dsl_scale=10.0) == \
        multi_caption_metrics(x, c2v, block_rows=40, dsl_scale=10.0)


def test_multi_caption_hand_made():
    # videos: 0 has captions 0,1; 1 has caption 2; 2 has captions 3,4,5
    c2v = np.array([0, 0, 1, 2, 2, 2])
    s = np.array([
        # v0    v1    v2
        [0.90, 0.10, 0.20],  # c0 -> v0 rank 0
        [0.30, 0.50, 0.40],  # c1 -> v0 rank 2
        [0.20, 0.60, 0.70],  # c2 -> v1 rank 1
        [0.10, 0.20, 0.80],  # c3 -> v2 rank 0
        [0.95, 0.10, 0.30],  # c4 -> v2 rank 1
        [0.40, 0.65, 0.35],  # c5 -> v2 rank 2
    ])
    got = multi_caption_metrics(s, c2v)
    t2v_ranks = np.array([0, 2, 1, 0, 1, 2])
    assert got["t2v"] == metrics_from_ranks(t2v_ranks)
    # v2t: v0's best own caption scores 0.90 (c0); other captions >= 0.90: c4 (0.95) -> rank 1
    #      v1's only caption c2 scores 0.60; others >= 0.60: c5 (0.65) -> rank 1
    #      v2's best own caption c3 scores 0.80; others >= 0.80: none -> rank 0
    assert got["v2t"] == metrics_from_ranks(np.array([1, 1, 0]))
    assert got["v2t"]["queries"] == 3 and got["t2v"]["queries"] == 6


def test_multi_caption_random_against_brute_force():
    rng = np.random.default_rng(11)
    nv = 25
    c2v = np.sort(rng.integers(0, nv, size=70))
    s = rng.integers(0, 8, size=(70, nv)).astype(np.float32)  # ties everywhere
    got = multi_caption_metrics(s, c2v, block_rows=9)
    t2v = [int(np.sum(s[c] >= s[c, c2v[c]]) - 1) for c in range(70)]
    v2t = []
    for v in sorted(set(c2v.tolist())):
        own = c2v == v
        v2t.append(min(int(np.sum(s[~own, v] >= s[c, v])) for c in np.where(own)[0]))
    assert got["t2v"] == {**metrics_from_ranks(np.array(t2v)), "tied_queries": got["t2v"]["tied_queries"]}
    assert {k: got["v2t"][k] for k in ("R1", "R5", "R10", "MdR", "MnR", "queries")} == \
        {k: metrics_from_ranks(np.array(v2t))[k] for k in ("R1", "R5", "R10", "MdR", "MnR", "queries")}
    # one caption per video reduces to the diagonal protocol in both directions
    x = random_sim(30, seed=5)
    single = multi_caption_metrics(x, np.arange(30))
    assert single["t2v"] == retrieval_metrics(x) and single["v2t"] == retrieval_metrics(x.T)


def test_dsl_direction_and_separate_rows():
    n = 20
    s = np.full((n, n), 0.1)
    s[np.arange(n), np.arange(n)] = 0.8
    s[:, 0] = 0.9  # video 0 is a hub: every caption's best match
    got = multi_caption_metrics(s, np.arange(n), dsl_scale=100.0)
    assert got["t2v"]["R1"] == pytest.approx(100 / n)  # plain numbers stay plain
    assert got["t2v_dsl"]["R1"] == pytest.approx(100.0)  # softmax over queries demotes the hub
    # the blocked DSL equals DSL applied to the whole matrix (queries on axis 0)
    x = random_sim(50, seed=9) * 0.1
    got = multi_caption_metrics(x, np.arange(50), dsl_scale=30.0, block_rows=7)
    assert got["t2v_dsl"] == retrieval_metrics(dual_softmax(x, scale=30.0))
    assert got["v2t_dsl"] == retrieval_metrics(dual_softmax(x.T, scale=30.0))
    assert got["t2v"] == retrieval_metrics(x)
    manual = x * np.exp(30 * x) / np.exp(30 * x).sum(axis=0, keepdims=True)
    np.testing.assert_allclose(dual_softmax(x, scale=30.0), manual, rtol=1e-10)


def test_nan_ground_truth_ranks_last():
    x = random_sim(10, seed=2)
    x[3, 3] = np.nan
    x[5, 0] = np.nan  # a NaN competitor never wins
    ref = retrieval_metrics(np.where(np.isnan(x), -np.inf, x))
    before = x.copy()
    got = retrieval_metrics(x)
    assert got == ref
    np.testing.assert_array_equal(x, before)  # the caller's matrix is never written (NaNs stay NaN)
    assert retrieval_metrics(x[3:4, :][:, [3] + list(range(3)) + list(range(4, 10))])["MnR"] == 10


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="diagonal"):
        retrieval_metrics(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="caption_to_video"):
        multi_caption_metrics(np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError, match="outside"):
        multi_caption_metrics(np.zeros((2, 2)), [0, 2])


def test_nan_scores_with_dsl_rank_pessimistically():
    x = random_sim(12, seed=4) * 0.1
    x[2, 2] = np.nan  # caption 2's (and video 2's only) ground truth is unknown: worst rank both ways
    got = multi_caption_metrics(x, np.arange(12), dsl_scale=50.0)
    clean = np.where(np.isnan(x), -np.inf, x)
    assert got["t2v"] == retrieval_metrics(clean) and got["v2t"] == retrieval_metrics(clean.T)
    ranks = blocked_ranks(lambda i, j: {"s": torch.from_numpy(x[i:j].copy())}, 12, 12, np.arange(12), 5,
                          dsl_scale=50.0)["s"]
    for direction in ("t2v", "v2t", "t2v_dsl", "v2t_dsl"):
        assert ranks[direction].ranks[2] == 11, direction  # last, never an optimistic NaN comparison


# ---------------------------------------------------------------------------- diagnostics


def test_order_sensitivity_hand_made():
    from hiervl.eval.metrics import order_sensitivity

    fwd = np.array([0.9, 0.5, 0.3, 0.7, 0.2])
    back = np.array([0.1, 0.5, 0.4, np.nan, 0.1])
    # wins: 0.9>0.1 yes, 0.5=0.5 tie (fails), 0.3<0.4 no, NaN fails, 0.2>0.1 yes -> 2 of 5
    assert order_sensitivity(fwd, back) == {"order": 40.0, "queries": 5, "ties": 1}
    # an exactly order-blind model ties every pair: 0%, every caption a tie (never mistaken for 100)
    assert order_sensitivity(fwd[:3], fwd[:3]) == {"order": 0.0, "queries": 3, "ties": 3}
    assert order_sensitivity([1.0, 2.0], [0.0, 1.0])["order"] == 100.0
    assert order_sensitivity(torch.tensor([0.3, 0.1, 0.2, 0.9]), torch.tensor([0.2, 0.2, 0.2, 0.8]))["order"] == 50.0
    with pytest.raises(ValueError, match="one length"):
        order_sensitivity([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        order_sensitivity([], [])


# videos 0,1,2 in g0; 3,4 in g1; 5 in no group. Captions -> videos:
GROUP_C2V = np.array([0, 1, 3, 4, 5, 2])
GROUP_OF_VIDEO = ["g0", "g0", "g0", "g1", "g1", None]
GROUP_SIM = np.array([
    # v0   v1   v2   v3   v4   v5
    [0.9, 0.8, 0.1, 0.2, 0.3, 0.0],  # c0 (v0): top v0 -> group hit; own 0.9 > siblings -> sibling hit
    [0.9, 0.8, 0.1, 0.2, 0.3, 0.0],  # c1 (v1): top v0 in g0 -> group hit; own 0.8 < v0 0.9 -> miss
    [0.5, 0.1, 0.1, 0.5, 0.4, 0.2],  # c2 (v3): in-group 0.5 TIES v0 0.5 -> group miss; own 0.5 > v4 -> hit
    [0.1, 0.1, 0.1, 0.6, 0.6, 0.9],  # c3 (v4): ungrouped v5 on top -> miss; own 0.6 TIES v3 -> miss
    [0.9, 0.9, 0.9, 0.9, 0.9, 0.1],  # c4 (v5): no group, not counted
    [0.2, 0.2, 0.7, 0.1, 0.1, 0.1],  # c5 (v2): group hit, sibling hit
])


@pytest.mark.parametrize("block", [1, 2, 100])
def test_group_and_sibling_r1_hand_made_with_pessimistic_ties(block):
    from hiervl.eval.metrics import group_metrics

    got = group_metrics(GROUP_SIM, GROUP_C2V, GROUP_OF_VIDEO, block_rows=block)
    assert got["queries"] == 5 and got["groups"] == 2
    assert got["group_R1"] == pytest.approx(60.0)  # c0, c1, c5 of 5
    assert got["sibling_R1"] == pytest.approx(60.0)  # c0, c2, c5 of 5
    # chance: group size / 6 videos -> (3/6 * 3 + 2/6 * 2) / 5; 1 / group size -> (1/3 * 3 + 1/2 * 2) / 5
    assert got["chance"]["group_R1"] == pytest.approx(100 * (1.5 + 2 / 3) / 5)
    assert got["chance"]["sibling_R1"] == pytest.approx(40.0)


def test_group_metrics_nan_ungrouped_and_integer_codes():
    from hiervl.eval.metrics import group_metrics

    x = GROUP_SIM.copy()
    x[0, 0] = np.nan  # c0's own score unknown: both hits fail (NaN = -inf)
    before = x.copy()
    got = group_metrics(x, GROUP_C2V, GROUP_OF_VIDEO)
    np.testing.assert_array_equal(x, before)  # the caller's matrix is never written
    assert got["sibling_R1"] == pytest.approx(40.0)  # c2, c5
    assert got["group_R1"] == pytest.approx(60.0)  # c0's top is then v1 (0.8), still its group
    assert group_metrics(GROUP_SIM, GROUP_C2V, [None] * 6) is None  # no group anywhere
    codes = np.array([7, 7, 7, 2, 2, -1])  # integer group ids, negative = none
    assert group_metrics(GROUP_SIM, GROUP_C2V, codes) == group_metrics(GROUP_SIM, GROUP_C2V, GROUP_OF_VIDEO)


def test_group_metrics_match_argmax_on_tie_free_scores():
    """Without ties the pessimistic counts equal the plain argmax definitions."""
    from hiervl.eval.metrics import group_metrics

    rng = np.random.default_rng(3)
    nv, nc = 40, 120
    groups = np.arange(nv) // 4
    c2v = rng.integers(0, nv, size=nc)
    sim = rng.standard_normal((nc, nv))
    sim[np.arange(nc), c2v] += 1.0
    sim[np.arange(nc), (c2v // 4) * 4] += 0.8  # group structure: R@1s neither 0 nor 100
    got = group_metrics(sim, c2v, [f"g{g}" for g in groups], block_rows=7)
    top = sim.argmax(axis=1)
    same = groups[None, :] == groups[c2v][:, None]
    in_group = np.where(same, sim, -np.inf).argmax(axis=1)
    assert got["group_R1"] == pytest.approx(100 * np.mean(groups[top] == groups[c2v]))
    assert got["sibling_R1"] == pytest.approx(100 * np.mean(in_group == c2v))
    assert 0 < got["sibling_R1"] < 100 and 0 < got["group_R1"] < 100
    assert got["chance"] == {"group_R1": pytest.approx(10.0), "sibling_R1": pytest.approx(25.0)}
