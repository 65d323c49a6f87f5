"""Monitoring: every figure of a log step in metrics.jsonl, TensorBoard and (offline) W&B.

- `Monitor` unit: one record goes to metrics.jsonl as is, to TensorBoard and to an offline W&B run
  under its path (read back with TensorBoard's EventAccumulator and from the run's `.wandb` log).
- A real `hiervl train` (DeepSpeed, 1 CPU rank, real shards) with eval during training and
  `train.wandb` offline: eval R@k per level and fused, data-wait share, temperature per level, grad
  norm and LR at every log step, in all three places; and the grad norm of step 1 computed by our
  fused norm (ZeRO-0) equals the one DeepSpeed's ZeRO-1 optimizer reports for the same step.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import LIGHT_LAUNCH

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def wandb_history(out_dir: Path) -> list[dict]:
    """The history rows of the offline W&B run under `out_dir/wandb`: its `.wandb` file is a
    LevelDB-style log (7-byte file header; 32 KiB blocks of [crc32, length, type] chunks) of
    protobuf `Record`s (wandb.proto.wandb_internal_pb2)."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = glob.glob(str(out_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    data = Path(files[0]).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, partial = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            records.append(partial)
    rows = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
    return rows


def tensorboard_scalars(out_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_monitor_writes_each_number_to_jsonl_tensorboard_and_offline_wandb(tmp_path, monkeypatch):
    from hiervl.config import load_config
    from hiervl.train.monitor import Monitor, flatten

    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config(TINY, ["train.wandb=hiervl-test"])  # mode: offline by default
    records = [{"step": 10, "epoch": 0, "time": 1.0, "loss": 2.5, "losses": {"semantic": 1.5, "feature": 1.0},
                "lr": 1e-4, "grad_norm": 0.75, "data_wait_share": 0.25, "temperature": {"semantic": 0.05},
                "skipped_samples": 0, "flag": True},
               {"step": 20, "epoch": 1, "time": 2.0, "loss": 2.0, "losses": {"semantic": 1.25, "feature": 0.75},
                "lr": 2e-4, "grad_norm": None, "data_wait_share": 0.5, "temperature": {"semantic": 0.04},
                "eval": {"t2v": {"fused": {"R1": 12.5}, "semantic": {"R1": 10.0}}}}]
    monitor = Monitor.open(cfg, tmp_path)
    for r in records:
        monitor.log(r)
    monitor.close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == records
    assert flatten(records[1])["eval/t2v/fused/R1"] == 12.5 and "grad_norm" not in flatten(records[1])
    tb = tensorboard_scalars(tmp_path)
    assert tb["loss/total"] == {10: 2.5, 20: 2.0} and tb["loss/semantic"] == {10: 1.5, 20: 1.25}
    assert tb["grad_norm"] == {10: 0.75} and tb["temperature/semantic"] == pytest.approx({10: 0.05, 20: 0.04})
    assert tb["eval/t2v/fused/R1"] == {20: 12.5} and tb["data_wait_share"] == {10: 0.25, 20: 0.5}
    assert "step" not in tb and "time" not in tb and "flag" not in tb
    rows = wandb_history(tmp_path)
    assert [r["_step"] for r in rows] == [10, 20]
    assert rows[0]["loss/total"] == 2.5 and rows[0]["grad_norm"] == 0.75 and rows[0]["lr"] == 1e-4
    assert rows[1]["eval/t2v/fused/R1"] == 12.5 and rows[1]["eval/t2v/semantic/R1"] == 10.0


def test_wandb_settings_are_checked_at_load(monkeypatch):
    import importlib.util

    from hiervl.config import ConfigError, load_config
    from hiervl.train.monitor import wandb_mode

    with pytest.raises(ConfigError, match="train.wandb_mode='cloud'"):
        load_config(TINY, ["train.wandb_mode=cloud"])
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(load_config(TINY, ["train.wandb=p"])) == "disabled"
    assert wandb_mode(load_config(TINY, ["train.wandb=p", "train.wandb_mode=online"])) == "online"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install wandb"):
        load_config(TINY, ["train.wandb=p"])


# ------------------------------------------------------------------------------ a real run


@pytest.fixture(scope="module")
def shards(prepared_dataset_40):
    return prepared_dataset_40


def _train(shards, out, *extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR="cpu")
    env.pop("WANDB_MODE", None)
    # one rank started directly (`python -m hiervl.launch.train`, as tests/test_train.py's single-process runs):
    # what is compared here is the step, not the launch
    cmd = [sys.executable, "-m", "hiervl.launch.train", "--config", TINY, f"data.path={shards}",
           f"train.out_dir={out}", "train.ranks=1", "model.preset=hit", "data.batch_size=4", "train.log_every=2",
           "checkpoint.every_steps=0", "model.text.num_layers=1", "eval.batch_size=8", *extra]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_training_logs_eval_temperature_grad_norm_to_all_three(one_rank_run):
    """conftest.py's `one_rank_run` (7 steps, log every 2, eval every 3, W&B offline), which
    test_train_validation.py checks too."""
    out = one_rank_run["out"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows}
    assert sorted(by_step) == [2, 3, 4, 6, 7]  # every 2 steps, the eval steps 3 and 6, the last step
    levels = ["feature", "semantic"]
    for r in rows:  # each loss is its window's mean (steps since the last line): finite and positive
        assert 0 < r["loss"] < 50 and r["grad_norm"] > 0 and r["lr"] > 0 and 0 <= r["data_wait_share"] <= 1
        assert sorted(r["temperature"]) == levels
        assert all(t == pytest.approx(0.07, rel=1e-5) for t in r["temperature"].values())  # model.temperature, fixed in hit
    assert "eval" in by_step[3] and "eval" in by_step[6] and all("eval" not in by_step[s] for s in (2, 4, 7))
    ev = by_step[3]["eval"]
    assert sorted(ev["t2v"]) == sorted(levels + ["fused"]) and sorted(ev["v2t"]) == sorted(levels + ["fused"])
    chance = json.loads((out / "eval.jsonl").read_text().splitlines()[0])["t2v"]
    assert ev["t2v"]["fused"]["R1"] == chance["R1"] and ev["t2v"]["fused"]["MdR"] == chance["MdR"]
    tb = tensorboard_scalars(out)
    assert tb["grad_norm"] == pytest.approx({s: by_step[s]["grad_norm"] for s in by_step}, rel=1e-6)
    assert tb["eval/t2v/semantic/R1"] == pytest.approx({3: ev["t2v"]["semantic"]["R1"],
                                                        6: by_step[6]["eval"]["t2v"]["semantic"]["R1"]})
    assert set(tb["temperature/feature"]) == set(by_step) and set(tb["lr"]) == set(by_step)
    wb = {r["_step"]: r for r in wandb_history(out)}
    assert sorted(wb) == sorted(by_step)
    assert wb[3]["eval/v2t/fused/R5"] == ev["v2t"]["fused"]["R5"]
    assert wb[7]["grad_norm"] == pytest.approx(by_step[7]["grad_norm"]) and "data_wait_share" in wb[2]


@pytest.mark.integration
def test_grad_norm_ours_at_zero0_equals_deepspeeds_at_zero1(shards, tmp_path):
    # 2 steps (train.steps=1 has a 0-step warmup, which DeepSpeed's scheduler refuses); step 1 compared
    ours = _train(shards, tmp_path / "z0", "train.steps=2", "train.log_every=1", "train.zero_stage=0", *LIGHT_LAUNCH)
    theirs = _train(shards, tmp_path / "z1", "train.steps=2", "train.log_every=1", "train.zero_stage=1", *LIGHT_LAUNCH)
    assert ours[0]["step"] == theirs[0]["step"] == 1
    assert ours[0]["loss"] == pytest.approx(theirs[0]["loss"], rel=1e-6)  # the same step on the same data
    assert ours[0]["grad_norm"] > 0
    assert ours[0]["grad_norm"] == pytest.approx(theirs[0]["grad_norm"], rel=1e-4)
