"""The GPU path, checked on a GPU machine by bench/gpu_visit.sh (skipped where CUDA is absent, as in CI).

Needs the data that `bench/gpu_data.py` builds on a CPU machine (H.264 shards, a small text model,
a CPU-decoded reference batch) at $HIERVL_GPU_DATA (default .dev/gpu-data), and DeepSpeed + DALI
(`../shared/tools/device-wheels.sh`). Each test runs the real thing on the GPU:
- NCCL collectives take CPU and CUDA tensors alike (the trainer's flags are CPU-born);
- DALI `mixed` (NVDEC) frames through the loader match the CPU loader's PyAV frames;
- `hiervl train` with base.yaml's recipe at a small shape (`RECIPE`): NCCL, bf16, ZeRO-2, the queue with
  `objective=both` (momentum key encoders, their fp32 EMA shadow), activation checkpointing, frame
  differences + divided space-time attention with gelu, DALI `mixed` + PyAV decode processes (hybrid):
  a straight run; a SIGTERM then a resume at the exact step, LR and data position; a ZeRO-2 -> ZeRO-1
  resume through a universal checkpoint (fused AdamW's step tensors back on the GPU).
"""


import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hiervl.model.text_model import load_tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HIERVL_GPU_DATA", ROOT / ".dev" / "gpu-data"))
STEPS = 8
# base.yaml's recipe (configs/base.yaml) on tiny.yaml's shapes
RECIPE = ["model.preset=hit", "queue.enabled=true", "queue.objective=both", "queue.size=32", "queue.momentum=0.995",
          "train.activation_checkpointing=true", "train.precision=bf16", "train.zero_stage=2", "train.tf32=true",
          "model.vision.frame_diff=true", "model.vision.space_time=factorised", "model.vision.space_time_layers=1",
          "model.vision.act=gelu", "data.device=gpu", "data.decoder=auto", "data.decode_workers=2", "data.prefetch=2"]
TRAIN = [*RECIPE, "data.batch_size=4", f"train.steps={STEPS}", "train.log_every=1", "train.log_samples=true",
         "checkpoint.every_steps=4", "optimizer.warmup_steps=2"]


@pytest.fixture(scope="module")
def data():
    if not (DATA / "shards" / "manifest.parquet").is_file():
        pytest.fail(f"no GPU test data at {DATA}: run `.venv/bin/python bench/gpu_data.py` on a CPU machine and "
                    "carry .dev/gpu-data (or set HIERVL_GPU_DATA)")
    return DATA


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nccl_collectives_take_cpu_and_cuda_tensors(monkeypatch):
    from hiervl import distributed as D

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    torch.distributed.init_process_group("nccl")
    try:
        cpu = torch.tensor([1.0, 2.0])
        assert D.all_reduce_sum(cpu).device.type == "cpu" and D.all_reduce_sum(cpu).tolist() == [1.0, 2.0]
        cuda = torch.ones(2, 3, device="cuda")
        assert D.all_gather(cuda).device.type == "cuda" and D.all_gather(cpu[None]).device.type == "cpu"
        x = torch.ones(2, device="cuda", requires_grad=True)
        D.all_gather_with_grad(x).sum().backward()
        assert x.grad.tolist() == [1.0, 1.0]
    finally:
        torch.distributed.destroy_process_group()


def test_dali_mixed_frames_match_the_cpu_loaders_pyav_frames(data):
    from hiervl.config import load_config
    from hiervl.data.loader import iter_eval

    ref = torch.load(data / "reference.pt", weights_only=False)
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"data.path={data / 'shards'}", "data.device=gpu",
                                                   f"model.text.path={data / 'text'}"])
    loader = iter_eval(cfg, split="test", batch_size=len(ref["keys"]), tokenizer=load_tokenizer(cfg.model.text.path))
    batch = next(iter(loader))
    assert batch["keys"] == ref["keys"] and batch["video"].is_cuda
    assert bool(batch["valid"].all())
    std = torch.tensor(cfg.data.std).view(1, 1, 3, 1, 1)
    diff = ((batch["video"].float().cpu() - ref["video"].float()).abs() * std * 255).mean().item()
    assert diff < 4.0, f"DALI mixed vs PyAV frames differ by {diff:.2f}/255 on average"


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _cmd(data, out, extra=()):
    return [sys.executable, "-m", "hiervl.launch.cli", "train", "--config", str(ROOT / "configs/tiny.yaml"), *TRAIN,
            f"data.path={data / 'shards'}", f"model.text.path={data / 'text'}", f"train.out_dir={out}",
            "train.ranks=1", *extra]


def _check_momentum_state(tag_dir):
    """bf16 key towers with an fp32 shadow in the checkpoint, and keys that moved off the query's start."""
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    shadow = states["momentum"]
    assert set(shadow) == {"video_key", "text_key"}
    assert all(t.dtype == torch.float32 for tower in shadow.values() for t in tower.values())
    module = states["module"]
    keys = [k for k in module if k.startswith("video_key.")]
    assert keys and all(module[k].dtype == torch.bfloat16 for k in keys if module[k].is_floating_point())
    for name, value in shadow["video_key"].items():  # the bf16 keys are the shadow rounded once
        torch.testing.assert_close(module[f"video_key.{name}"].float(), value.to(torch.bfloat16).float())


def _rows(out, name):
    return {r["step"]: r for r in map(json.loads, (Path(out) / name).read_text().splitlines())}


def test_train_on_nccl_with_dali_mixed_sigterm_resume_and_universal(data, tmp_path):
    straight = tmp_path / "straight"
    res = subprocess.run(_cmd(data, straight), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-5000:]
    assert "mixed, GPU" in log, "the loader did not decode with DALI mixed"
    assert "worker processes" in log, "the decode pool did not take part (hybrid)"
    status = json.loads((straight / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == STEPS and status["bad_steps"] == 0
    _check_momentum_state(straight / "checkpoints" / f"step{STEPS:08d}")
    ref = _rows(straight, "metrics.jsonl")
    assert sorted(ref) == list(range(1, STEPS + 1)) and all(0 < r["loss"] < 50 for r in ref.values())

    out = tmp_path / "preempted"
    proc = subprocess.Popen(_cmd(data, out, ["checkpoint.every_steps=0"]), env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read()[-4000:]
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-4000:]
    stopped = json.loads((out / "status.json").read_text())
    assert stopped["state"] == "preempted" and 2 <= stopped["step"] < STEPS, stopped
    res = subprocess.run(_cmd(data, out), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    got = _rows(out, "metrics.jsonl")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # the same samples and LR at every step as the uninterrupted run
        assert got[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-9), step
    assert _rows(out, "samples/rank0.jsonl") == _rows(straight, "samples/rank0.jsonl")

    # ZeRO-2 -> ZeRO-1: DeepSpeed loads it only through a universal checkpoint, converted by itself
    res = subprocess.run(_cmd(data, straight, ["train.zero_stage=1", f"train.steps={STEPS + 2}"]), env=_env(),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-5000:]
    assert f"at step {STEPS}" in log and "via universal checkpoint" in log, log[-3000:]
    status = json.loads((straight / "status.json").read_text())
    assert status["step"] == STEPS + 2 and status["universal_conversion_seconds"] is not None
    print(f"GPU train: checkpoint save {status['checkpoint_save_seconds']} s, resume {status['resume_seconds']} s, "
          f"universal conversion {status['universal_conversion_seconds']} s")
