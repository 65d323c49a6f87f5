"""`hiervl submit deepspeed --no-ssh`: two launchers on this machine (node ranks 0 and 1, master
127.0.0.1, one CPU rank each) train the tiny config together and write one checkpoint; run only where
tests/test_multinode_netns.py cannot run the same launch on two hosts."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import netns
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shards(prepared_dataset_16):
    return prepared_dataset_16


def test_cpu_ranks_wait_passively_unless_told():
    """OpenMP's spinning waits on shared CPU cores cost 5-10x the CPU per sample (launch/deepspeed_launch.rank_env)."""
    from hiervl.launch import deepspeed_launch as ds

    assert ds.rank_env({}, gpus=False)["OMP_WAIT_POLICY"] == "PASSIVE"
    assert ds.rank_env({"OMP_WAIT_POLICY": "ACTIVE"}, gpus=False)["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's wins
    assert "OMP_WAIT_POLICY" not in ds.rank_env({}, gpus=True)  # GPU ranks keep OpenMP's default


@pytest.mark.skipif(netns.available() is None, reason="test_multinode_netns.py runs the same launch across two "
                    "hosts and checks all of this there")
def test_two_no_ssh_launchers_train_together(tmp_path, shards):
    """Where network namespaces cannot be made (not root): the two launchers on one machine. Where they
    can, tests/test_multinode_netns.py::test_no_ssh_launchers_on_two_hosts_equal_one_process runs the
    same launch on two hosts and asserts the same files."""
    from hiervl.run_dir import find_latest

    out = tmp_path / "run 1"
    args = ["--config", str(ROOT / "configs/tiny.yaml"), "--hosts", "127.0.0.1,localhost", "--nodes", "2",
            "--no-ssh", "--master-addr", "127.0.0.1", f"data.path={shards}", f"train.out_dir={out}",
            "train.ranks=1", "data.batch_size=4", "train.steps=2", "train.log_every=1", "checkpoint.every_steps=2",
            "queue.size=16", "optimizer.warmup_steps=1", f"launch.master_port={_free_port()}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR="cpu")
    procs = [subprocess.Popen([sys.executable, "-m", "hiervl.launch.cli", "submit", "deepspeed", *args, "--node-rank", str(r)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=420)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {r}:\n{text[-4000:]}"
    assert (out / "hostfile").read_text() == "127.0.0.1 slots=1\nlocalhost slots=1\n"
    sent = (out / ".deepspeed_env").read_text().splitlines()  # what the other nodes' ranks get
    assert "DS_ACCELERATOR=cpu" in sent
    assert f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}" in sent  # CPU ranks never spin-wait
    stdio = sorted(p.name.rsplit("_", 1)[-1] for p in (out / "logs" / "stdout").glob("*.log"))  # DeepSpeed's
    assert stdio == ["rank0.log", "rank1.log"], stdio  # per-rank stdout/stderr, one from each launcher
    assert (out / "logs" / "rank0.log").exists() and (out / "logs" / "rank1.log").exists()  # the trainer's
    latest = find_latest(out / "checkpoints")
    assert latest is not None, list((out / "checkpoints").glob("*")) if (out / "checkpoints").exists() else "none"
    ckpts = [p for p in (out / "checkpoints").iterdir() if p.is_dir()]
    assert len(ckpts) == 1, ckpts
    # one world of 2 ranks (one per launcher) trained 2 steps; each rank wrote its own state file
    import json

    meta = json.loads((ckpts[0] / "meta.json").read_text())
    assert (meta["world_size"], meta["step"]) == (2, 2), meta
    assert (ckpts[0] / "rank0.pt").exists() and (ckpts[0] / "rank1.pt").exists()
