"""The loader end to end on real shards: exactly once, resume, elastic resume, corrupt samples, eval."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from hiervl.config import Config
from hiervl.data.loader import DatasetIndex, VideoTextLoader, iter_eval
from hiervl.data.sampler import stable_hash
from hiervl.errors import UserError
from hiervl.model.text_model import load_tokenizer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dataset(prepared_dataset_30):
    return prepared_dataset_30


def make_cfg(path, **data):
    cfg = Config()
    cfg.data.path = str(path)
    cfg.data.batch_size = 2
    cfg.data.num_frames = 4
    cfg.data.size = 16
    cfg.data.short_side = 20
    cfg.data.max_words = 12
    cfg.data.num_threads = 1
    cfg.data.flip = True
    cfg.data.decode_workers = 0  # these tests are about the in-process path (test_decode_pool.py: the workers)
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def run_epoch(cfg, w, epoch, state=None, limit=None):
    """Per rank: list of batches (keys, valid, position) and the loaders."""
    out, loaders = [], []
    for r in range(w):
        loader = VideoTextLoader(cfg, rank=r, world_size=w, tokenizer=load_tokenizer(cfg.model.text.path))
        loader.set_epoch(epoch)
        if state is not None:
            loader.load_state_dict(state)
        got = []
        for batch in loader:
            got.append((batch["keys"], batch["valid"].tolist(), batch["position"], batch["video"]))
            if len(got) == limit:  # a trainer stopping after `limit` steps
                break
        out.append(got)
        loaders.append(loader)
    return out, loaders


def valid_keys(batches):
    return [k for keys, valid, _, _ in batches for k, v in zip(keys, valid) if v]


def global_keys(per_rank):
    """The valid keys in global order: global batch k is the ranks' k-th batches in rank order."""
    return [k for step in zip(*per_rank) for keys, valid, _, _ in step for k, v in zip(keys, valid) if v]


def assert_groups_contiguous(keys, index):
    group = dict(zip(index.keys, index.groups))
    runs = [g for i, g in enumerate(group[k] for k in keys) if i == 0 or g != group[keys[i - 1]]]
    assert len(runs) == len(set(runs)), "a group's members are not contiguous in the global order"


@pytest.mark.parametrize("order", ["global", "grouped"])
@pytest.mark.parametrize("w", [1, 2, 3])
def test_exactly_once_over_three_epochs_with_equal_batch_counts(dataset, w, order):
    cfg = make_cfg(dataset, remainder="pad", prefetch=2, order=order, group_chunk=4)
    n = len(VideoTextLoader(cfg, tokenizer=load_tokenizer(cfg.model.text.path)).index)
    # a batch size that leaves a remainder at every world size tested
    cfg.data.batch_size = next(b for b in range(2, 12) if all(n % (b * v) for v in (1, 2, 3)))
    orders = []
    for epoch in range(3):
        per_rank, loaders = run_epoch(cfg, w, epoch)
        assert len({len(b) for b in per_rank}) == 1
        assert all(len(b) == len(loaders[0]) for b in per_rank)
        keys = [k for b in per_rank for k in valid_keys(b)]
        assert sorted(keys) == sorted(loaders[0].index.keys)  # every sample once, none twice
        assert loaders[0].stats["skipped"] == 0
        batch = per_rank[0][0]
        assert batch[3].shape == (cfg.data.batch_size, 4, 3, 16, 16) and batch[3].dtype == torch.float32
        assert per_rank[0][-1][2] == n  # final position: the whole epoch
        if order == "grouped":
            assert_groups_contiguous(global_keys(per_rank), loaders[0].index)
        orders.append(keys)
    assert orders[0] != orders[1]


