"""Asynchronous checkpoint save (checkpoint.async_save, pipeline/train/async_save.py).

Unit: `snapshot` is a host copy that a later in-place update cannot reach and that serialises to the
same bytes as the original did. Integration (DeepSpeed launcher, 2 CPU ranks, real prep shards),
with the background write slowed to outlast a step (the `slow-checkpoint-write` fault: a slow disk):
- training goes on during the write (step 3 is logged before step 2's checkpoint is committed), every
  checkpoint is complete and intact, and resuming the step-4 one gives the async run's steps 5-6
  exactly (the copy is the step's state, not a later one);
- a kill during the background write (files written, not committed) leaves the previous checkpoint
  as `latest`;
- SIGTERM while a write is in flight waits for it: both it and the stop's own checkpoint are complete.
"""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures import LIGHT_LAUNCH
from hiervl.run_dir import find_latest, read_meta, verify
from hiervl.train.async_save import DeferredRecorder, snapshot

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model.preset=hit", "data.batch_size=4", "train.steps=6", "train.log_every=1", "checkpoint.every_steps=2",
        "checkpoint.keep=5", "optimizer.warmup_steps=2", "queue.enabled=true", "queue.size=20", "checkpoint.async_save=true",
        *LIGHT_LAUNCH]


def test_snapshot_is_a_host_copy_that_serialises_like_the_original(tmp_path):
    flat = torch.arange(12, dtype=torch.float32)
    param = torch.nn.Parameter(torch.ones(3))
    state = {"a": flat[2:5], "b": flat[4:9].view(5), "p": param, "nested": [flat, (3, "x")], "n": 7}
    ref = io.BytesIO()
    torch.save(state, ref)
    snap = snapshot(state)
    # views of one storage stay views of one (copied) storage, as torch.save writes them
    assert snap["a"].untyped_storage().data_ptr() == snap["b"].untyped_storage().data_ptr()
    assert snap["a"].untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()
    assert isinstance(snap["p"], torch.nn.Parameter) and snap["nested"][1] == (3, "x")
    with torch.no_grad():  # training goes on: in-place updates after the snapshot
        flat.add_(100)
        param.mul_(5)
    state["nested"].append("later")
    assert snap["a"].tolist() == [2.0, 3.0, 4.0] and snap["p"].tolist() == [1.0, 1.0, 1.0]
    assert len(snap["nested"]) == 2
    rec = DeferredRecorder(tmp_path)
    rec.save(state, tmp_path / "x.pt")  # copies now, writes on write_all
    with torch.no_grad():
        flat.sub_(100)
        param.div_(5)  # back to the values torch.save(ref) saw... but the recorder copied the changed ones
    assert not (tmp_path / "x.pt").exists()
    rec.write_all()
    got = torch.load(tmp_path / "x.pt", weights_only=True)
    assert got["a"].tolist() == [102.0, 103.0, 104.0] and got["p"].tolist() == [5.0, 5.0, 5.0]
    data = (tmp_path / "x.pt").read_bytes()
    assert rec.files["x.pt"] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    # a snapshot of the restored state serialises to the bytes the original did
    del state["nested"][2]
    again = io.BytesIO()
    torch.save(snapshot(state), again)
    assert again.getvalue() == ref.getvalue()


# ---------------------------------------------------------------------------- training runs


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR="cpu")
    env.update(extra)
    return env


def _cmd(shards, out, extra=()):
    return [sys.executable, "-m", "hiervl.launch.cli", "train", "--config", str(ROOT / "configs/tiny.yaml"), *BASE,
            f"data.path={shards}", f"train.out_dir={out}", "train.ranks=2", *extra]


def _train(shards, out, env=None, extra=()):
    return subprocess.run(_cmd(shards, out, extra), env=env or _env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def _metrics(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


@pytest.fixture(scope="module")
def async_run(prepared_dataset_40, tmp_path_factory):
    out = tmp_path_factory.mktemp("async")
    res = _train(prepared_dataset_40, out, env=_env(HIERVL_FAULT="slow-checkpoint-write"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return out, res.stdout + res.stderr


@pytest.mark.integration
def test_training_goes_on_during_the_write_and_the_copy_is_the_steps_state(prepared_dataset_40, async_run, tmp_path):
    out, log = async_run
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step00000006"
    for step in (2, 4, 6):
        tag = f"step{step:08d}"
        meta = read_meta(ckpts, tag)
        assert meta is not None and verify(ckpts, tag) is None, tag
        assert {"rank0.pt", "rank1.pt", "mp_rank_00_model_states.pt"} <= set(meta["files"])
        assert meta["async"] is (step != 6)  # the final save is synchronous
    assert not list(ckpts.glob(".pending-*"))
    metrics = _metrics(out)
    # the step-2 save is held until step 3 is logged (a disk slower than a step): training went on meanwhile
    assert metrics[3]["time"] < read_meta(ckpts, "step00000002")["saved_at"]
    assert "written in the background" in log

    # the step-4 checkpoint holds step 4's state: resumed, it gives the async run's steps 5 and 6
    resumed = tmp_path / "resumed"
    res = _train(prepared_dataset_40, resumed, extra=[f"train.resume={ckpts / 'step00000004'}",
                                                     "checkpoint.async_save=false"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    got = _metrics(resumed)
    assert sorted(got) == [5, 6]
    for step in (5, 6):
        assert got[step]["loss"] == pytest.approx(metrics[step]["loss"], abs=1e-6), step
        assert got[step]["lr"] == pytest.approx(metrics[step]["lr"], rel=1e-9), step


@pytest.mark.integration
def test_a_kill_during_the_background_write_leaves_the_previous_checkpoint_latest(prepared_dataset_40, tmp_path):
    out = tmp_path / "killed"
    # both ranks die in the background thread of the step-4 save, files written, nothing committed
    res = _train(prepared_dataset_40, out, env=_env(HIERVL_FAULT="kill-during-checkpoint", HIERVL_FAULT_AFTER="2"))
    assert res.returncode != 0
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step00000002"
    assert (ckpts / "step00000004").is_dir() and not (ckpts / "step00000004" / "meta.json").exists()
    assert find_latest(ckpts) == "step00000002"
    # (resuming such a run equals the uninterrupted one: tests/test_train.py, the same commit order)


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_waits_for_the_write_in_flight(prepared_dataset_40, tmp_path):
    out = tmp_path / "sigterm"
    proc = subprocess.Popen(_cmd(prepared_dataset_40, out, extra=["train.steps=40"]), cwd=ROOT, text=True,
                            env=_env(HIERVL_FAULT="slow-checkpoint-write"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    rank_file = out / "checkpoints" / "step00000002" / "rank1.pt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not rank_file.is_file():
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read()[-4000:]
    assert not (rank_file.parent / "meta.json").exists()  # the write is in flight (held until step 3 is logged)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-4000:]
    status = json.loads((out / "status.json").read_text())
    stopped = status["step"]
    assert status["state"] == "preempted" and 2 <= stopped < 40
    ckpts = out / "checkpoints"
    assert verify(ckpts, "step00000002") is None and read_meta(ckpts, "step00000002")["async"] is True
    assert find_latest(ckpts) == f"step{stopped:08d}" and verify(ckpts, f"step{stopped:08d}") is None
