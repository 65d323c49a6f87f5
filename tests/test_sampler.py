"""The epoch order and rank slicing (pipeline/data/sampler.py): pure, fast, no decoding."""

import numpy as np
import pytest
from hiervl.data.sampler import (
    PAD,
    choose_caption,
    epoch_order,
    frame_indices,
    group_codes,
    num_batches,
    rank_plan,
    sample_rng,
    stable_hash,
)


def shards_of(n, per_shard):
    return np.arange(n) // per_shard


def mixed_groups(n, seed=0):
    """int64 [n] group ids: groups of 2..6 members in shuffled positions, about a third ungrouped (-1)."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(n), rng.integers(2, 7, n))[:n]
    ids[rng.random(n) < 0.35] = -1
    return ids[rng.permutation(n)]


def order_of(mode, n, seed, epoch):
    """The order of `mode` (global | grouped) over n samples with `mixed_groups`."""
    return epoch_order(n, seed, epoch, mode, group_ids=mixed_groups(n), group_chunk=4)


@pytest.mark.parametrize("mode", ["global", "block", "grouped"])
def test_order_is_a_deterministic_permutation_that_changes_per_epoch(mode):
    n = 53
    kw = dict(mode=mode, shard_ids=shards_of(n, 7), window=2, group_ids=mixed_groups(n))
    a = epoch_order(n, seed=3, epoch=0, **kw)
    b = epoch_order(n, seed=3, epoch=0, **kw)
    c = epoch_order(n, seed=3, epoch=1, **kw)
    d = epoch_order(n, seed=4, epoch=0, **kw)
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


def runs_of(order, group_ids):
    """The groups of `order` as runs: {group: (first slot, last slot)} (ungrouped samples skipped)."""
    runs = {}
    for slot, g in enumerate(group_ids[order].tolist()):
        if g >= 0:
            first, _ = runs.get(g, (slot, slot))
            runs[g] = (first, slot)
    return runs


def test_group_codes_number_groups_by_first_appearance_and_none_is_minus_one():
    assert group_codes(["b", None, "a", "b", "", "a", "c"]).tolist() == [0, -1, 1, 0, -1, 1, 2]
    assert group_codes([None, None]).tolist() == [-1, -1] and group_codes([]).dtype == np.int64


@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_grouped_order_keeps_each_group_contiguous_shuffled_inside_and_in_random_group_order(chunk):
    n = 300
    gid = mixed_groups(n, seed=1)
    ids, counts = np.unique(gid[gid >= 0], return_counts=True)
    sizes = dict(zip(ids.tolist(), counts.tolist()))
    firsts, insides = [], []
    for epoch in range(4):
        order = epoch_order(n, 7, epoch, "grouped", group_ids=gid, group_chunk=chunk)
        assert sorted(order.tolist()) == list(range(n))
        runs = runs_of(order, gid)
        assert len(runs) == len(sizes)
        for g, (first, last) in runs.items():
            assert last - first + 1 == sizes[g], f"group {g} is not contiguous"
        firsts.append(sorted(runs, key=lambda g: runs[g][0]))  # the group sequence
        big = max(sizes, key=sizes.get)
        insides.append(order[runs[big][0]:runs[big][1] + 1].tolist())  # the largest group's inner order
    assert len({tuple(f) for f in firsts}) == 4  # group order changes per epoch
    assert firsts[0] != sorted(firsts[0])  # and is not the groups' natural order
    assert len({tuple(x) for x in insides}) > 1  # members are shuffled within the group
    assert not np.array_equal(epoch_order(n, 7, 0, "grouped", group_ids=gid, group_chunk=chunk),
                              epoch_order(n, 8, 0, "grouped", group_ids=gid, group_chunk=chunk))


def test_grouped_order_without_groups_is_a_plain_shuffle_and_needs_group_ids():
    order = epoch_order(40, 0, 0, "grouped", group_ids=np.full(40, -1), group_chunk=8)
    assert sorted(order.tolist()) == list(range(40)) and order.tolist() != list(range(40))
    assert epoch_order(0, 0, 0, "grouped", group_ids=np.zeros(0, np.int64)).tolist() == []
    with pytest.raises(ValueError, match="group_ids"):
        epoch_order(5, 0, 0, "grouped")
    with pytest.raises(ValueError, match="unknown order"):
        epoch_order(5, 0, 0, "nope")


def split_share(order, gid, g):
    """Share of groups (>= 2 members) whose members land in two global batches of g slots."""
    runs = runs_of(order, gid)
    return sum(first // g != last // g for first, last in runs.values()) / len(runs)


def test_grouped_order_keeps_groups_in_one_batch():
    """Packing into chunks of C slots keeps a group in one global batch of G slots, G a multiple of
    C, at any G (the order does not know G): groups of 4 (the synthetic siblings, with a partial
    group at the end) never straddle; mixed groups of 2..6 with a third ungrouped never do either
    (the ungrouped samples fill the holes); unpacked (C=1), groups straddle."""
    n = 2002  # 500 groups of 4 and one of 2: unpacked, the group of 2 shifts every later group
    synth = np.arange(n) // 4
    mixed = mixed_groups(n, seed=3)
    for epoch in range(3):
        for g in (16, 32, 64):
            assert split_share(epoch_order(n, 0, epoch, "grouped", group_ids=synth, group_chunk=16), synth, g) == 0
            assert split_share(epoch_order(n, 0, epoch, "grouped", group_ids=mixed, group_chunk=16), mixed, g) == 0
            assert split_share(epoch_order(n, 0, epoch, "grouped", group_ids=mixed, group_chunk=8), mixed, g) == 0
        unpacked = epoch_order(n, 0, epoch, "grouped", group_ids=mixed, group_chunk=1)
        assert split_share(unpacked, mixed, 16) > 0.05  # what the packing avoids
    # groups of 2..8 with no ungrouped samples to fill holes: a few chunks stay short, at the end
    dense = np.repeat(np.arange(n), np.random.default_rng(0).integers(2, 9, n))[:n]
    packed = np.mean([split_share(epoch_order(n, 0, e, "grouped", group_ids=dense, group_chunk=16), dense, 16)
                      for e in range(3)])
    unpacked = np.mean([split_share(epoch_order(n, 0, e, "grouped", group_ids=dense, group_chunk=1), dense, 16)
                        for e in range(3)])
    assert packed < 0.08 and unpacked > 0.2 and packed < unpacked / 3, (packed, unpacked)  # measured 0.047, 0.265


def test_grouped_order_config_is_validated():
    from hiervl.config import ConfigError, DataConfig

    DataConfig(order="grouped", group_chunk=8)  # a valid one is accepted (raises otherwise)
    for bad in ({"group_chunk": 0}, {"group_chunk": 2.5}, {"order": "groups"}):
        with pytest.raises(ConfigError, match="group_chunk|grouped"):
            DataConfig(**bad)


def test_grouped_order_places_groups_larger_than_the_chunk_whole():
    gid = np.array([0] * 11 + [1] * 3 + [-1] * 10 + [2] * 20)
    n = len(gid)
    for epoch in range(5):
        order = epoch_order(n, 2, epoch, "grouped", group_ids=gid, group_chunk=8)
        assert sorted(order.tolist()) == list(range(n))
        runs = runs_of(order, gid)
        assert {g: last - first + 1 for g, (first, last) in runs.items()} == {0: 11, 1: 3, 2: 20}
        assert runs[0][0] % 8 == 0 and runs[2][0] % 8 == 0  # a big group starts on the chunk grid


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


@pytest.mark.parametrize("mode", ["global", "grouped"])
@pytest.mark.parametrize("w", [1, 2, 3])
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_exactly_once_over_three_epochs(w, remainder, mode):
    n, b = 23, 2  # 23 is not a multiple of W*B for any W here
    for epoch in range(3):
        order = order_of(mode, n, 0, epoch)
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


@pytest.mark.parametrize("mode", ["global", "grouped"])
@pytest.mark.parametrize("w1,w2", [(2, 3), (2, 1), (1, 3), (3, 2)])
def test_resume_at_another_world_size_continues_with_no_repeat_and_no_gap(w1, w2, mode):
    n, b = 37, 2
    order = order_of(mode, n, 1, 2)
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
