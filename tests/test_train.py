"""DeepSpeed training with 2 CPU ranks under DeepSpeed's launcher, on real synth + prep shards.

One straight 12-step run is the reference. Against it:
- a run killed while writing its step-9 checkpoint (the kill leaves `latest` on the complete step 6),
  whose step 6 is then damaged, resumed with the same command from step 3, gives identical per-step
  losses, sample keys, final weights and queues;
- SIGTERM mid-run (2 ranks, ZeRO-2) writes a checkpoint and exits 0; that checkpoint resumed on 1 rank
  (ZeRO-1, through a universal checkpoint) continues at the exact data position (every key of the
  epoch exactly once) with the same LR.
train.log_every's cadence is checked on conftest.py's `one_rank_run` (tests/test_monitoring.py).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from fixtures import IN_PROCESS_DECODE, SMALL_TEXT
from hiervl.run_dir import find_latest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
# the small BERT (fixtures.SMALL_TEXT): what these runs check does not depend on the text encoder, and
# MiniLM's 217 MB checkpoints would be most of their CPU; the decode pool stays (default decode_workers)
BASE = ["model.preset=hit", "data.batch_size=4", "train.steps=12", "train.log_every=1", "train.log_samples=true",
        "checkpoint.every_steps=3", "checkpoint.keep=5", "optimizer.warmup_steps=4", "queue.enabled=true", "queue.size=20",
        *SMALL_TEXT]


@pytest.fixture(scope="module")
def shards(prepared_dataset_40):
    return prepared_dataset_40


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR="cpu")
    env.update(extra)
    return env


def _cmd(shards, out, ranks=2, extra=()):
    return [sys.executable, "-m", "hiervl.launch.cli", "train", "--config", str(ROOT / "configs/tiny.yaml"), *BASE,
            f"data.path={shards}", f"train.out_dir={out}", f"train.ranks={ranks}", *extra]


def _train(shards, out, ranks=2, env=None, extra=()):
    return subprocess.run(_cmd(shards, out, ranks, extra), env=env or _env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def _sigterm_after_two_steps(cmd, out, env=None, wait_s=600) -> str:
    """Start `cmd` (a `hiervl train` into `out`), SIGTERM it once metrics.jsonl has two steps, and
    return its output; it must checkpoint and exit 0 (a preemption)."""
    proc = subprocess.Popen(cmd, env=env or _env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, metrics = time.time() + wait_s, Path(out) / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()[-4000:]
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-4000:]
    return output


def _metrics(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def _samples(out, rank):
    rows = [json.loads(line) for line in (Path(out) / "samples" / f"rank{rank}.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def _module_state(out, tag):
    return torch.load(Path(out) / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    res = _train(shards, out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return out


def test_a_kill_mid_checkpoint_keeps_the_previous_latest_and_a_damaged_one_resumes_from_the_one_before(
        shards, straight, tmp_path):
    """Checkpoints 3 and 6 complete, then both ranks die while writing 9, after its files and before
    the commit (a kill mid-write): `latest` stays on the complete step 6, step 9 is a folder without
    meta.json. Step 6's model states are then truncated (a disk error, a bad copy). The same command
    warns once, naming the file, resumes from step 3 and ends exactly where the straight run does:
    per-step losses, LRs, every rank's sample keys, final weights and queues (no crash loop on requeue).
    (One run checks both: a kill and a damaged checkpoint cost two launches each.) Its ranks decode in-process
    where the straight run used the decode pool: the same batches either way, which this checks too."""
    out = tmp_path / "killed"
    res = _train(shards, out, env=_env(HIERVL_FAULT="kill-during-checkpoint", HIERVL_FAULT_AFTER="6"),
                 extra=IN_PROCESS_DECODE)
    assert res.returncode != 0
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step00000006"
    assert (ckpts / "step00000009").is_dir() and not (ckpts / "step00000009" / "meta.json").exists()
    assert find_latest(ckpts) == "step00000006"
    bad = ckpts / "step00000006" / "mp_rank_00_model_states.pt"
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2])

    res = _train(shards, out, extra=IN_PROCESS_DECODE)  # the same command again
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    log = res.stdout + res.stderr
    damaged = [line for line in log.splitlines() if "is damaged" in line]
    assert len(damaged) == 1, damaged
    assert str(bad) in damaged[0] and "(truncated)" in damaged[0] and "resuming from step00000003" in damaged[0]
    assert "Traceback" not in log and "at step 3 (epoch" in log
    _assert_same_as_straight(straight, out)


def _assert_same_as_straight(straight, out):
    """Per-step losses, LRs, every rank's sample keys, final weights and queues equal the straight run's."""
    ref, got = _metrics(straight), _metrics(out)
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(ref)
    for step in range(1, STEPS + 1):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], abs=1e-6), step
        assert got[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-9), step
    for rank in (0, 1):
        ref_keys, got_keys = _samples(straight, rank), _samples(out, rank)
        assert [got_keys[s]["keys"] for s in range(1, STEPS + 1)] == [ref_keys[s]["keys"] for s in range(1, STEPS + 1)]
    tag = f"step{STEPS:08d}"
    a, b = _module_state(straight, tag), _module_state(out, tag)
    assert a.keys() == b.keys() and any("queue" in k for k in a)
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6, rtol=0), key


def _train_keys(shards):
    table = pq.read_table(shards / "manifest.parquet", columns=["key", "split"]).to_pylist()
    return sorted(r["key"] for r in table if r["split"] == "train")


def test_sigterm_at_zero2_then_one_rank_at_zero1_resumes_through_a_universal_checkpoint_at_exact_position(
        shards, straight, tmp_path):
    """A preemption and an elastic resume, in one run (each costs two launches), decoding in the
    decode pool (pipeline/data/decode_pool.py; data.decode_workers=auto gives a CPU rank at least one).
    2 ranks at ZeRO-2, SIGTERM once two steps are logged: a checkpoint of the step it stopped at (one
    optimizer partition per rank), exit 0, status "preempted". The same command on 1 rank at ZeRO-1:
    the checkpoint is converted to DeepSpeed's universal format by itself (the 2-rank run's fp32
    weights bit for bit, Adam's step carried over), and training goes on at the exact data position
    (every train key of epoch 0 exactly once) with the straight run's LR at each step. A rerun of the
    finished run then leaves its checkpoint alone."""
    out = tmp_path / "preempted"
    output = _sigterm_after_two_steps(_cmd(shards, out, extra=["train.zero_stage=2", "checkpoint.every_steps=0"]), out)
    assert "worker processes" in output  # the ranks decoded in the pool (data.decode_workers=auto: >= 1 on a CPU)
    status = json.loads((out / "status.json").read_text())
    stopped = status["step"]
    assert status["state"] == "preempted" and 2 <= stopped < STEPS
    tag = f"step{stopped:08d}"
    assert find_latest(out / "checkpoints") == tag
    assert len(list((out / "checkpoints" / tag).glob("*optim_states.pt"))) == 2  # one partition per rank
    # two ranks on one node split its cores (DeepSpeed's launcher says LOCAL_SIZE): never more threads than cores
    want = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, len(os.sched_getaffinity(0)) // 2)
    for rank in (0, 1):
        assert f"; {want} torch threads" in (out / "logs" / f"rank{rank}.log").read_text()
    saved = _module_state(out, tag)

    one_rank = ["train.zero_stage=1", "checkpoint.every_steps=0"]
    res = _train(shards, out, ranks=1, extra=one_rank)  # same out_dir, 1 rank: universal/elastic resume
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    log = res.stdout + res.stderr
    assert "worker processes" in log  # the pool again, after the resume
    assert f"at step {stopped} (epoch" in log and "via universal checkpoint (2 -> 1 ranks)" in log, log[-3000:]
    universal = out / "checkpoints" / f"{tag}_universal"
    assert (universal / "done").is_file()
    trainable = [k for k in saved if ".queues." not in f".{k}" and "_key." not in k and (universal / "zero" / k).is_dir()]
    optimized = 0
    for key in trainable:  # the converted fp32 master weights are the 2-rank run's weights, bit for bit
        converted = torch.load(universal / "zero" / key / "fp32.pt", weights_only=False)["param"]
        assert torch.equal(converted.reshape(saved[key].shape), saved[key].float()), key
        if (universal / "zero" / key / "exp_avg.pt").is_file():  # optimized (not frozen): Adam's step carried over
            optimized += 1
            assert int(torch.load(universal / "zero" / key / "step.pt", weights_only=False)) == stopped
    assert optimized > 50

    got, ref = _metrics(out), _metrics(straight)
    assert sorted(got) == list(range(1, STEPS + 1))
    # the optimizer step and LR schedule continue: same LR as the uninterrupted run at each step
    for step in range(stopped + 1, STEPS + 1):
        assert got[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-9), step
    # data position: epoch 0 keys, from 2 ranks then 1 rank, are every train key exactly once
    two = [_samples(out, 0), _samples(out, 1)]
    consumed = []
    for step in range(1, STEPS + 1):
        parts = [s[step] for s in two if step in s and step <= stopped] if step <= stopped else [_samples(out, 0)[step]]
        for part in parts:
            if part["epoch"] == 0:
                consumed += [k for k, v in zip(part["keys"], part["valid"]) if v]
    keys = _train_keys(shards)
    usable = len(keys) - len(keys) % 8  # the 2-rank part drops the remainder of a global batch of 8
    assert len(consumed) == len(set(consumed)), "a key was repeated within the epoch"
    assert set(consumed) <= set(keys) and len(consumed) >= usable - 4

    final = out / f"checkpoints/step{STEPS:08d}"
    assert torch.load(final / "mp_rank_00_model_states.pt", weights_only=False)["global_steps"] == STEPS
    meta = json.loads((final / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["zero_stage"] == 1

    # the same command again has nothing to train: it must not rewrite (and risk) its only checkpoint
    before = {f.name: f.stat().st_mtime_ns for f in final.iterdir()}
    res = _train(shards, out, ranks=1, extra=one_rank)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert {f.name: f.stat().st_mtime_ns for f in final.iterdir()} == before
    assert json.loads((out / "status.json").read_text())["checkpoint"] == f"step{STEPS:08d}"


def test_single_process_non_finite_losses_stop_with_checkpoint(shards, tmp_path):
    """`python -m hiervl.launch.train` runs one rank directly; N non-finite losses in a row stop the run."""
    out = tmp_path / "nan"
    cmd = [sys.executable, "-m", "hiervl.launch.train", "--config", str(ROOT / "configs/tiny.yaml"), *BASE,
           f"data.path={shards}", f"train.out_dir={out}", "train.max_bad_steps=2", *IN_PROCESS_DECODE]
    res = subprocess.run(cmd, env=_env(HIERVL_FAULT="nan-loss"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 3, res.stderr[-4000:]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["bad_steps"] == 2 and status["step"] == 0
    assert "non-finite" in status["reason"] and "train.lr" in status["reason"]
    assert find_latest(out / "checkpoints") == "step00000000"


@pytest.mark.parametrize("saved,now,ok", [(2, 1, True), (0, 2, True), (3, 3, True), (2, 3, False), (3, 1, False)])
def test_resume_plan_converts_within_zero_families_and_refuses_across(tmp_path, saved, now, ok):
    from hiervl.config import ConfigError
    from hiervl.train.checkpoint import plan_resume

    tag = tmp_path / "checkpoints" / "step00000010"
    tag.mkdir(parents=True)
    (tag / "meta.json").write_text(json.dumps({"world_size": 2, "zero_stage": saved}))
    (tmp_path / "checkpoints" / "latest").write_text("step00000010")
    if ok:
        plan = plan_resume("auto", tmp_path, world_size=1, zero_stage=now)
        assert plan["tag"] == "step00000010" and plan["universal"] is True
        assert plan["load_tag"] == "step00000010_universal"
    else:
        with pytest.raises(ConfigError, match=f"Resume with train.zero_stage={saved}"):
            plan_resume("auto", tmp_path, world_size=1, zero_stage=now)


def test_gradient_accumulation_counts_optimizer_steps(shards, tmp_path):
    """train.grad_accum=2: a step is an optimizer step for every counter. 3 steps of 2 micro-batches
    of 4: the LR schedule is at step 3 (not 6), the checkpoint says 3 optimizer steps, the key
    encoders were updated 3 times, every micro-batch's keys were enqueued once (queue pointer at
    3 x 2 x 4 = 24), and each logged step consumed 8 samples."""
    out = tmp_path / "accum"
    extra = ["train.steps=3", "train.grad_accum=2", "queue.size=100", "checkpoint.every_steps=0", *IN_PROCESS_DECODE]
    cmd = [sys.executable, "-m", "hiervl.launch.train", "--config", str(ROOT / "configs/tiny.yaml"), *BASE,
           f"data.path={shards}", f"train.out_dir={out}", *extra]
    res = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    status = json.loads((out / "status.json").read_text())
    assert status["step"] == 3 and status["momentum_updates"] == 3 and status["grad_accum"] == 2
    state = torch.load(out / "checkpoints/step00000003/mp_rank_00_model_states.pt", weights_only=False)
    assert state["global_steps"] == 3
    ptrs = [int(v) for k, v in state["module"].items() if k.endswith(".ptr")]
    assert ptrs and all(p == 24 for p in ptrs), ptrs
    samples = _samples(out, 0)
    assert sorted(samples) == [1, 2, 3] and all(len(samples[s]["keys"]) == 8 for s in samples)
    assert len({k for s in samples.values() for k in s["keys"]}) == 24  # 24 distinct samples of 40
    metrics = _metrics(out)
    assert sorted(metrics) == [1, 2, 3]
    # the schedule spans the 3 optimizer steps (warmup min(4, steps - 1) = 2, then cosine): it starts
    # at 0, is half-way up after one step and reaches lr * min_lr_ratio (tiny.yaml: 3e-4 x 0.1) at step 3
    lrs = [metrics[s]["lr"] for s in (1, 2, 3)]
    assert lrs == pytest.approx([0.0, 1.5e-4, 3e-5], rel=1e-6), lrs
    assert metrics[3]["samples_seen"] == 24
