"""A multi-node run whose checkpoints are not shared is refused before any rank starts
(launch/shared_checkpoints.py): one line naming checkpoint.dir=s3://... and launch.shared_fs=true.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hiervl.config import load_config
from hiervl.errors import UserError
from hiervl.launch.shared_checkpoints import check_shared_checkpoints, filesystem_type, is_this_machine

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny.yaml")
MOUNTS = ("/dev/vda / ext4 rw 0 0\n"
          "nas:/export /shared nfs4 rw 0 0\n"
          "lus@o2ib:/fs /lustre lustre rw 0 0\n"
          "tmpfs /shared/tmp tmpfs rw 0 0\n")


def test_filesystem_type_is_the_longest_mount_above_the_path():
    assert filesystem_type("/shared/runs/a", MOUNTS) == "nfs4"
    assert filesystem_type("/shared/tmp/x", MOUNTS) == "tmpfs"  # a local mount inside the network one
    assert filesystem_type("/lustre/u/run", MOUNTS) == "lustre"
    assert filesystem_type("/home/u/run", MOUNTS) == "ext4"
    assert filesystem_type("/sharedness/x", MOUNTS) == "ext4"  # a name that only starts like a mount point


def test_hosts_of_this_machine():
    assert is_this_machine("127.0.0.1") and is_this_machine("localhost")
    assert not is_this_machine("node-that-does-not-resolve.invalid")
    assert not is_this_machine("192.0.2.7")  # TEST-NET-1: no machine has it


def _cfg(tmp_path, *overrides):
    return load_config(TINY, [f"train.out_dir={tmp_path / 'run'}", *overrides])


def test_rule(tmp_path, monkeypatch):
    local = filesystem_type(tmp_path)
    with pytest.raises(UserError) as err:
        check_shared_checkpoints(_cfg(tmp_path), 2, ["n1", "n2"])
    msg = str(err.value)
    assert "\n" not in msg and f"train.out_dir={tmp_path / 'run'} is on {local}" in msg
    assert "checkpoint.dir=s3://BUCKET/PREFIX" in msg and "launch.shared_fs=true" in msg
    with pytest.raises(UserError):
        check_shared_checkpoints(_cfg(tmp_path), 2)  # slurm: hosts unknown at submission
    check_shared_checkpoints(_cfg(tmp_path), 1, ["n1"])  # one node: nothing to share
    check_shared_checkpoints(_cfg(tmp_path, "checkpoint.dir=s3://b/run"), 2, ["n1", "n2"])
    check_shared_checkpoints(_cfg(tmp_path, "launch.shared_fs=true"), 2, ["n1", "n2"])
    check_shared_checkpoints(_cfg(tmp_path), 2, ["127.0.0.1", "localhost"])  # one machine: one folder
    monkeypatch.setattr("hiervl.launch.shared_checkpoints.filesystem_type", lambda path: "lustre")
    check_shared_checkpoints(_cfg(tmp_path), 2, ["n1", "n2"])


@pytest.mark.parametrize("backend", [["deepspeed", "--hosts", "n1,n2", "--no-ssh", "--node-rank", "0"],
                                     ["deepspeed", "--hosts", "n1,n2"],
                                     ["slurm", "--nodes", "2"]])
def test_submit_refuses_before_anything_starts(tmp_path, backend):
    """On the old code the deepspeed launcher started (and waited for n2 up to the start-up timeout)
    and slurm submitted; now one line, exit 1, within seconds, nothing written."""
    out = tmp_path / "run"
    t0 = time.time()
    try:
        res = subprocess.run([sys.executable, "-m", "hiervl.launch.cli", "submit", *backend, "--config", TINY,
                              f"train.out_dir={out}", "launch.master_port=29731"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, env=dict(os.environ, PATH="/nonexistent"))  # no sbatch/pdsh either
    except subprocess.TimeoutExpired:
        pytest.fail(f"submit {backend[0]} was still running after 60 s (it started the run instead of refusing it)")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "2 nodes" in lines[0] and "checkpoint.dir=s3://BUCKET/PREFIX" in lines[0] and "Traceback" not in res.stderr
    assert not out.exists() or not any(out.iterdir())  # no config.yaml, hostfile or sbatch script
    assert time.time() - t0 < 60
