"""train.global_batch: the split into per-rank micro-batches and accumulation steps, and the epoch cut
into whole optimizer steps (the same steps whatever the split)."""

import numpy as np
import pytest
from hiervl.config import ConfigError, load_config
from hiervl.data.sampler import num_batches, rank_plan
from hiervl.train.global_batch import for_world, split_global_batch


@pytest.mark.parametrize("g,w,bmax,want", [(12, 2, 4, (3, 2)), (12, 1, 4, (4, 3)), (12, 3, 4, (4, 1)),
                                           (12, 2, 6, (6, 1)), (64, 8, 16, (8, 1)), (64, 4, 5, (4, 4)),
                                           (7, 1, 3, (1, 7))])
def test_split_is_exact_with_the_largest_micro_batch_that_fits(g, w, bmax, want):
    b, k = split_global_batch(g, w, bmax)
    assert (b, k) == want and b * k * w == g and b <= bmax


@pytest.mark.parametrize("g,w", [(12, 5), (10, 4), (3, 4)])
def test_a_global_batch_the_ranks_cannot_split_is_refused_in_one_line(g, w):
    with pytest.raises(ConfigError) as err:
        split_global_batch(g, w, 16)
    msg = str(err.value)
    assert "\n" not in msg and f"train.global_batch={g}" in msg and f"{w} ranks" in msg and "run on 1" in msg


def test_for_world_derives_batch_and_accumulation_and_refuses_grad_accum_with_global_batch():
    cfg = load_config("tiny", ["train.global_batch=12", "data.batch_size=4"])
    w2 = for_world(cfg, 2)
    assert (w2.data.batch_size, w2.train.grad_accum) == (3, 2) and (cfg.data.batch_size, cfg.train.grad_accum) == (4, 1)
    assert for_world(load_config("tiny"), 2).data.batch_size == 16  # unset: data.batch_size is per rank, as before
    with pytest.raises(ConfigError, match="train.grad_accum"):
        load_config("tiny", ["train.global_batch=12", "train.grad_accum=2"])
    with pytest.raises(ConfigError, match="accum_mode"):
        load_config("tiny", ["train.accum_mode=cached"])


def _steps(order, world, b, k, remainder="drop"):
    """The optimizer steps of an epoch as lists of global sample indices, in micro-batch then rank order."""
    plans = [rank_plan(order, 0, b, r, world, remainder, accum=k) for r in range(world)]
    n = len(plans[0])
    assert n % k == 0 and all(len(p) == n for p in plans)
    return [[int(i) for m in range(s * k, (s + 1) * k) for p in plans for i in p.batches[m]] for s in range(n // k)]


@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_every_split_of_one_global_batch_sees_the_same_steps(remainder):
    order = np.random.default_rng(0).permutation(40)
    ref = _steps(order, 2, 6, 1, remainder)  # G = 12: 3 whole steps of 40 (drop) or 4 with 8 pads (pad)
    assert len(ref) == (3 if remainder == "drop" else 4)
    for world, b, k in ((1, 4, 3), (3, 4, 1), (2, 3, 2), (1, 12, 1), (6, 1, 2)):
        assert _steps(order, world, b, k, remainder) == ref, (world, b, k)
    # without the cut into whole steps, the 1-rank split would yield a 4th partial step (10 batches of 4)
    assert num_batches(40, 4, 1, "drop") == 10 and num_batches(40, 4, 1, "drop", accum=3) == 9


def test_a_resume_holds_the_checkpoints_global_batch_and_config_yaml_is_written_once(tmp_path):
    """`hiervl train` holds the checkpoint's global batch before it writes config.yaml, so the rank's
    `_write_run_config` (the same held config) leaves the file alone; a different value is refused."""
    import json
    import os
    from types import SimpleNamespace

    from hiervl import run_dir
    from hiervl.config import to_yaml
    from hiervl.errors import UserError
    from hiervl.train.global_batch import hold_global_batch
    from hiervl.train.preflight import resume_checkpoint, resumed_config
    from hiervl.train.trainer import Trainer

    tag_dir = run_dir.checkpoint_dir(tmp_path) / run_dir.tag_for(4)
    tag_dir.mkdir(parents=True)
    meta = {"step": 4, "world_size": 2, "zero_stage": 0, "files": {}, "config": {"train": {"global_batch": 12}}}
    (tag_dir / run_dir.META).write_text(json.dumps(meta))
    cfg = load_config("tiny", [f"train.out_dir={tmp_path}", "data.batch_size=4"])
    held = hold_global_batch(cfg, resumed_config(resume_checkpoint(cfg)))
    assert held.train.global_batch == 12 and cfg.train.global_batch == 0  # a copy: the caller's is untouched
    assert hold_global_batch(cfg, None) is cfg and hold_global_batch(cfg, {"train": {}}) is cfg
    with pytest.raises(UserError, match=r"train.global_batch=12, the config says 24; set train.global_batch=12"):
        hold_global_batch(load_config("tiny", ["train.global_batch=24"]), meta["config"])

    path = tmp_path / run_dir.CONFIG
    path.write_text(to_yaml(held))  # what `hiervl train` wrote
    os.utime(path, (1, 1))
    rank0 = SimpleNamespace(out=tmp_path, run_cfg=held)
    Trainer._write_run_config(rank0)
    assert path.stat().st_mtime == 1  # the same config: not written again
    Trainer._write_run_config(SimpleNamespace(out=tmp_path, run_cfg=cfg))  # a launcher that could not hold it
    assert "global_batch: 0" in path.read_text() and path.stat().st_mtime > 1


def test_hiervl_train_refuses_a_global_batch_the_ranks_cannot_split_in_one_line_also_when_resumed(tmp_path):
    """G must be a multiple of the world size (each rank's micro-batches have one shape for the
    collectives; uneven shares are not built). `hiervl train` refuses it before any rank starts: exit
    2, one line, no traceback; on a resume the G is the checkpoint's, so the fix offered is only the
    rank counts that split it (setting another G would be refused by the resume)."""
    import json
    import os
    import subprocess
    import sys

    from hiervl import run_dir

    def train(out, *over):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu")
        res = subprocess.run([sys.executable, "-m", "hiervl.launch.cli", "train", "--config", "tiny", f"train.out_dir={out}",
                              f"data.path={tmp_path / 'no-data'}", *over], env=env, capture_output=True, text=True,
                             timeout=300)
        lines = [line for line in (res.stdout + res.stderr).splitlines() if "config error" in line]
        assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
        return lines[0]

    line = train(tmp_path / "fresh", "train.global_batch=10", "train.ranks=4")
    assert "train.global_batch=10 cannot be split over 4 ranks" in line and "run on 1, 2, 5, 10 ranks" in line
    assert "a multiple of 4" in line

    out = tmp_path / "resumed"
    tag_dir = run_dir.checkpoint_dir(out) / run_dir.tag_for(2)
    tag_dir.mkdir(parents=True)
    meta = {"step": 2, "world_size": 2, "zero_stage": 0, "files": {}, "config": {"train": {"global_batch": 12}}}
    (tag_dir / run_dir.META).write_text(json.dumps(meta))
    line = train(out, "train.ranks=5")  # G unset: the checkpoint's 12 is held, and 5 ranks cannot split it
    assert f"train.global_batch=12 (the checkpoint's, {tag_dir})" in line and "resume on 1, 2, 3, 4, 6, 12 ranks" in line
    assert "multiple of" not in line
