"""Master ports on one machine: the launcher holds the rendezvous port itself (launch/processes.py
`host_rendezvous`), so runs started in the same second never collide; a port a multi-node launch
must use but cannot have is one line, not a traceback."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures import LIGHT_LAUNCH
from hiervl.launch.processes import PortInUse, host_rendezvous

ROOT = Path(__file__).resolve().parents[1]


def _held_port():
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    s.listen()
    return s, s.getsockname()[1]


def test_taken_port_moves_for_a_local_run_and_is_one_line_for_a_node():
    holder, port = _held_port()
    with holder:
        store, got, env = host_rendezvous(port, any_free=True)
        assert got != port and got > 0 and env == {"TORCHELASTIC_USE_AGENT_STORE": "True"}
        with pytest.raises(PortInUse, match=f"launch.master_port {port} is already in use on "):
            host_rendezvous(port, any_free=False)
        del store


def test_free_port_is_kept_and_held_until_released():
    holder, port = _held_port()
    holder.close()
    store, got, _ = host_rendezvous(port, any_free=False)
    assert got == port
    with pytest.raises(PortInUse):  # held: a second launcher cannot take it
        host_rendezvous(port, any_free=False)
    del store


@pytest.fixture(scope="module")
def shards(prepared_dataset_16):
    return prepared_dataset_16  # the session's (conftest.py): 1-step runs, any small dataset will do


@pytest.mark.integration
def test_two_runs_started_in_the_same_second_both_train(shards, tmp_path):
    """Two `hiervl train` runs started together on the same configured master port: both finish.
    Before, both found the port free and one rank 0 died with EADDRINUSE: the window between a
    launcher's check and its rank 0's bind is a whole torch import (seconds), so two runs started
    together met it nearly every time (this ran 5, then 2 such pairs; one fails as surely)."""
    holder, port = _held_port()
    holder.close()  # free now: both runs find launch.master_port free, as two runs at 29500 did
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    procs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        cmd = [sys.executable, "-m", "hiervl.launch.cli", "train", "--config", str(ROOT / "configs/tiny.yaml"),
               f"data.path={shards}", f"train.out_dir={out}", "train.ranks=1", "data.batch_size=4",
               "train.steps=1", "queue.size=8", "optimizer.warmup_steps=1", f"launch.master_port={port}",
               *LIGHT_LAUNCH]
        procs.append((out, subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True)))
    t0 = time.time()
    for out, p in procs:
        try:
            text = p.communicate(timeout=max(10.0, 400 - (time.time() - t0)))[0]
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 0, f"{out.name}:\n{text[-3000:]}"
        status = json.loads((out / "status.json").read_text())
        assert (status["state"], status["step"]) == ("finished", 1), status
