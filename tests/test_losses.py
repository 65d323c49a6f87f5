"""The per-sample losses against hand computations (single process: world size 1)."""

import math

import pytest
import torch
from hiervl.model import losses as L
from hiervl.model.levels import token_similarity

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


# ------------------------------------------------------------------ the objective, by hand (flat: one global level)

def _unit(*degrees):
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])  # [n, 2]


def _objective(recipe, extra=()):
    from pathlib import Path

    from hiervl.config import load_config
    from hiervl.model.objective import HierarchicalContrastiveLoss

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    cfg = load_config(tiny, ["model.preset=flat", "model.embed_dim=2", "queue.enabled=true", "queue.size=4",
                             f"queue.objective={recipe}", *extra])
    return HierarchicalContrastiveLoss(cfg)


def _lse(xs):
    return math.log(sum(math.exp(x) for x in xs))


V_DEG, T_DEG = (0, 90, 200), (10, 80, 180)  # three pairs; pair i is (V_DEG[i], T_DEG[i])
QUEUE_V, QUEUE_T = (45, 1), (135, 5)  # one queue entry per modality: (angle, video id)


def _symmetric_case():
    obj = _objective("symmetric")
    obj.queues["global_video"].push({"emb": _unit(QUEUE_V[0])}, torch.tensor([QUEUE_V[1]]))
    obj.queues["global_text"].push({"emb": _unit(QUEUE_T[0])}, torch.tensor([QUEUE_T[1]]))
    q_v = {"global": _unit(*V_DEG).requires_grad_(True)}
    q_t = {"global": _unit(*T_DEG).requires_grad_(True)}
    keys = {"global": torch.zeros(3, 2)}  # momentum keys: only enqueued in this recipe, never scored
    args = (q_v, q_t, keys, dict(keys), torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.bool),
            torch.tensor([math.log(10.0)]))
    return obj, q_v, q_t, args


def test_symmetric_loss_matches_hand_computation_with_queue_negatives_and_same_video_mask():
    obj, _, _, args = _symmetric_case()
    out = obj(*args, rank=0, world_size=1)
    cos = lambda a, b: math.cos(math.radians(a - b))  # noqa: E731
    rows = []
    for i in range(3):
        # video -> text: the three captions (own one the positive) and the queued caption (another video)
        v2t = [10 * cos(V_DEG[i], t) for t in T_DEG] + [10 * cos(V_DEG[i], QUEUE_T[0])]
        # text -> video: the three videos and the queued video, which is video 1's: masked in row 1
        t2v = [10 * cos(T_DEG[i], v) for v in V_DEG] + ([10 * cos(T_DEG[i], QUEUE_V[0])] if i != 1 else [])
        rows.append(0.5 * ((_lse(v2t) - v2t[i]) + (_lse(t2v) - t2v[i])))
    assert out["losses"]["global"].item() == pytest.approx(sum(rows) / 3, abs=1e-5)
    assert out["loss"].item() == pytest.approx(sum(rows) / 3, abs=1e-5)


