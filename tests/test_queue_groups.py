"""queue.mask_same_group: queue entries of the query's own group (its siblings) are not negatives.

The masked loss must equal the loss of the same queue with those entries emptied, for every recipe
that scores the queue; the global batch's siblings stay negatives; group -1 (none) masks nothing;
the group ids travel from the batch through the gathered keys into the queue, and checkpoints
written with the other setting load.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hiervl.config import load_config
from hiervl.model.objective import HierarchicalContrastiveLoss
from hiervl.model.queue import MomentumQueue

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
D = 4
QUERY_GROUPS = torch.tensor([5, 5, 6, -1])  # videos 0 and 1 are siblings in the batch; video 3 has no group
QUEUE_GROUPS = torch.tensor([5, 7, 6, 8, -1, 9])  # entries 0 and 2 are siblings of batch queries; 4 has no group
SIBLINGS = [0, 2]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _cfg(recipe, mask_group):
    return load_config(TINY, ["model.preset=flat", f"model.embed_dim={D}", f"queue.objective={recipe}",
                              "queue.enabled=true", f"queue.size={len(QUEUE_GROUPS)}",
                              f"queue.mask_same_group={str(mask_group).lower()}"])


def _objective(recipe, mask_group, emptied=()):
    """The objective with a filled queue (video ids 100.., QUEUE_GROUPS); `emptied` slots marked never filled."""
    obj = HierarchicalContrastiveLoss(_cfg(recipe, mask_group))
    g = torch.Generator().manual_seed(3)
    for name, queue in obj.queues.items():
        queue.push({"emb": F.normalize(torch.randn(len(QUEUE_GROUPS), D, generator=g), dim=-1)},
                   100 + torch.arange(len(QUEUE_GROUPS)), QUEUE_GROUPS)
        queue.valid[list(emptied)] = False
    return obj


def _inputs(groups=QUERY_GROUPS):
    g = torch.Generator().manual_seed(4)
    b = len(QUERY_GROUPS)
    q_v = {"global": F.normalize(torch.randn(b, D, generator=g), dim=-1)}
    q_t = {"global": F.normalize(torch.randn(b, D, generator=g), dim=-1)}
    k_v = {"global": F.normalize(q_v["global"] + 0.1 * torch.randn(b, D, generator=g), dim=-1)}
    k_t = {"global": F.normalize(q_t["global"] + 0.1 * torch.randn(b, D, generator=g), dim=-1)}
    return (q_v, q_t, k_v, k_t, torch.arange(b), torch.ones(b, dtype=torch.bool), torch.zeros(1))  # temperature 1: every entry weighs in the softmax


def _loss(obj, groups=QUERY_GROUPS):
    return obj(*_inputs(), rank=0, world_size=1, group_ids=groups)


def _per_sample(obj, groups=QUERY_GROUPS) -> torch.Tensor:
    """[B] v2t + t2v loss of each query."""
    per, _, _ = obj.direction_losses(*_inputs(), rank=0, world_size=1, group_ids=groups)
    l_v2t, l_t2v = per["global"]
    return (l_v2t + l_t2v).detach()


@pytest.mark.parametrize("recipe", ["both", "momentum", "symmetric"])
def test_same_group_queue_entries_are_not_negatives(recipe):
    masked = _per_sample(_objective(recipe, True))
    plain = _per_sample(_objective(recipe, False))
    # each query's loss == its loss against the same queue without its own siblings (queue entry 0 for
    # the group-5 queries 0 and 1, entry 2 for query 2, none for query 3 of no group); the batch's
    # siblings (videos 0 and 1) still count: nothing is removed from the batch columns
    want = [_per_sample(_objective(recipe, False, emptied=[0]))[0], _per_sample(_objective(recipe, False, emptied=[0]))[1],
            _per_sample(_objective(recipe, False, emptied=[2]))[2], plain[3]]
    assert masked.tolist() == pytest.approx([float(x) for x in want], rel=1e-6)
    assert (masked[:3] - plain[:3]).abs().min() > 1e-4  # the siblings were negatives before
    # without groups in the batch the knob has nothing to mask
    assert _per_sample(_objective(recipe, True), groups=None).tolist() == pytest.approx(plain.tolist(), rel=1e-6)
    assert _loss(_objective(recipe, True))["loss"].item() == pytest.approx(masked.mean().item() / 2, rel=1e-5)


def test_no_group_masks_nothing_and_only_the_query_own_group_is_masked():
    obj = _objective("both", True)
    ids, valid = obj.queues["global_video"].video_ids, obj.queues["global_video"].valid
    mask = obj._neg_mask(torch.arange(4), ids, valid, 0, True, QUERY_GROUPS, QUEUE_GROUPS)  # [B, K]
    assert mask.tolist() == [[False, True, True, True, True, True],
                             [False, True, True, True, True, True],
                             [True, True, False, True, True, True],
                             [True, True, True, True, True, True]]  # group -1 is no group, not a group of its own


def test_group_ids_travel_from_the_batch_into_the_queue():
    obj = HierarchicalContrastiveLoss(_cfg("both", True))
    out = _loss(obj, groups=torch.tensor([11, 11, 12, -1]))
    assert out["keys"]["group_ids"].tolist() == [11, 11, 12, -1]
    obj.enqueue(out["keys"])
    for queue in obj.queues.values():
        assert queue.group_ids[:4].tolist() == [11, 11, 12, -1] and queue.group_ids[4:].tolist() == [-1, -1]
    assert all(q.group_ids is None for q in HierarchicalContrastiveLoss(_cfg("both", False)).queues.values())


def test_checkpoints_load_across_the_setting():
    fields = {"emb": ((2,), torch.float32)}
    with_groups, without = MomentumQueue(3, fields, groups=True), MomentumQueue(3, fields)
    with_groups.push({"emb": torch.ones(2, 2)}, torch.tensor([1, 2]), torch.tensor([7, 8]))
    without.push({"emb": torch.ones(2, 2)}, torch.tensor([1, 2]))
    assert "group_ids" not in without.state_dict()  # a checkpoint without the knob keeps its old keys
    fresh = MomentumQueue(3, fields, groups=True)
    fresh.load_state_dict(without.state_dict())  # switched on at a resume: no groups known yet
    assert fresh.group_ids.tolist() == [-1, -1, -1] and fresh.video_ids.tolist() == [1, 2, 0]
    plain = MomentumQueue(3, fields)
    plain.load_state_dict(with_groups.state_dict())  # switched off: the ids are dropped
    assert plain.video_ids.tolist() == [1, 2, 0]
    fresh.load_state_dict(with_groups.state_dict())
    assert fresh.group_ids.tolist() == [7, 8, -1]
