"""Checkpoint hashes computed while writing (pipeline/train/checkpoint_hash.py): the recorded digest is
the file's, for both torch serialisations, and a real DeepSpeed save makes its manifest without
reading back the files it wrote."""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hiervl.train.checkpoint_hash import WriteRecorder

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("zipfile", [True, False])
def test_the_recorded_digest_is_the_files_and_it_loads(tmp_path, zipfile):
    rec = WriteRecorder(tmp_path)
    (tmp_path / "sub").mkdir()
    obj = {"w": torch.randn(300, 70), "view": torch.arange(20)[3:9], "meta": ["x", 1]}
    rec.save(obj, tmp_path / "sub" / "a.pt", zipfile=zipfile)
    data = (tmp_path / "sub" / "a.pt").read_bytes()
    assert rec.files == {"sub/a.pt": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    back = torch.load(tmp_path / "sub" / "a.pt", weights_only=False)
    assert torch.equal(back["w"], obj["w"]) and torch.equal(back["view"], obj["view"]) and back["meta"] == ["x", 1]


SAVE = r'''
import json, os, sys
import torch, deepspeed
from hiervl import distributed, run_dir
from hiervl.train import checkpoint as ckpt
distributed.skip_deepspeed_shm_op()  # as a training rank does: no C++ op is built (tests/test_no_jit_build.py)
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 8))
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
    "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},  # no FusedAdam build
    "zero_optimization": {"stage": int(sys.argv[2])}})
engine.backward(engine(torch.randn(1, 64)).sum()); engine.step()
read = []
plain = run_dir._sha256  # the one hasher of checkpoint files (run_dir.file_manifest, run_dir.verify)
run_dir._sha256 = lambda p: (read.append(p.name), plain(p))[1]
tag = ckpt.save(engine, sys.argv[1], 1, {"step": 1}, {"rng": 1}, {"world_size": 1, "zero_stage": 0}, keep=2)
run_dir._sha256 = plain
print(json.dumps({"tag": tag, "read": read, "verify": run_dir.verify(run_dir.checkpoint_dir(sys.argv[1]), tag),
                  "files": run_dir.read_meta(run_dir.checkpoint_dir(sys.argv[1]), tag)["files"]}))
'''


@pytest.mark.parametrize("stage", [1])  # stage 1 also writes the ZeRO optimizer file
def test_a_deepspeed_save_hashes_while_writing_not_by_reading_back(tmp_path, stage):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ext = tmp_path / "torch_extensions"  # stays empty: the test saves, it does not compile (minutes on a fresh machine)
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0", OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(ext))
    res = subprocess.run([sys.executable, "-c", SAVE, str(tmp_path), str(stage)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert not ext.exists() or list(ext.rglob("*.so")) == []
    got = json.loads(res.stdout.strip().splitlines()[-1])
    tag_dir = tmp_path / "checkpoints" / got["tag"]
    written = sorted(p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*.pt"))
    assert "mp_rank_00_model_states.pt" in written and "rank0.pt" in written
    assert not [n for n in got["read"] if n.endswith(".pt")], got["read"]  # no .pt file read back to hash it
    assert got["verify"] is None  # the manifest agrees with the bytes on disk
    for name in written:
        assert got["files"][name]["sha256"] == hashlib.sha256((tag_dir / name).read_bytes()).hexdigest(), name