def test_symmetric_gradient_is_balanced_queries_full_softmax_columns_in_batch_softmax():
    """d loss / d embeddings by hand: a query's gradient uses the softmax over batch + queue, a
    batch column's the softmax over the batch alone (so a column's pull and push weigh the same)."""
    obj, q_v, q_t, args = _symmetric_case()
    obj(*args, rank=0, world_size=1)["loss"].backward()
    v, t = q_v["global"].detach(), q_t["global"].detach()
    u, w = _unit(QUEUE_V[0]), _unit(QUEUE_T[0])
    s, eye = 10.0, torch.eye(3)
    # t2v rows: full softmax over [v0, v1, v2, u] (u masked in row 1), batch softmax over [v0, v1, v2]
    full_t2v = s * torch.cat([t @ v.T, t @ u.T], dim=1)
    full_t2v[1, 3] = float("-inf")
    p_t2v, pb_t2v = full_t2v.softmax(dim=1), (s * t @ v.T).softmax(dim=1)
    full_v2t = s * torch.cat([v @ t.T, v @ w.T], dim=1)
    p_v2t, pb_v2t = full_v2t.softmax(dim=1), (s * v @ t.T).softmax(dim=1)
    k = 0.5 / 3  # loss = mean over 3 samples of (v2t + t2v) / 2
    grad_t = k * s * ((p_t2v[:, :3] @ v + p_t2v[:, 3:] @ u - v)  # t as query (full row)
                      + (pb_v2t - eye).T @ v)  # t as a column of the v2t rows (batch only)
    grad_v = k * s * ((p_v2t[:, :3] @ t + p_v2t[:, 3:] @ w - t) + (pb_t2v - eye).T @ t)
    torch.testing.assert_close(q_t["global"].grad, grad_t, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(q_v["global"].grad, grad_v, atol=1e-5, rtol=1e-4)
    # each row pulls its positive column as hard as it pushes the other batch columns; through the
    # full row the push would be short by the queue's share (a net pull of all videos to each caption)
    assert torch.allclose((pb_t2v - eye).sum(dim=1), torch.zeros(3), atol=1e-6)
    assert (p_t2v[:, :3] - eye).sum(dim=1)[0] < -0.1  # caption 0 (10 deg) gives the queued video (45) 16%


def test_symmetric_without_queue_is_clip_infonce():
    obj = _objective("symmetric", ["queue.enabled=false"])
    q_v = {"global": _unit(*V_DEG).requires_grad_(True)}
    q_t = {"global": _unit(*T_DEG).requires_grad_(True)}
    keys = {"global": torch.zeros(3, 2)}
    out = obj(q_v, q_t, keys, dict(keys), torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.bool),
              torch.tensor([math.log(10.0)]), rank=0, world_size=1)
    out["loss"].backward()
    v, t = _unit(*V_DEG).requires_grad_(True), _unit(*T_DEG).requires_grad_(True)
    logits = 10 * t @ v.T  # CLIP: cross-entropy over rows and over columns, averaged
    ref = 0.5 * (torch.nn.functional.cross_entropy(logits, torch.arange(3))
                 + torch.nn.functional.cross_entropy(logits.T, torch.arange(3)))
    ref.backward()
    assert out["loss"].item() == pytest.approx(ref.item(), abs=1e-6)
    torch.testing.assert_close(q_v["global"].grad, v.grad)
    torch.testing.assert_close(q_t["global"].grad, t.grad)


def test_both_recipe_is_clips_in_batch_rows_plus_the_momentum_rows_with_the_queue():
    """queue.objective=both: per sample and direction, the symmetric loss without its queue columns
    plus the momentum loss (own key positive, batch keys and queue negatives): the queue's negatives
    only ever sit beside a momentum-key positive."""
    def case(recipe, extra=()):
        obj = _objective(recipe, extra)
        if "global_video" in obj.queues:  # queue.enabled=false has none
            obj.queues["global_video"].push({"emb": _unit(QUEUE_V[0])}, torch.tensor([QUEUE_V[1]]))
            obj.queues["global_text"].push({"emb": _unit(QUEUE_T[0])}, torch.tensor([QUEUE_T[1]]))
        q_v, q_t = {"global": _unit(*V_DEG)}, {"global": _unit(*T_DEG)}
        k_v, k_t = {"global": _unit(5, 95, 190)}, {"global": _unit(20, 70, 170)}  # lagging momentum keys
        per, _, _ = obj.direction_losses(q_v, q_t, k_v, k_t, torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.bool),
                                         torch.tensor([math.log(10.0)]), rank=0, world_size=1)
        return per["global"]

    both = case("both")
    sym = case("symmetric", ["queue.enabled=false"])
    mom = case("momentum")
    with_queue = case("symmetric")
    for d in (0, 1):
        torch.testing.assert_close(both[d], sym[d] + mom[d])
        assert not torch.allclose(sym[d], with_queue[d])  # the queue really is out of the in-batch rows