def test_drop_remainder_yields_equal_counts_and_no_padding(dataset):
    cfg = make_cfg(dataset, remainder="drop", prefetch=1)
    per_rank, loaders = run_epoch(cfg, 3, 0)
    n = len(loaders[0].index)
    assert all(len(b) == n // 6 for b in per_rank)
    keys = [k for b in per_rank for k in valid_keys(b)]
    assert len(keys) == len(set(keys)) == n // 6 * 6


@pytest.mark.parametrize("order", ["global", "block", "grouped"])
def test_stop_and_resume_equals_never_stopped(dataset, order):
    cfg = make_cfg(dataset, remainder="pad", order=order, block_window=2, group_chunk=4)
    straight, _ = run_epoch(cfg, 2, epoch=1)
    first, loaders = run_epoch(cfg, 2, epoch=1, limit=3)
    states = [ld.state_dict() for ld in loaders]
    assert states[0] == states[1] and states[0]["position"] == 3 * 2 * 2 and states[0]["version"] == 1
    rest, _ = run_epoch(cfg, 2, epoch=0, state=states[0])  # epoch comes from the state
    for r in range(2):
        resumed = first[r] + rest[r]
        assert [b[0] for b in resumed] == [b[0] for b in straight[r]]
        assert [b[2] for b in resumed] == [b[2] for b in straight[r]]
        for a, b in zip(resumed, straight[r]):  # same augmentation too (a pure function of seed, epoch, key)
            assert torch.equal(a[3], b[3])


@pytest.mark.parametrize("order", ["global", "grouped"])
def test_resume_at_three_ranks_from_a_two_rank_state_sees_exactly_the_rest(dataset, order):
    cfg = make_cfg(dataset, remainder="pad", order=order, group_chunk=4)
    first, loaders = run_epoch(cfg, 2, epoch=2, limit=2)
    state = loaders[0].state_dict()
    done = [k for b in first for k in valid_keys(b)]
    rest, rest_loaders = run_epoch(cfg, 3, epoch=0, state=state)
    assert len({len(b) for b in rest}) == 1
    later = [k for b in rest for k in valid_keys(b)]
    order = [loaders[0].index.keys[i] for i in loaders[0].order(2)]
    assert sorted(later) == sorted(order[state["position"]:])
    assert sorted(done + later) == sorted(order) and len(set(done + later)) == len(order)
    assert global_keys(first) + global_keys(rest) == order  # the same order, continued at 3 ranks
    if cfg.data.order == "grouped":
        assert_groups_contiguous(order, loaders[0].index)
        assert 0 < state["position"] < len(order) and state["position"] % 4 == 0  # stopped mid-epoch


def test_group_column_reaches_the_loader_and_old_manifests_load_without_it(dataset, tmp_path):
    # synth writes group g{i // 4:05d} for video i; prep carries it into manifest.parquet
    index = DatasetIndex(dataset, "train")
    assert index.groups == [f"g{int(k[len('synth'):]) // 4:05d}" for k in index.keys]
    assert len(set(index.groups)) < len(index.groups)  # really groups of several
    assert (index.group_ids >= 0).all() and len(np.unique(index.group_ids)) == len(set(index.groups))
    # a dataset prepared before the column: same samples, groups all None, every order still loads
    copy = tmp_path / "old"
    shutil.copytree(dataset, copy)
    m = pd.read_parquet(copy / "manifest.parquet")
    m.drop(columns=["group"]).to_parquet(copy / "manifest.parquet")
    old = DatasetIndex(copy, "train")
    assert old.keys == index.keys and old.groups == [None] * len(old.keys) and (old.group_ids == -1).all()
    cfg = make_cfg(copy, remainder="pad", order="grouped")
    per_rank, _ = run_epoch(cfg, 2, 0)
    assert sorted(k for b in per_rank for k in valid_keys(b)) == sorted(old.keys)
    # every batch carries each sample's group as a stable id (queue.mask_same_group), -1 = none or padding
    for path, groups in ((dataset, dict(zip(index.keys, index.groups))), (copy, {})):
        loader = VideoTextLoader(make_cfg(path, remainder="pad"), tokenizer=load_tokenizer("default"))
        for n, batch in enumerate(loader):
            want = [stable_hash(groups[k]) if groups.get(k) else -1 for k in batch["keys"]]
            assert batch["group_ids"].tolist() == want and batch["group_ids"].dtype == torch.int64
            if n == 2:
                break


def test_grouped_state_refuses_a_dataset_with_other_groups(dataset, tmp_path):
    copy = tmp_path / "regrouped"
    shutil.copytree(dataset, copy)
    m = pd.read_parquet(copy / "manifest.parquet")
    m["group"] = "one"  # same keys, other groups: the grouped order would differ
    m.to_parquet(copy / "manifest.parquet")
    state = VideoTextLoader(make_cfg(dataset, order="grouped"), tokenizer=load_tokenizer()).state_dict()
    with pytest.raises(UserError, match="group"):
        VideoTextLoader(make_cfg(copy, order="grouped"), tokenizer=load_tokenizer()).load_state_dict(state)
    VideoTextLoader(make_cfg(copy), tokenizer=load_tokenizer()).load_state_dict(VideoTextLoader(make_cfg(dataset), tokenizer=load_tokenizer()).state_dict())  # global: fine
    # the state's group_chunk wins over the config's, so the resumed order is the one the run had
    resumed = VideoTextLoader(make_cfg(dataset, order="grouped", group_chunk=8), tokenizer=load_tokenizer())
    resumed.load_state_dict(state)
    assert resumed.group_chunk == 16 and np.array_equal(
        resumed.order(0), VideoTextLoader(make_cfg(dataset, order="grouped"), tokenizer=load_tokenizer()).order(0))


def test_load_state_refuses_another_dataset(dataset, tmp_path):
    cfg = make_cfg(dataset)
    state = VideoTextLoader(cfg, tokenizer=load_tokenizer(cfg.model.text.path)).state_dict()
    state["num_samples"] += 1
    with pytest.raises(UserError, match="another dataset"):
        VideoTextLoader(cfg, tokenizer=load_tokenizer(cfg.model.text.path)).load_state_dict(state)
    with pytest.raises(UserError, match="manifest.parquet"):
        VideoTextLoader(make_cfg(tmp_path), tokenizer=load_tokenizer())


def test_corrupt_sample_is_skipped_counted_and_the_epoch_goes_on(dataset, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(dataset, copy)
    m = pd.read_parquet(copy / "manifest.parquet")
    m = m[m["split"] == "train"].sort_values("key")
    bad = m.iloc[3]
    with open(copy / bad["shard"], "r+b") as f:  # overwrite the video bytes inside the tar
        f.seek(int(bad["video_offset"]))
        f.write(b"\x00garbage" * (int(bad["video_size"]) // 8))
    for decoder in ("auto", "pyav"):
        cfg = make_cfg(copy, remainder="pad", decoder=decoder)
        per_rank, loaders = run_epoch(cfg, 2, 0)
        assert len(per_rank[0]) == len(per_rank[1]) == len(loaders[0])
        keys = [k for b in per_rank for k in valid_keys(b)]
        assert bad["key"] not in keys and len(keys) == len(m) - 1
        stats = [ld.stats for ld in loaders]
        assert sum(s["skipped"] for s in stats) == 1
        owner = next(s for s in stats if s["skipped"])
        assert owner["skipped_keys"] == [bad["key"]] and owner["skipped_reasons"][bad["key"]]
        all_keys = [k for b in per_rank for keys_, _, _, _ in b for k in keys_]
        assert bad["key"] in all_keys  # the slot is kept (valid=False) so shapes stay aligned


def test_eval_iteration_sees_every_video_once_with_all_captions(dataset):
    cfg = make_cfg(dataset)
    cfg.eval.batch_size = 4
    m = pd.read_parquet(dataset / "manifest.parquet")
    m = m[m["split"] == "train"]
    seen, counts = {}, []
    for r in range(3):
        batches = list(iter_eval(cfg, split="train", rank=r, world_size=3, tokenizer=load_tokenizer(cfg.model.text.path)))
        counts.append(len(batches))
        for batch in batches:
            assert batch["caption_input_ids"].shape[0] == len(batch["caption_index"]) == sum(map(len, batch["captions"]))
            for slot, key in enumerate(batch["keys"]):
                if batch["valid"][slot]:
                    assert key not in seen
                    seen[key] = batch["captions"][slot]
                    assert (batch["caption_index"] == slot).sum() == len(seen[key])
    assert len(set(counts)) == 1
    assert seen == {k: list(c) for k, c in zip(m["key"], m["captions"])}
    # eval is deterministic: centre frames and crop, no flip
    a = next(iter_eval(cfg, split="train", tokenizer=load_tokenizer(cfg.model.text.path)))["video"]
    b = next(iter_eval(cfg, split="train", tokenizer=load_tokenizer(cfg.model.text.path)))["video"]
    assert torch.equal(a, b)


def test_captions_are_tokenized_and_vary_by_epoch(dataset):
    cfg = make_cfg(dataset, prefetch=0)
    loader = VideoTextLoader(cfg, tokenizer=load_tokenizer(cfg.model.text.path))
    picks = []
    for epoch in range(4):
        loader.set_epoch(epoch)
        batch = next(iter(loader))
        assert batch["input_ids"].shape == (2, 12) and batch["input_ids"].dtype == torch.int64
        assert batch["attention_mask"][:, 0].all()
        picks.append({k: ids.tolist() for k, ids in zip(batch["keys"], batch["input_ids"])})
    assert len(np.unique([str(p) for p in picks])) > 1


def test_dali_and_pyav_paths_give_the_same_batch_for_the_same_vp9_clips(dataset):
    batches = {}
    for decoder in ("dali", "pyav"):
        loader = VideoTextLoader(make_cfg(dataset, decoder=decoder, prefetch=0), tokenizer=load_tokenizer())
        batches[decoder] = next(iter(loader))
        assert dict(loader.stats["decode_path"]) == {decoder: 2}
    a, b = batches["dali"], batches["pyav"]
    assert a["keys"] == b["keys"] and a["valid"].all() and b["valid"].all()
    diff = (a["video"] - b["video"]).abs()
    assert diff.mean() < 0.03, diff.mean()  # normalised units: ~1/255 / std
    other = VideoTextLoader(make_cfg(dataset, decoder="pyav", prefetch=0), tokenizer=load_tokenizer())
    other.set_epoch(1)  # other frames / crops: far from equal, so the tolerance above means something
    assert (next(iter(other))["video"] - a["video"]).abs().mean() > 5 * diff.mean()
