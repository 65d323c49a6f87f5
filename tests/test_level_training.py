"""Issue #28's level knobs change the loss and the gradients as they claim.

model.loss_weights (training weight per level), model.loss_on=fused (HANet: one loss on the
level_weights mean of the level scores), model.token_align=monotonic (an order-aware token level)
and model.detach_token_levels (token-level losses stop at their own heads).
"""

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hiervl.config import load_config
from hiervl.errors import UserError
from hiervl.model.levels import level_similarity, model_levels, monotonic_token_similarity, token_similarity
from hiervl.model.objective import HierarchicalContrastiveLoss

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _cfg(extra=(), preset="hit"):
    return load_config(TINY, [f"model.preset={preset}", "model.embed_dim=4", "data.max_words=5", "data.num_frames=3",
                              "queue.objective=symmetric", "queue.enabled=false", *extra])


def _embeddings(seed=0, b=4, words=5, frames=3, d=4):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1).requires_grad_(True)  # noqa: E731
    mask = torch.tensor([[True] * (2 + i % 3) + [False] * (words - 2 - i % 3) for i in range(b)])
    q_v = {"feature": unit(b, frames, d), "semantic": unit(b, d)}
    q_t = {"feature": unit(b, words, d), "feature_mask": mask, "semantic": unit(b, d)}
    return q_v, q_t


def _loss(cfg, q_v, q_t):
    obj = HierarchicalContrastiveLoss(cfg)
    keys_v = {k: v.detach() for k, v in q_v.items()}
    keys_t = {k: v.detach() if v.is_floating_point() else v for k, v in q_t.items()}
    b = q_v["semantic"].shape[0]
    return obj(q_v, q_t, keys_v, keys_t, torch.arange(b), torch.ones(b, dtype=torch.bool),
               torch.full((2,), math.log(1 / 0.07)), rank=0, world_size=1)


