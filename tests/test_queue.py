"""MomentumQueue: ring-buffer writes, wrap-around, fill tracking and checkpointing, by hand."""

import torch
from hiervl.model.queue import MomentumQueue


def _queue(size):
    return MomentumQueue(size, {"emb": ((2,), torch.float32), "mask": ((3,), torch.bool)})


def _entries(ids):
    ids = torch.tensor(ids)
    emb = torch.stack([ids.float(), -ids.float()], dim=1)  # [n, 2]
    mask = torch.stack([ids % 2 == 0, ids % 3 == 0, ids > 0], dim=1)  # [n, 3]
    return {"emb": emb, "mask": mask}, ids


def test_push_fills_in_order_and_tracks_filled_slots():
    q = _queue(5)
    q.push(*_entries([7, 8]))
    assert q.video_ids.tolist() == [7, 8, 0, 0, 0]
    assert q.valid.tolist() == [True, True, False, False, False]  # never-filled slots are not negatives
    assert int(q.ptr) == 2 and len(q) == 2
    assert q.emb[1].tolist() == [8.0, -8.0]
    assert q.mask[1].tolist() == [True, False, True]


def test_wrap_around_when_size_does_not_divide_the_batch():
    q = _queue(5)
    q.push(*_entries([0, 1, 2]))
    q.push(*_entries([3, 4, 5, 6]))  # slots 3, 4, then 0, 1
    assert q.video_ids.tolist() == [5, 6, 2, 3, 4]
    assert q.emb[:, 0].tolist() == [5.0, 6.0, 2.0, 3.0, 4.0]
    assert int(q.ptr) == 2 and bool(q.valid.all())


def test_push_larger_than_queue_keeps_the_newest_in_sequential_positions():
    q = _queue(3)
    q.push(*_entries([1]))  # ptr 1
    q.push(*_entries([10, 11, 12, 13, 14]))
    # sequential writes from slot 1: 10->1 11->2 12->0 13->1 14->2
    assert q.video_ids.tolist() == [12, 13, 14]
    assert int(q.ptr) == (1 + 5) % 3


def test_state_dict_round_trip_restores_every_buffer():
    q = _queue(4)
    q.push(*_entries([2, 3, 9]))
    state = q.state_dict()
    assert set(state) == {"emb", "mask", "video_ids", "valid", "ptr"}
    fresh = _queue(4)
    fresh.load_state_dict(state)
    for name, value in state.items():
        assert torch.equal(getattr(fresh, name), value)
    fresh.push(*_entries([4, 5]))  # continues from the restored pointer
    assert fresh.video_ids.tolist() == [5, 3, 9, 4]


def test_empty_push_is_a_noop():
    q = _queue(3)
    q.push({"emb": torch.zeros(0, 2), "mask": torch.zeros(0, 3, dtype=torch.bool)}, torch.zeros(0, dtype=torch.long))
    assert int(q.ptr) == 0 and len(q) == 0


def test_hit_objective_has_four_banks_with_token_and_global_shapes():
    """HiT's memory banks: 2 levels x 2 modalities, owned by the objective, every one a checkpointed buffer."""
    from pathlib import Path

    from hiervl.config import load_config
    from hiervl.model.objective import HierarchicalContrastiveLoss

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    for recipe in ("momentum", "symmetric"):
        cfg = load_config(tiny, ["model.preset=hit", "queue.size=7", "model.embed_dim=16", "data.num_frames=4",
                                 "data.max_words=12", "queue.enabled=true", f"queue.objective={recipe}"])
        obj = HierarchicalContrastiveLoss(cfg)
        shapes = {name: {f: tuple(getattr(q, f).shape) for f in q.fields} for name, q in obj.queues.items()}
        assert shapes == {"feature_video": {"emb": (7, 4, 16)},  # frames of the feature layer
                          "feature_text": {"emb": (7, 12, 16), "mask": (7, 12)},  # words (padded to max_words)
                          "semantic_video": {"emb": (7, 16)}, "semantic_text": {"emb": (7, 16)}}
        assert {k for k in obj.state_dict() if k.endswith(".ptr")} == {f"queues.{n}.ptr" for n in shapes}
    cfg = load_config(tiny, ["model.preset=hit", "queue.enabled=false"])
    assert len(HierarchicalContrastiveLoss(cfg).queues) == 0
