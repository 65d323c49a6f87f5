"""Checkpoints in an object store (`checkpoint.dir=s3://...`, pipeline/train/checkpoint_remote.py) on a real
S3 server (SeaweedFS, tests/s3_server.py).

- The store layer alone: a tag without meta.json is never picked, `latest` is followed, a damaged newest
  checkpoint (a file of other bytes) is skipped for the newest intact one, prune keeps `keep`.
- Real training: 2 ranks write to s3:// (each its own files; meta.json with every rank's files; `latest`
  last; nothing under the local run folder's checkpoints/), then 1 rank in a fresh run folder (no local
  file of the first run) resumes from the remote latest through a universal conversion (ZeRO-1), and
  every step's keys and LR equal an uninterrupted 1-rank run at the same global batch (the losses too,
  up to the resume: after it a changed world size derives fresh RNG streams).
"""

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import s3_server
from fixtures import LIGHT_LAUNCH

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "ckpt"


@pytest.fixture(scope="module")
def server():
    yield s3_server.get()
    s3_server.release()


@pytest.fixture(scope="module")
def env(server):
    with s3_server.environ(server, AWS_ENDPOINT_URL=server.endpoint):
        server.make_bucket(BUCKET)
        yield dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def _objects(server, prefix: str) -> dict[str, bytes]:
    from pyarrow import fs
    pfs = server._fs()
    infos = pfs.get_file_info(fs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    out = {}
    for i in infos:
        if i.type == fs.FileType.File:
            with pfs.open_input_stream(i.path) as f:
                out[i.path[len(BUCKET) + len(prefix) + 2:]] = f.read()
    return out


def _fake_checkpoint(local: Path, tag: str, ranks: int = 2) -> Path:
    d = local / tag
    d.mkdir(parents=True)
    for r in range(ranks):
        (d / f"rank{r}.pt").write_bytes(f"{tag} rank {r}".encode() * 100)
    (d / "mp_rank_00_model_states.pt").write_bytes(os.urandom(5000))
    return d


def _commit(remote, local: Path, tag: str) -> None:
    from hiervl.run_dir import file_manifest
    remote.upload(local / tag, tag)
    remote.commit(tag, {"tag": tag, "step": int(tag[4:]), "files": file_manifest(local / tag)})


def test_store_layer_follows_latest_skips_partial_and_damaged_and_prunes(server, env, tmp_path):
    from hiervl.train.checkpoint_remote import RemoteCheckpoints
    from pyarrow import fs

    url = f"s3://{BUCKET}/unit-{uuid.uuid4().hex[:8]}"
    remote = RemoteCheckpoints(url)
    local = tmp_path / "written"
    assert remote.fetch_newest_intact(tmp_path / "cache") is None  # nothing there: a fresh start
    for tag in ("step00000002", "step00000004"):
        _fake_checkpoint(local, tag)
        _commit(remote, local, tag)
    # a write killed after some uploads: files but no meta.json, and newer than `latest`
    _fake_checkpoint(local, "step00000006")
    remote.upload(local / "step00000006", "step00000006")
    assert remote.latest() == "step00000004"
    assert [t for t, _ in remote.candidates()] == ["step00000004", "step00000002"]

    cache = tmp_path / "cache"
    tag, meta = remote.fetch_newest_intact(cache)
    assert tag == "step00000004"
    for name in ("rank0.pt", "rank1.pt", "mp_rank_00_model_states.pt"):
        assert (cache / tag / name).read_bytes() == (local / tag / name).read_bytes()
    assert json.loads((cache / tag / "meta.json").read_text()) == meta

    # the newest complete one damaged (same size, other bytes): the one before it, with a warning
    pfs = server._fs()
    path = f"{url[5:]}/step00000004/rank1.pt"
    size = len((local / "step00000004" / "rank1.pt").read_bytes())
    with pfs.open_output_stream(path) as f:
        f.write(b"x" * size)
    tag, _ = remote.fetch_newest_intact(tmp_path / "cache2")
    assert tag == "step00000002"
    assert not (tmp_path / "cache2" / "step00000004").exists()  # the damaged copy is not left behind

    # prune keeps the newest `keep` complete ones and drops the partial one older than the newest complete
    for tag in ("step00000008", "step00000010"):
        _fake_checkpoint(local, tag)
        _commit(remote, local, tag)
    remote.prune(keep=2)
    assert remote.tags() == ["step00000008", "step00000010"]
    assert remote.latest() == "step00000010"
    assert pfs.get_file_info(f"{url[5:]}/step00000006/rank0.pt").type == fs.FileType.NotFound


TRAIN = ["--config", str(ROOT / "configs/tiny.yaml"), "train.log_every=1", "train.log_samples=true",
         "optimizer.warmup_steps=2", "train.global_batch=4", "checkpoint.every_steps=2", "checkpoint.keep=2",
         "train.zero_stage=1",  # ZeRO-1: another world size resumes through a universal conversion
         *LIGHT_LAUNCH]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(shards, out: Path, env: dict, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hiervl.launch.cli", "train", *TRAIN, f"data.path={shards}", f"train.out_dir={out}",
           f"launch.master_port={_free_port()}", *extra]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def _steps(out: Path, ranks: int) -> dict:
    """step -> (loss, lr, keys of the global batch in rank order)."""
    metrics = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    keys: dict = {}
    for r in range(ranks):
        for row in map(json.loads, (out / "samples" / f"rank{r}.jsonl").read_text().splitlines()):
            keys.setdefault(row["step"], []).extend(row["keys"])
    return {s: (m["loss"], m["lr"], keys[s]) for s, m in metrics.items()}


@pytest.mark.integration
@pytest.mark.timeout(1500)
def test_two_ranks_write_s3_one_rank_elsewhere_resumes_and_equals_one_run(server, env, prepared_dataset_16, tmp_path):
    shards = prepared_dataset_16
    prefix = f"run-{uuid.uuid4().hex[:8]}"
    url = f"s3://{BUCKET}/{prefix}"

    a = tmp_path / "a"
    # 6 steps planned (the LR schedule of the whole run), stopped after 4 as by a preemption
    _train(shards, a, dict(env, HIERVL_FAULT="stop-after-step", HIERVL_FAULT_AFTER="4"), "train.ranks=2",
           "train.steps=6", f"checkpoint.dir={url}")
    objects = _objects(server, prefix)
    assert objects["latest"].decode().strip() == "step00000004"
    assert sorted({k.split("/")[0] for k in objects if "/" in k}) == ["step00000002", "step00000004"]
    meta = json.loads(objects["step00000004/meta.json"])
    assert {"rank0.pt", "rank1.pt", "mp_rank_00_model_states.pt"} <= set(meta["files"]), sorted(meta["files"])
    for name, want in meta["files"].items():  # every rank's file, whole, as the manifest says
        data = objects[f"step00000004/{name}"]
        assert (len(data), hashlib.sha256(data).hexdigest()) == (want["size"], want["sha256"]), name
    assert not (a / "checkpoints").exists()  # nothing of the checkpoints is kept in the run folder
    assert not any((a / ".checkpoint-staging").rglob("*.pt"))  # staged copies deleted after the upload

    # another "machine": a fresh run folder, 1 rank (universal conversion of the downloaded copy)
    b = tmp_path / "b"
    _train(shards, b, env, "train.ranks=1", "train.steps=6", f"checkpoint.dir={url}")
    log = (b / "logs" / "rank0.log").read_text()
    assert f"resumed from {b}/.checkpoint-cache/" in log and "at step 4" in log and "via universal checkpoint (2 -> 1" \
        in log, log[-3000:]
    assert json.loads(_objects(server, prefix)["step00000006/meta.json"])["world_size"] == 1

    # eval and export read the run from the store itself (a fresh cache, no --out into the cache)
    cli = [sys.executable, "-m", "hiervl.launch.cli"]
    cached = dict(env, XDG_CACHE_HOME=str(tmp_path / "cache"))
    res = subprocess.run([*cli, "eval", "--checkpoint", url, "--data", str(shards), "--split", "test", "--no-diagnostics",
                          "--out", str(tmp_path / "eval-s3")], env=cached, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert json.loads((tmp_path / "eval-s3" / "eval.json").read_text())["checkpoint_step"] == 6  # the newest
    res = subprocess.run([*cli, "export", f"{url}/step00000004", "--out", str(tmp_path / "export")], env=cached, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert json.loads((tmp_path / "export" / "hiervl-export.json").read_text())["source"]["step"] == 4  # the one named
    res = subprocess.run([*cli, "eval", "--checkpoint", f"{url}/step00000005", "--data", str(shards), "--out",
                          str(tmp_path / "none")], env=cached, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1 and "no complete checkpoint there" in res.stderr and "Traceback" not in res.stderr, res.stderr

    ref = tmp_path / "ref"
    _train(shards, ref, env, "train.ranks=1", "train.steps=6")
    reference = _steps(ref, 1)
    assert sorted(_steps(a, 2)) == [1, 2, 3, 4]
    got = {**_steps(a, 2), **_steps(b, 1)}
    assert sorted(got) == list(range(1, 7))
    for step, (loss, lr, keys) in reference.items():
        assert got[step][2] == keys, f"step {step}: keys {got[step][2]} vs one run {keys}"  # the data position
        assert got[step][1] == pytest.approx(lr, rel=1e-9), f"step {step}: lr {got[step][1]} vs {lr}"  # the schedule
        if step <= 4:  # after the resume on 1 rank, per-rank RNG streams are derived afresh (trainer._resume)
            assert got[step][0] == pytest.approx(loss, rel=2e-4, abs=1e-5), f"step {step}: loss {got[step][0]} vs {loss}"
