"""Issue 25 item 1: a CPU training rank compiles nothing. DeepSpeed's communication backend used to
JIT-compile its `deepspeed_shm_comm` C++ op on first start (9.5 min on a loaded machine, silently,
into a cache shared by every checkout); `hiervl.distributed.init(use_deepspeed=True)` keeps it from
doing so. A fresh TORCH_EXTENSIONS_DIR stays empty through DeepSpeed's backend start-up."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

RANK = """
import deepspeed, torch
from hiervl import distributed as dist
dist.init(use_deepspeed=True)           # what the trainer does first
deepspeed.init_distributed(dist_backend="gloo")  # what deepspeed.initialize does next
import importlib
print("shm op:", importlib.import_module("deepspeed.comm.comm").cdb.shm_comm_op)
"""


def test_cpu_rank_starts_deepspeed_without_building_a_cpp_op(tmp_path):
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext), DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-c", RANK], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "shm op: None" in res.stdout
    assert list(ext.rglob("*")) == [], list(ext.rglob("*"))[:5]  # no build files, no .so
