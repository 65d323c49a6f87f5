"""`hiervl train` and `hiervl submit deepspeed` against hostile or mistaken runs (issue 25): a second
train into one out_dir is refused, a checkpoint of another model is refused before any rank starts
(config.yaml untouched), a dataset with no readable sample exits non-zero in one line, and a `;` or
a space in train.out_dir reaches pdsh's remote shell as text (nothing runs, the launch works)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import LIGHT_LAUNCH, write_shards
from test_evaluate import SMALL, TINY, make_model, write_fake_checkpoint

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           DS_ACCELERATOR="cpu")
RUN = [*SMALL, "data.batch_size=2", "train.ranks=1", "train.log_every=1", "checkpoint.every_steps=0",
       "optimizer.warmup_steps=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("hostile_train") / "shards", 8, "vp9", split="train", per_shard=4)


def test_second_train_into_one_out_dir_is_refused(shards, tmp_path, capsys):
    from hiervl.dataprep.out_lock import train_lock
    from hiervl.launch.cli import main

    out = tmp_path / "run"
    out.mkdir()
    with train_lock(out):  # this process is the first `hiervl train` into out
        code = main(["train", "--config", TINY, *RUN, f"data.path={shards}", f"train.out_dir={out}", "train.steps=1",
                     f"launch.master_port={_free_port()}"])
    err = capsys.readouterr().err
    assert code == 1
    line = [ln for ln in err.splitlines() if "error" in ln]
    assert len(line) == 1 and f"is locked by another `hiervl train` (pid {os.getpid()}" in line[0], err
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()
    assert not (out / ".hiervl-train.lock").exists()  # released by its holder


def test_resuming_another_models_checkpoint_is_refused_before_ranks(shards, tmp_path, capsys):
    from hiervl.config import load_config
    from hiervl.launch.cli import main

    out = tmp_path / "run"
    cfg = load_config(TINY, SMALL + [f"data.path={shards}"])  # preset hit
    write_fake_checkpoint(make_model(cfg), cfg, out)
    (out / "config.yaml").write_text("# the first run's config\n")
    code = main(["train", "--config", TINY, *RUN, f"data.path={shards}", f"train.out_dir={out}", "train.steps=2",
                 "model.preset=flat", f"launch.master_port={_free_port()}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "was written for another model (model.preset='hit' there, 'flat' here" in err
    assert (out / "config.yaml").read_text() == "# the first run's config\n"
    assert not (out / "logs").exists()  # no rank started


def test_training_on_nothing_exits_non_zero(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = write_shards(tmp_path / "shards", 8, "vp9", split="train", per_shard=4)
    rows = pq.read_table(data / "manifest.parquet").to_pylist()
    for r in rows:  # every sample's bytes lie outside its tar
        r["video_offset"] = 10**9 + r["video_offset"]
    pq.write_table(pa.Table.from_pylist(rows), data / "manifest.parquet")
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "hiervl.launch.cli", "train", "--config", TINY, *RUN,
                          f"data.path={data}", f"train.out_dir={out}", "train.steps=20", "train.max_bad_steps=3",
                          f"launch.master_port={_free_port()}"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0, res.stdout[-2000:] + res.stderr[-3000:]
    text = res.stdout + res.stderr
    assert "training on nothing: no readable sample in 3 global batches in a row at step 0" in text, text[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == 0 and status["checkpoint"] is None
    assert not (out / "checkpoints").exists()


def test_pdsh_command_quotes_out_dir(shards, tmp_path):
    """A fake pdsh that does what pdsh does (joins its words into one line for each host's shell,
    %n = node rank) runs two nodes on this machine: the run trains in a folder named with `;` and
    spaces, and the `touch` in the name never runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pdsh").write_text(
        "#!/usr/bin/env python3\n"
        "import subprocess, sys\n"
        "args = sys.argv[1:]\n"
        "hosts = []\n"
        "while args and args[0].startswith('-'):\n"
        "    flag = args.pop(0)\n"
        "    if flag in ('-f', '-w'):\n"
        "        value = args.pop(0)\n"
        "        hosts = value.split(',') if flag == '-w' else hosts\n"
        "line = ' '.join(args)\n"
        "procs = [subprocess.Popen(['sh', '-c', line.replace('%n', str(i))]) for i in range(len(hosts))]\n"
        "sys.exit(max(p.wait() for p in procs))\n")
    (bin_dir / "ssh").write_text("#!/bin/sh\nexit 0\n")  # DeepSpeed's passwordless-ssh check
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    pwned = tmp_path / "PWNED"
    out = tmp_path / f"my runs;touch {pwned};x"
    env = dict(ENV, PATH=f"{bin_dir}:{os.environ['PATH']}")
    res = subprocess.run([sys.executable, "-m", "hiervl.launch.cli", "submit", "deepspeed", "--config", TINY,
                          "--hosts", "127.0.0.1,localhost", "--master-addr", "127.0.0.1", *RUN, *LIGHT_LAUNCH, f"data.path={shards}",
                          f"train.out_dir={out}", "train.steps=2", f"launch.master_port={_free_port()}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert not pwned.exists()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000002"
