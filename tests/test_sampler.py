"""The epoch order and rank slicing (pipeline/sampler.py): pure, fast, no decoding."""

import numpy as np
import pytest

from pipeline.sampler import (
    PAD,
    choose_caption,
    epoch_order,
    frame_indices,
    num_batches,
    rank_plan,
    sample_rng,
    stable_hash,
)


def shards_of(n, per_shard):
    return np.arange(n) // per_shard


@pytest.mark.parametrize("mode", ["global", "block"])
def test_order_is_a_deterministic_permutation_that_changes_per_epoch(mode):
    n = 53
    a = epoch_order(n, seed=3, epoch=0, mode=mode, shard_ids=shards_of(n, 7), window=2)
    b = epoch_order(n, seed=3, epoch=0, mode=mode, shard_ids=shards_of(n, 7), window=2)
    c = epoch_order(n, seed=3, epoch=1, mode=mode, shard_ids=shards_of(n, 7), window=2)
    d = epoch_order(n, seed=4, epoch=0, mode=mode, shard_ids=shards_of(n, 7), window=2)
    assert sorted(a.tolist()) == list(range(n))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)


def test_block_order_reads_each_shard_in_order_within_windows():
    n, per, window = 60, 10, 2
    shard = shards_of(n, per)
    order = epoch_order(n, seed=0, epoch=5, mode="block", shard_ids=shard, window=window)
    for s in range(n // per):  # each shard front to back
        mine = order[shard[order] == s]
        assert mine.tolist() == sorted(mine.tolist())
    for w in range(0, n, per * window):  # a window spans exactly `window` shards, interleaved
        chunk = shard[order[w:w + per * window]]
        assert len(set(chunk.tolist())) == window
        assert not all(chunk[i] <= chunk[i + 1] for i in range(len(chunk) - 1))  # really interleaved
    def shard_sequence(epoch):  # shards in order of first appearance
        seq = shard[epoch_order(n, 0, epoch, "block", shard, window)]
        return tuple(dict.fromkeys(seq.tolist()))
    seqs = {shard_sequence(e) for e in range(4)}
    assert len(seqs) > 1 and seqs != {tuple(range(n // per))}  # shards are shuffled, per epoch


def rank_union(order, position, b, w, remainder):
    plans = [rank_plan(order, position, b, r, w, remainder) for r in range(w)]
    counts = {len(p) for p in plans}
    assert len(counts) == 1, "every rank must yield the same number of batches"
    assert all(p.positions == plans[0].positions for p in plans)
    seen = []  # in global order: global batch k = ranks' batches concatenated
    for k in range(len(plans[0])):
        for p in plans:
            assert len(p.batches[k]) == b
            seen.extend(p.batches[k].tolist())
    return seen, plans[0]


@pytest.mark.parametrize("w", [1, 2, 3])
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_exactly_once_over_three_epochs(w, remainder):
    n, b = 23, 2  # 23 is not a multiple of W*B for any W here
    for epoch in range(3):
        order = epoch_order(n, 0, epoch)
        seen, plan = rank_union(order, 0, b, w, remainder)
        real = [i for i in seen if i != PAD]
        assert len(real) == len(set(real))
        g = b * w
        if remainder == "pad":
            assert sorted(real) == list(range(n))
            assert seen[:n] == order.tolist() and seen[n:] == [PAD] * (len(seen) - n)
            assert plan.positions[-1] == n
        else:
            assert real == order[:n // g * g].tolist()
            assert plan.positions[-1] == n // g * g
        assert len(plan) == num_batches(n, b, w, remainder)


@pytest.mark.parametrize("w1,w2", [(2, 3), (2, 1), (1, 3), (3, 2)])
def test_resume_at_another_world_size_continues_with_no_repeat_and_no_gap(w1, w2):
    n, b = 37, 2
    order = epoch_order(n, 1, 2)
    full, plan = rank_union(order, 0, b, w1, "pad")
    stop = 3  # batches taken before the stop
    position = plan.positions[stop - 1]
    assert position == stop * b * w1
    before = full[:position]
    after, _ = rank_union(order, position, b, w2, "pad")
    real_after = [i for i in after if i != PAD]
    assert real_after == order[position:].tolist()  # exactly the rest of the epoch, in order
    assert sorted(before + real_after) == list(range(n))


def test_resume_at_same_world_size_is_the_tail_of_the_uninterrupted_plan():
    order = epoch_order(41, 0, 0)
    for rank in range(2):
        full = rank_plan(order, 0, 3, rank, 2, "drop")
        resumed = rank_plan(order, full.positions[1], 3, rank, 2, "drop")
        assert [x.tolist() for x in resumed.batches] == [x.tolist() for x in full.batches[2:]]
        assert resumed.positions == full.positions[2:]


def test_rank_plan_refuses_bad_arguments():
    with pytest.raises(ValueError):
        rank_plan(np.arange(5), 6, 1, 0, 1)
    with pytest.raises(ValueError):
        rank_plan(np.arange(5), 0, 1, 2, 2)


def test_frame_indices_centre_in_eval_and_one_per_segment_in_training():
    assert frame_indices(16, 4, None).tolist() == [2, 6, 10, 14]
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = frame_indices(20, 4, rng)
        assert all(5 * k <= i < 5 * (k + 1) for k, i in enumerate(idx))
    assert frame_indices(3, 6, None).tolist() == [0, 0, 1, 1, 2, 2]  # short clip repeats frames


def test_caption_choice_and_augmentation_are_functions_of_seed_epoch_key():
    caps = [f"c{i}" for i in range(5)]
    picks = [choose_caption(caps, 0, e, "k1") for e in range(20)]
    assert picks == [choose_caption(caps, 0, e, "k1") for e in range(20)]
    assert len(set(picks)) > 1
    assert choose_caption([], 0, 0, "k") == ""
    assert sample_rng(1, 2, "a").random() == sample_rng(1, 2, "a").random() != sample_rng(1, 3, "a").random()
    assert stable_hash("video") == stable_hash("video") < 2 ** 63