def test_loss_weights_weigh_each_level_loss_and_a_zero_weight_stops_its_gradient():
    q_v, q_t = _embeddings()
    plain = _loss(_cfg(), q_v, q_t)
    weighted = _loss(_cfg(["model.loss_weights={feature: 0.25, semantic: 2.0}"]), q_v, q_t)
    assert weighted["losses"]["feature"] == pytest.approx(plain["losses"]["feature"].item())  # logged unweighted
    expected = 0.25 * plain["losses"]["feature"] + 2.0 * plain["losses"]["semantic"]
    assert weighted["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert weighted["loss"].item() != pytest.approx(plain["loss"].item(), rel=1e-3)

    _loss(_cfg(["model.loss_weights={feature: 0.0}"]), q_v, q_t)["loss"].backward()
    assert q_v["feature"].grad is None or torch.count_nonzero(q_v["feature"].grad) == 0
    assert torch.count_nonzero(q_v["semantic"].grad) > 0


def test_fused_loss_is_one_infonce_on_the_weighted_mean_of_the_level_scores():
    q_v, q_t = _embeddings(seed=1)
    cfg = _cfg(["model.loss_on=fused", "model.level_weights={feature: 1.0, semantic: 3.0}"])
    out = _loss(cfg, q_v, q_t)
    assert set(out["losses"]) == {"fused"}
    levels = {lv.name: lv for lv in model_levels(cfg)}
    sim = (level_similarity(levels["feature"], q_t, q_v) + 3.0 * level_similarity(levels["semantic"], q_t, q_v)) / 4.0
    logits = sim / 0.07  # [texts, videos]
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    per_level = _loss(_cfg(), q_v, q_t)["loss"]  # the sum of two per-level losses is another objective
    assert per_level.item() != pytest.approx(out["loss"].item(), rel=1e-2)
    out["loss"].backward()
    assert torch.count_nonzero(q_v["feature"].grad) > 0 and torch.count_nonzero(q_t["semantic"].grad) > 0


def test_fused_loss_runs_with_the_momentum_queue_recipes():
    for recipe in ("both", "momentum"):
        q_v, q_t = _embeddings(seed=2)
        out = _loss(_cfg(["model.loss_on=fused", f"queue.objective={recipe}", "queue.enabled=true",
                          "queue.size=8"]), q_v, q_t)
        assert torch.isfinite(out["loss"]) and set(out["losses"]) == {"fused"}


def _brute_monotone(s, valid):
    """Best sum over monotone (non-decreasing) column choices for the valid rows, by enumeration."""
    rows = [r for r in range(s.shape[0]) if valid[r]]
    best = -math.inf
    for cols in itertools.product(range(s.shape[1]), repeat=len(rows)):
        if all(a <= b for a, b in zip(cols, cols[1:])):
            best = max(best, sum(float(s[r, c]) for r, c in zip(rows, cols)))
    return best


def test_monotonic_alignment_matches_enumeration_of_monotone_paths():
    g = torch.Generator().manual_seed(3)
    t = F.normalize(torch.randn(2, 4, 3, generator=g), dim=-1)  # 2 captions, 4 words
    v = F.normalize(torch.randn(3, 3, 3, generator=g), dim=-1)  # 3 videos, 3 frames
    mask = torch.tensor([[True, True, True, False], [True, False, True, True]])
    got = monotonic_token_similarity(t, mask, v)
    for i, j in itertools.product(range(2), range(3)):
        s = t[i] @ v[j].T  # [L, T]
        t2v = _brute_monotone(s, mask[i]) / mask[i].sum().item()
        v2t = _brute_monotone(s.T[:, mask[i]], [True] * 3) / 3
        assert got[i, j].item() == pytest.approx(0.5 * (t2v + v2t), abs=1e-6)
    assert torch.allclose(got, monotonic_token_similarity(t, mask, v, max_elements=8))  # blocked alike


def test_monotonic_alignment_sees_order_where_max_is_blind():
    # caption "A then B", words A, B; video 1 shows A then B, video 2 shows B then A
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    t = torch.stack([a, b])[None]  # [1, 2, 2]
    v = torch.stack([torch.stack([a, b]), torch.stack([b, a])])  # [2, 2 frames, 2]
    mask = torch.ones(1, 2, dtype=torch.bool)
    m = token_similarity(t, mask, v)
    assert m[0, 0].item() == pytest.approx(m[0, 1].item())  # TI: the same score both ways
    mono = monotonic_token_similarity(t, mask, v)
    assert mono[0, 0].item() == pytest.approx(1.0)  # both words, both frames matched in order
    assert mono[0, 1].item() == pytest.approx(0.5)  # in the reversed video only one of each can match in order


def test_token_align_reaches_the_model_and_the_objective():
    cfg = _cfg(["model.token_align=monotonic"])
    assert [lv.align for lv in model_levels(cfg)] == ["monotonic", "max"]  # token level only
    q_v, q_t = _embeddings(seed=4)
    mono = _loss(cfg, q_v, q_t)["losses"]["feature"]
    plain = _loss(_cfg(), q_v, q_t)["losses"]["feature"]
    assert mono.item() != pytest.approx(plain.item(), rel=1e-4)


@pytest.mark.parametrize("detach", [False, True])
def test_detached_token_levels_train_their_heads_but_not_the_shared_encoders(detach):
    from hiervl.model.hierarchical import build_model

    torch.manual_seed(0)
    cfg = load_config(TINY, ["model.preset=hit", "data.num_frames=4", "data.max_words=12", "queue.enabled=false",
                             "queue.objective=symmetric", "model.loss_weights={semantic: 0.0}",
                             f"model.detach_token_levels={str(detach).lower()}"])
    model = build_model(cfg)
    n = 4
    mask = torch.ones(n, 12, dtype=torch.long)
    batch = {"video": torch.randn(n, 4, 3, 32, 32), "input_ids": torch.randint(1000, 3000, (n, 12)),
             "attention_mask": mask, "video_ids": torch.arange(n), "valid": torch.ones(n, dtype=torch.bool)}
    model(batch)["loss"].backward()  # the feature (token) level's loss alone
    head = model.video.heads.proj["feature"].weight.grad
    assert head is not None and torch.count_nonzero(head) > 0  # the level's own head always trains
    encoder = [p.grad for p in model.video.encoder.parameters() if p.requires_grad]
    reached = any(g is not None and torch.count_nonzero(g) > 0 for g in encoder)
    assert reached is not detach


@pytest.mark.parametrize("extra, message", [
    (["model.loss_weights={bogus: 1.0}"], "model.loss_weights names \\['bogus'\\]"),
    (["model.loss_weights={feature: -1.0}"], "model.loss_weights values must be numbers >= 0"),
    (["model.loss_weights={feature: 0, semantic: 0}"], "model.loss_weights must not all be 0"),
    (["model.loss_on=fused", "model.loss_weights={feature: 0.5}"], "model.loss_on=fused trains one loss"),
    (["model.loss_on=mean"], "model.loss_on"),
    (["model.token_align=dtw"], "model.token_align"),
])
def test_level_knobs_are_validated(extra, message):
    with pytest.raises(UserError, match=message):
        _cfg(extra)


def test_hanet_trains_hanets_fused_hinge_by_default_and_other_presets_keep_per_level_infonce():
    # HANet's released code (FIDELITY.md): one VSE++ hinge on the mean of the level scores
    hanet = _cfg(preset="hanet")
    assert (hanet.model.loss, hanet.model.loss_on) == ("hinge", "fused")
    for preset in ("hit", "hcmi", "flat"):
        cfg = _cfg(preset=preset)
        assert (cfg.model.loss, cfg.model.loss_on) == ("infonce", "levels")
    # set explicitly, either knob wins; per-level weights ask for per-level losses
    assert _cfg(["model.loss=infonce"], preset="hanet").model.loss_on == "fused"
    assert _cfg(["model.loss_on=levels"], preset="hanet").model.loss == "hinge"
    assert _cfg(["model.loss_weights={global: 2.0}"], preset="hanet").model.loss_on == "levels"
    assert _cfg(["model.loss_on=fused"]).model.loss == "infonce"  # hit stays InfoNCE when fused


def test_hanet_default_loss_is_the_hinge_on_the_fused_score():
    from hiervl.model.hierarchical import build_model

    def loss(extra):
        torch.manual_seed(0)
        model = build_model(_cfg(["model.vision.width=32", "model.vision.layers=1", "model.vision.heads=2",
                                  *extra], preset="hanet"))
        g = torch.Generator().manual_seed(1)
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
        batch = {"video": torch.randn(4, 3, 3, 32, 32, generator=g), "attention_mask": mask,
                 "input_ids": torch.randint(1000, 3000, (4, 5), generator=g) * mask, "video_ids": torch.arange(4)}
        return model(batch)

    default = loss([])
    assert set(default["losses"]) == {"fused"}
    assert default["loss"].item() == pytest.approx(loss(["model.loss=hinge", "model.loss_on=fused"])["loss"].item())
    assert default["loss"].item() != pytest.approx(loss(["model.loss=infonce", "model.loss_on=levels"])["loss"].item(),
                                                   rel=1e-2)


def _after_caption():
    """Caption "B after A" (words B, A: the reverse of time); video 0 shows A then B (its match), video 1 B then A."""
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    t = torch.stack([b, a])[None]  # [1 caption, 2 words, 2]
    v = torch.stack([torch.stack([a, a, b, b]), torch.stack([b, b, a, a])])  # [2 videos, 4 frames, 2]
    return t, torch.ones(1, 2, dtype=torch.bool), v


def test_monotonic_ranks_the_wrong_video_for_a_backward_caption_and_directed_can_read_it_backward():
    from hiervl.model.levels import directed_token_similarity

    t, mask, v = _after_caption()
    mono = monotonic_token_similarity(t, mask, v)
    assert mono[0, 1] > mono[0, 0]  # the defect: "B after A" aligned forward prefers B -> A
    backward = directed_token_similarity(t, mask, torch.tensor([-30.0]), v)
    assert backward[0, 0] > backward[0, 1]  # read backward, the caption prefers its own video
    assert torch.allclose(backward, monotonic_token_similarity(t, mask, v.flip(1)))
    forward = directed_token_similarity(t, mask, torch.tensor([30.0]), v)
    assert torch.allclose(forward, mono)
    half = directed_token_similarity(t, mask, torch.tensor([0.0]), v)
    assert torch.allclose(half, 0.5 * (forward + backward))
    # the direction is the caption's, not the pair's: read forward, "A then B" still tells the videos apart
    ab = directed_token_similarity(t.flip(1), mask, torch.tensor([2.0]), v)
    assert ab[0, 0] > ab[0, 1]


def test_directed_gate_is_trained_towards_the_direction_each_caption_reads():
    # captions 0 "B after A" (of video 0, A -> B) and 1 "B then A" (of video 1, B -> A) have the same
    # content words in the same order: only the direction tells them apart. Both start forward (the head's
    # initial gate); the objective's gradient pushes caption 0 backward and caption 1 further forward.
    cfg = _cfg(["model.token_align=directed", "model.embed_dim=2", "data.max_words=2", "data.num_frames=4",
                "model.loss_weights={semantic: 0.0}"])
    assert [lv.align for lv in model_levels(cfg)] == ["directed", "max"]
    t, mask, v = _after_caption()
    obj = HierarchicalContrastiveLoss(cfg)

    def loss(direction):
        q_t = {"feature": torch.cat([t, t]), "feature_mask": torch.ones(2, 2, dtype=torch.bool),
               "feature_dir": direction, "semantic": F.normalize(torch.ones(2, 2), dim=-1)}
        q_v = {"feature": v, "semantic": F.normalize(torch.ones(2, 2), dim=-1)}
        k_t = {k: x.detach() for k, x in q_t.items()}
        return obj(q_v, q_t, {k: x.detach() for k, x in q_v.items()}, k_t, torch.arange(2),
                   torch.ones(2, dtype=torch.bool), torch.full((2,), math.log(1 / 0.07)), rank=0, world_size=1)["loss"]

    direction = torch.tensor([2.0, 2.0], requires_grad=True)
    start = loss(direction)
    start.backward()
    assert direction.grad[0] > 0 and direction.grad[1] < 0  # descent: caption 0 backward, caption 1 forward
    assert loss(torch.tensor([-30.0, 30.0])).item() < start.item()


@pytest.mark.parametrize("recipe", ["symmetric", "both", "momentum"])
def test_directed_runs_through_the_model_the_queue_and_every_recipe(recipe):
    from hiervl.model.hierarchical import build_model

    torch.manual_seed(0)
    cfg = _cfg(["model.token_align=directed", "model.vision.width=32", "model.vision.layers=1",
                "model.vision.heads=2", f"queue.objective={recipe}", "queue.enabled=true", "queue.size=6"])
    model = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    batch = {"video": torch.randn(4, 3, 3, 32, 32, generator=g), "attention_mask": mask,
             "input_ids": torch.randint(1000, 3000, (4, 5), generator=g) * mask, "video_ids": torch.arange(4)}
    for _ in range(2):  # the second step scores the queue filled by the first
        out = model(batch)
        out["loss"].backward()
        model.momentum_update()
        model.enqueue(out)
    grads = [p.grad for n, p in model.named_parameters() if "gates" in n and p.requires_grad]  # query tower's
    assert len(grads) == 2 and all(gr is not None and torch.count_nonzero(gr) > 0 for gr in grads)
    assert model.queues["feature_text"].dir.shape == (6,) and torch.count_nonzero(model.queues["feature_text"].dir) > 0
    t = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert t["feature_dir"].shape == (4,)
