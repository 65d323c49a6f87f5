"""`hiervl prep` into s3://, then `hiervl train` and `hiervl eval` from it, against the local-disk path.

On a real S3-compatible server (SeaweedFS, tests/s3_server.py) and the session's local Ray cluster
(conftest.py) for the datasets:
- the dataset written to s3:// is byte for byte the local one (every shard, index, stats record,
  manifest, dataset.json), and a rerun writes nothing and changes nothing;
- a manifest and videos that are themselves in the bucket, prepared to local disk (the endpoint from
  `storage.endpoint_url` only, carried to the Ray workers), give the same samples (same video bytes);
- training from s3:// (DeepSpeed's launcher, 1 CPU rank) gives the same loss and the same sample
  keys at every step as from the local copy; eval from s3:// gives the same metrics;
- the secret key is in no file the run wrote (dataset, resolved config, checkpoint).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
RAY = "prep.distributor=ray"  # the session's Ray cluster (conftest.py)
PREP = ["prep.codec=copy", "prep.short_side=32", "prep.shard_max_samples=6", "prep.num_workers=1"]
TRAIN = ["model.preset=hit", "data.batch_size=4", "train.steps=4", "train.log_every=1", "train.log_samples=true",
         "checkpoint.every_steps=0", "optimizer.warmup_steps=2", "queue.enabled=true", "queue.size=8"]


@pytest.fixture(scope="module")
def server():
    yield s3_server.get()
    s3_server.release()  # no server left running through the rest of the suite


@pytest.fixture(scope="module")
def env(server):
    with s3_server.environ(server):
        yield dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   DS_ACCELERATOR="cpu", RAY_USAGE_STATS_ENABLED="0")


@pytest.fixture(scope="module")
def datasets(server, env, ray_cluster, tmp_path_factory):
    """(local dir, s3 URL, summaries): the same corpus prepared to both with `hiervl prep`, in one Ray."""
    from fixtures import start_ray
    from hiervl.dataprep.synth import make_corpus
    from hiervl.launch.cli import main

    start_ray(restart=True)  # the session's cluster predates `env`: its workers would have no S3 credentials
    root = tmp_path_factory.mktemp("e2e")
    manifest = make_corpus(root / "corpus", 20, seed=3)
    server.make_bucket("e2e")
    ep = f"storage.endpoint_url={server.endpoint}"
    base = ["prep", "--config", str(ROOT / "configs/tiny.yaml"), "--input", str(manifest)]
    # first: the corpus itself in the bucket, remote manifest and remote videos (its relative paths
    # resolve to the bucket), prepared on Ray workers that get the endpoint from the task only
    fs = server._fs()
    for p in [manifest, *sorted((manifest.parent / "videos").iterdir())]:
        with fs.open_output_stream(f"e2e/corpus/{p.relative_to(manifest.parent)}") as f:
            f.write(p.read_bytes())
    assert main(["prep", "--config", str(ROOT / "configs/tiny.yaml"), "--input", "s3://e2e/corpus/manifest.csv",
                 "--out", str(root / "from-remote"), *PREP, RAY, ep]) == 0  # the endpoint reaches the workers
    assert main([*base, "--out", str(root / "local"), *PREP, RAY]) == 0
    assert main([*base, "--out", "s3://e2e/shards", *PREP, RAY, ep]) == 0
    first = _objects(server, "e2e/shards")
    assert main([*base, "--out", "s3://e2e/shards", *PREP, RAY, ep]) == 0  # the rerun
    rerun = _objects(server, "e2e/shards")
    return root, "s3://e2e/shards", first, rerun


def _objects(server, prefix: str) -> dict[str, bytes]:
    from pyarrow import fs as pafs
    fs = server._fs()
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=False))
    out = {}
    for i in infos:
        with fs.open_input_stream(i.path) as f:
            out[i.base_name] = f.read()
    return out


def test_prep_to_s3_gives_the_local_bytes_and_reruns_idempotently(server, datasets):
    root, _, first, rerun = datasets
    local = {p.name: p.read_bytes() for p in sorted((root / "local").iterdir()) if p.is_file()}
    assert any(n.endswith(".tar") for n in local) and "manifest.parquet" in local and "dataset.json" in local
    assert sorted(first) == sorted(local)
    for name in local:
        assert first[name] == local[name], name
    assert rerun == first
    assert SECRET not in b"".join(first.values())
    from hiervl.launch.cli import main
    # --verify on the s3:// dataset: webdataset and DALI re-read a downloaded copy against the manifest
    assert main(["prep", "--verify", datasets[1], f"storage.endpoint_url={server.endpoint}"]) == 0


def test_remote_manifest_and_videos_give_the_same_samples(server, datasets):
    root = datasets[0]
    remote = pq.read_table(root / "from-remote" / "manifest.parquet").to_pylist()
    local = pq.read_table(root / "local" / "manifest.parquet").to_pylist()
    assert [(r["key"], r["content_hash"], r["shard"]) for r in remote] == \
        [(r["key"], r["content_hash"], r["shard"]) for r in local]
    assert all(r["source"].startswith("s3://e2e/corpus/videos/") for r in remote)


SECRET = s3_server.SECRET_KEY.encode()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(data: str, out: Path, env: dict, extra=()) -> dict:
    cmd = [sys.executable, "-m", "hiervl.launch.cli", "train", "--config", str(ROOT / "configs/tiny.yaml"), *TRAIN,
           f"data.path={data}", f"train.out_dir={out}", "train.ranks=1",
           f"launch.master_port={_free_port()}", *extra]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    metrics = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    samples = {r["step"]: r["keys"] for r in map(json.loads, (out / "samples" / "rank0.jsonl").read_text().splitlines())}
    return {"metrics": metrics, "samples": samples}


def test_train_and_eval_from_s3_equal_local(server, datasets, env, tmp_path, capsys):
    from hiervl.launch.cli import main

    root, url = datasets[0], datasets[1]
    local = _train(str(root / "local"), tmp_path / "local-run", env)
    remote = _train(url, tmp_path / "s3-run", env, [f"storage.endpoint_url={server.endpoint}"])
    assert sorted(remote["metrics"]) == sorted(local["metrics"]) == [1, 2, 3, 4]
    for step in local["metrics"]:
        assert remote["metrics"][step]["loss"] == pytest.approx(local["metrics"][step]["loss"], abs=1e-6), step
    assert remote["samples"] == local["samples"]
    for p in (tmp_path / "s3-run").rglob("*"):
        if p.is_file():
            assert SECRET not in p.read_bytes(), p  # resolved config, checkpoint, logs: no credential

    results = {}
    for name, data in (("local", str(root / "local")), ("s3", url)):
        out = tmp_path / f"eval-{name}"
        code = main(["eval", "--checkpoint", str(tmp_path / "s3-run"), "--data", data, "--split", "test",
                     "--out", str(out), "--no-export", "--no-diagnostics", f"storage.endpoint_url={server.endpoint}"])
        assert code == 0, capsys.readouterr()
        results[name] = json.loads((out / "eval.json").read_text())
    assert results["s3"]["num_videos"] == results["local"]["num_videos"] == 4
    assert results["s3"]["t2v"] == results["local"]["t2v"] and results["s3"]["v2t"] == results["local"]["v2t"]


def test_prep_to_s3_killed_half_way_then_rerun_gives_the_same_bytes(server, env, tmp_path):
    """SIGKILL of `hiervl prep --out s3://...` mid-run: no partial object is visible; the rerun runs only
    the missing shards and the bucket then holds exactly the uninterrupted run's bytes."""
    import signal
    import time

    from hiervl.config import load_config
    from hiervl.dataprep.driver import prepare
    from hiervl.dataprep.synth import make_corpus

    manifest = make_corpus(tmp_path / "corpus", 20, seed=5)
    over = ["prep.short_side=32", "prep.fps=4", "prep.shard_max_samples=2", "prep.num_workers=1",
            f"storage.endpoint_url={server.endpoint}"]
    cfg = load_config(ROOT / "configs/tiny.yaml", over)
    server.make_bucket("crash")
    prepare(cfg, str(manifest), str(tmp_path / "ref"), progress=False)  # the reference, transcoded (vp9)
    ref = {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir() if p.is_file()}
    cmd = [sys.executable, "-m", "hiervl.launch.cli", "prep", "--config", str(ROOT / "configs/tiny.yaml"),
           "--input", str(manifest), "--out", "s3://crash/ds", *over]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if sum(n.endswith(".stats.json") for n in _names(server, "crash/ds")) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "prep finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker processes, one mid-upload
    proc.wait()
    time.sleep(0.5)
    left = _objects(server, "crash/ds")
    done = sum(n.endswith(".stats.json") for n in left)
    assert 2 <= done < 10 and "manifest.parquet" not in left
    for name, data in left.items():  # whatever is there is whole: the reference's bytes
        assert data == ref[name], name
    summary = prepare(cfg, str(manifest), "s3://crash/ds", progress=False)
    assert summary["shards_run"] == 10 - done
    assert _objects(server, "crash/ds") == ref


def _names(server, prefix: str) -> list[str]:
    from pyarrow import fs as pafs
    return [i.base_name for i in server._fs().get_file_info(pafs.FileSelector(prefix, allow_not_found=True))]
