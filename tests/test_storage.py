"""Object storage (pipeline/storage.py, pipeline/data/byte_source.py) against a real S3 server.

SeaweedFS runs on 127.0.0.1 (tests/s3_server.py, started once per process). Against it:
- the store's operations (ranged reads, sizes, listing, whole-object puts, deletes);
- the loader over s3:// yields the same keys, the same videos and the same positions as over the
  local copy of the same shards, for 2 ranks (W-invariance and exactly-once come from the sampler,
  which tests/test_loader.py and tests/test_sampler.py cover; here: nothing changes with the source);
- the shard cache downloads each shard once and the second epoch makes no ranged request;
- the server killed and restarted mid-epoch: the loader retries, and no sample is lost or repeated;
- wrong credentials and a missing bucket: one UserError line each, for prep before any input is read.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import urllib.error
from pathlib import Path

import pytest
import s3_server
import torch
from hiervl import storage
from hiervl.config import Config
from hiervl.errors import UserError
from hiervl.model.text_model import load_tokenizer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server():
    yield s3_server.get()
    s3_server.release()  # no server left running through the rest of the suite


@pytest.fixture
def creds(server, monkeypatch):
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    return server


def _opts(server, **kw) -> dict:
    return {"endpoint_url": server.endpoint, "retries": 2, "backoff_s": 0.05, **kw}


@pytest.fixture(scope="module")
def local_and_remote(tmp_path_factory, server):
    """The same prepared shards, on local disk and under s3://loader-data/ds (uploaded file by file)."""
    from fixtures import write_shards

    local = write_shards(tmp_path_factory.mktemp("local") / "shards", 20, "vp9", per_shard=6)
    server.make_bucket("loader-data")
    fs = server._fs()
    for p in sorted(local.iterdir()):
        with fs.open_output_stream(f"loader-data/ds/{p.name}") as f:
            f.write(p.read_bytes())
    return local, "s3://loader-data/ds"


def _cfg(path: str, server, **storage_kw) -> Config:
    cfg = Config()
    cfg.data = dataclasses.replace(cfg.data, path=str(path), batch_size=3, num_frames=4, size=32, short_side=32,
                                   decoder="pyav", device="cpu", prefetch=0)
    cfg.storage = dataclasses.replace(cfg.storage, endpoint_url=server.endpoint, backoff_s=0.1, **storage_kw)
    return cfg


def _epoch(cfg, world: int = 2) -> list[tuple[int, list[str], torch.Tensor, int]]:
    """(rank, keys, video, position) for every batch of epoch 0 across `world` ranks."""
    from hiervl.data.loader import VideoTextLoader

    out = []
    for rank in range(world):
        loader = VideoTextLoader(cfg, rank=rank, world_size=world, tokenizer=load_tokenizer(cfg.model.text.path))
        loader.set_epoch(0)
        try:
            out += [(rank, b["keys"], b["video"], b["position"]) for b in loader]
        finally:
            loader.close()
    return out


def test_backoff_doubles_and_is_capped():
    assert storage.backoff_delays(6, 0.25) == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert storage.backoff_delays(3, 5.0) == [5.0, 8.0, 8.0]


def test_url_helpers():
    assert storage.is_remote("s3://b/p") and storage.is_remote("https://h/x") and not storage.is_remote("/a/b")
    assert not storage.is_remote(Path("/a")) and not storage.is_remote("file:///a")
    assert storage.join("s3://b/p/", "m.parquet") == "s3://b/p/m.parquet"
    assert storage.parent("s3://b/p/v/a.webm") == "s3://b/p/v"


def test_video_paths_resolve_under_urls(tmp_path):
    from hiervl.dataprep.benchmarks import find_video
    from hiervl.dataprep.sources import read_manifest

    assert find_video("s3://b/vids", "v1.mp4") == "s3://b/vids/v1.mp4"
    (tmp_path / "m.csv").write_text("video,caption\nvideos/a.webm,a cat\n/abs/b.webm,a dog\ns3://o/c.webm,a cow\n")
    got = [s.video for s in read_manifest(tmp_path / "m.csv", base="s3://corpus/set1")]
    assert got == ["s3://corpus/set1/videos/a.webm", "/abs/b.webm", "s3://o/c.webm"]
    got = [s.video for s in read_manifest(tmp_path / "m.csv", videos_dir="gs://v/root")]
    assert got[0] == "gs://v/root/videos/a.webm"
    assert [s.video for s in read_manifest(tmp_path / "m.csv")][0] == str(tmp_path / "videos/a.webm")


def test_store_operations(creds):
    creds.make_bucket("ops")
    store = storage.open_store("s3://ops/some/prefix", _opts(creds))
    store.check(write=True)
    payload = bytes(range(256)) * 40
    store.put("a.bin", payload)
    assert store.read_range("a.bin", 1000, 300) == payload[1000:1300]
    assert store.read("a.bin") == payload and store.size("a.bin") == len(payload)
    assert store.size("missing.bin") is None and not store.exists("missing.bin")
    with pytest.raises(FileNotFoundError):
        store.read("missing.bin")
    assert store.list() == ["a.bin"]  # the write check's probe object is gone
    store.delete("a.bin")
    assert store.list() == []


def test_wrong_credentials_one_line(creds, monkeypatch, tmp_path):
    from hiervl.dataprep.driver import prepare

    creds.make_bucket("creds")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(UserError) as err:
        storage.open_store("s3://creds/x", _opts(creds)).check()
    msg = str(err.value)
    assert "\n" not in msg and "access denied" in msg and "AWS_SECRET_ACCESS_KEY" in msg
    cfg = Config()
    cfg.storage.endpoint_url = creds.endpoint
    t0 = time.time()
    # the input does not exist: the credentials error must come first (before any input is read)
    with pytest.raises(UserError, match="access denied"):
        prepare(cfg, str(tmp_path / "no-such-manifest.csv"), "s3://creds/out")
    assert time.time() - t0 < 10


def test_cli_prints_one_line_for_storage_errors(creds, monkeypatch, tmp_path, capsys):
    """`hiervl prep` with a wrong key and `hiervl train` on a missing bucket: exit 1, one line, no rank started."""
    from hiervl.launch.cli import main

    ep = f"storage.endpoint_url={creds.endpoint}"
    creds.make_bucket("creds")
    tiny = str(Path(__file__).resolve().parents[1] / "configs/tiny.yaml")
    assert main(["train", "--config", tiny, "data.path=s3://no-such-bucket/ds", ep,
                 f"train.out_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bucket 'no-such-bucket' does not exist" in err
    assert not (tmp_path / "run" / "config.yaml").exists()  # stopped before the launcher
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    assert main(["prep", "--config", tiny, "--input", str(tmp_path / "m.csv"), "--out", "s3://creds/x", ep]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "access denied" in err


def test_missing_bucket_one_line(creds, tmp_path, local_and_remote):
    from hiervl.data.loader import DatasetIndex
    from hiervl.dataprep.driver import prepare

    cfg = Config()
    cfg.storage.endpoint_url = creds.endpoint
    with pytest.raises(UserError) as err:
        prepare(cfg, str(tmp_path / "no-such-manifest.csv"), "s3://no-such-bucket/out")
    assert "\n" not in str(err.value) and "bucket 'no-such-bucket' does not exist" in str(err.value)
    with pytest.raises(UserError, match="manifest.parquet does not exist"):
        DatasetIndex("s3://loader-data/not-a-dataset", "train", cfg.storage)


def test_loader_from_s3_matches_local(creds, local_and_remote):
    local, remote = local_and_remote
    want = _epoch(_cfg(local, creds))
    got = _epoch(_cfg(remote, creds, readahead=2, read_threads=4))
    assert [(r, k, p) for r, k, _, p in got] == [(r, k, p) for r, k, _, p in want]
    for (_, _, a, _), (_, _, b, _) in zip(got, want):
        assert torch.equal(a, b)
    keys = [k for _, ks, _, _ in got for k in ks]
    assert len(keys) == len(set(keys)) == 18  # 20 samples, global batch 6, drop: 3 batches, each key once


def test_cache_downloads_each_shard_once(creds, local_and_remote, tmp_path):
    from hiervl.data.loader import VideoTextLoader

    _, remote = local_and_remote
    cfg = _cfg(remote, creds, cache_dir=str(tmp_path / "cache"))
    cfg.data = dataclasses.replace(cfg.data, remainder="pad")  # every sample read, so every shard
    loader = VideoTextLoader(cfg, rank=0, world_size=1, tokenizer=load_tokenizer(cfg.model.text.path))
    try:
        first = [b["keys"] for b in loader]
        src = loader.index.source
        assert src.stats["cache_downloads"] == 4  # 20 samples in shards of 6
        cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.tar"))
        assert cached == [f"train-{i:06d}.tar" for i in range(4)]
        retries = storage.stats["retries"]
        loader.set_epoch(0)
        assert [b["keys"] for b in loader] == first and src.stats["cache_downloads"] == 4
        assert storage.stats["retries"] == retries
    finally:
        loader.close()
    local = local_and_remote[0]
    for p in (tmp_path / "cache").rglob("*.tar"):
        assert p.read_bytes() == (local / p.name).read_bytes()


def test_server_restart_mid_epoch_loses_and_repeats_nothing(creds, local_and_remote):
    from hiervl.data.loader import VideoTextLoader

    local, remote = local_and_remote
    reference = VideoTextLoader(_cfg(local, creds), rank=0, world_size=1, tokenizer=load_tokenizer())
    want = [b["keys"] for b in reference]
    reference.close()
    cfg = _cfg(remote, creds, readahead=0, retries=8)
    loader = VideoTextLoader(cfg, rank=0, world_size=1, tokenizer=load_tokenizer(cfg.model.text.path))
    got, valid = [], []
    before = storage.stats["retries"]
    restarter = None
    try:
        for n, batch in enumerate(loader):
            got.append(batch["keys"])
            valid.append(bool(batch["valid"].all()))
            if n == 1:  # the server dies between batches; it is back about 1 s + start-up later
                creds.stop()
                restarter = threading.Thread(target=lambda: (time.sleep(1.0), creds.start()))
                restarter.start()
    finally:
        loader.close()
        if restarter is not None:
            restarter.join()
    assert got == want and all(valid)
    assert loader.stats["skipped"] == 0
    assert storage.stats["retries"] > before  # the reads after the kill did fail and were retried


def test_loader_over_http_range_requests_matches_local(local_and_remote, creds):
    """http(s):// (read-only): a stdlib server that honours `Range`, serving the local shards."""
    import functools
    import http.server
    import re

    local, _ = local_and_remote

    class RangeHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
            path = Path(self.translate_path(self.path))
            if m is None or not path.is_file():
                return super().do_GET()
            lo, hi = int(m.group(1)), int(m.group(2))
            data = path.read_bytes()[lo:hi + 1]
            self.send_response(206)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(local)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        want = _epoch(_cfg(local, creds), world=1)
        got = _epoch(_cfg(url, creds), world=1)
        assert [k for _, k, _, _ in got] == [k for _, k, _, _ in want]
        assert all(torch.equal(a, b) for (_, _, a, _), (_, _, b, _) in zip(got, want))
        with pytest.raises(UserError, match="read-only"):
            storage.open_store(url).put("x", b"")
    finally:
        httpd.shutdown()
        httpd.server_close()


PREP = {"codec": "vp9", "fps": 4.0, "short_side": 32, "max_seconds": 30.0, "min_seconds": 0.5,
        "keyframe_interval": 1.0, "crf": 32}


def test_remote_source_is_streamed_by_ranged_reads(creds, tmp_path, monkeypatch):
    """A source video at an s3:// URL (dataprep/transcode.py `open_source`) is read through the store in
    ranged reads, never one whole-object GET, and gives the same sample bytes as the local file (also
    for prep.codec=copy, which seeks back to the start); a missing one is refused naming its URL."""
    from hiervl.dataprep.synth import make_corpus
    from hiervl.dataprep.transcode import SampleRefused, process_sample

    manifest = make_corpus(tmp_path / "corpus", 1, seed=5)
    video = next((manifest.parent / "videos").iterdir())
    creds.make_bucket("sources")
    with creds._fs().open_output_stream(f"sources/v/{video.name}") as f:
        f.write(video.read_bytes())
    monkeypatch.setattr(storage, "_DEFAULTS", dict(storage._DEFAULTS))  # restored after the test
    storage.configure(_opts(creds))  # what a Ray prep worker does with storage.*
    ranges, whole = [], []
    real_range, real_read = storage.ArrowStore.read_range, storage.ArrowStore.read
    monkeypatch.setattr(storage.ArrowStore, "read_range",
                        lambda self, name, off, size: ranges.append(size) or real_range(self, name, off, size))
    monkeypatch.setattr(storage.ArrowStore, "read", lambda self, name: whole.append(name) or real_read(self, name))
    url = f"s3://sources/v/{video.name}"
    for prep in (PREP, dict(PREP, codec="copy")):
        want = process_sample({"video": str(video)}, prep)
        ranges.clear()
        assert process_sample({"video": url}, prep) == want
        assert ranges and not whole
    with pytest.raises(SampleRefused) as err:
        process_sample({"video": "s3://sources/v/absent.webm"}, PREP)
    assert err.value.stage == "probe" and err.value.reason == "missing file (looked for s3://sources/v/absent.webm)"
    with pytest.raises(SampleRefused, match="unsupported URL scheme ftp://"):
        process_sample({"video": "ftp://host/v.webm"}, PREP)


def test_prep_into_s3_keeps_other_inputs_splits_and_refuses_a_clash(creds, tmp_path):
    """The input records and the keep/refuse policy (dataprep/dataset_inputs.py) work through the store:
    a second input adds its split to an s3:// dataset (the first's kept), a third that would remake
    a split another input made refuses in one line; nothing local is locked or left behind."""
    import csv

    from hiervl.dataprep.driver import prepare
    from hiervl.dataprep.synth import make_corpus

    corpus = make_corpus(tmp_path / "corpus", 4, seed=3)
    rows = list(csv.DictReader(open(corpus, encoding="utf-8")))

    def manifest(name, idx, split):
        path = tmp_path / name
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["video", "caption", "key", "split"])
            for i in idx:
                w.writerow([str(corpus.parent / rows[i]["video"]), rows[i]["caption"], rows[i]["key"], split])
        return str(path)

    creds.make_bucket("folders")
    cfg = Config()
    cfg.prep.short_side, cfg.prep.fps, cfg.prep.shard_max_samples, cfg.prep.codec = 32, 4.0, 2, "copy"
    cfg.storage.endpoint_url = creds.endpoint
    out = "s3://folders/ds"
    cfg.prep.distributor = "local"  # worker processes of their own all the same: storage.* must reach them
    prepare(cfg, manifest("a.csv", [0, 1], "train"), out, progress=False)
    s = prepare(cfg, manifest("b.csv", [2, 3], "test"), out, progress=False)
    assert s["dataset_counts"] == {"test": 2, "train": 2}
    with pytest.raises(UserError) as err:
        prepare(cfg, manifest("c.csv", [2, 3], "train"), out, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and f"split train in {out} was made from {tmp_path.resolve() / 'a.csv'}" in msg
    names = storage.open_store(out, _opts(creds)).list()
    assert len([n for n in names if n.startswith("input-")]) == 2
    assert {"train-000000.tar", "test-000000.tar", "manifest.parquet", "dataset.json"} <= set(names)
    assert not any(n.endswith(".tmp") or n.endswith(".lock") for n in names)
    info = json.loads(storage.open_store(out, _opts(creds)).read("dataset.json"))
    assert info["counts"] == {"test": 2, "train": 2} and len(info["inputs"]) == 2


def test_decode_worker_processes_read_from_s3(creds, local_and_remote):
    """Issue 14's decode pool (data.decode_workers) over s3://: each worker opens its own store (with the
    loader's credentials, whenever the fork server started) and the epoch equals the local in-process one."""
    from hiervl.data.loader import VideoTextLoader

    local, remote = local_and_remote
    want = _epoch(_cfg(local, creds), world=1)
    cfg = _cfg(remote, creds)
    cfg.data = dataclasses.replace(cfg.data, decode_workers=2, prefetch=1)
    loader = VideoTextLoader(cfg, rank=0, world_size=1, tokenizer=load_tokenizer(cfg.model.text.path))
    try:
        got = [(b["keys"], b["video"], b["position"], bool(b["valid"].all())) for b in loader]
        assert loader.stats["pool_decoded"] == 18 and loader.stats["skipped"] == 0
    finally:
        loader.close()
    assert [(k, p) for k, _, p, _ in got] == [(k, p) for _, k, _, p in want] and all(v for *_, v in got)
    assert all(torch.equal(a, b) for (_, a, _, _), (_, _, b, _) in zip(got, want))


class _Flaky(storage._Retrying):
    """A store operation whose answers are scripted: each item is a value to return or an exception to raise."""

    url, where = "s3://bucket/ds", "http://127.0.0.1:1"

    def __init__(self, retries: int = 3):
        self.opts = {"retries": retries, "backoff_s": 0.0}

    def run(self, *answers):
        answers = list(answers)

        def fn():
            answer = answers.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            return answer
        try:
            return self._retry("read x", fn)
        finally:
            self.left = len(answers)


def test_a_denial_is_fatal_at_once_unless_the_same_store_was_answered_before():
    """A wrong key is one UserError at the first request. After an answer, a denial (SeaweedFS answers 403
    for a moment after a restart) is retried as a 5xx is; still denied after the last retry, the same
    UserError. Other 4xx stay errors at once."""
    denied = OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied")
    fresh = _Flaky()
    with pytest.raises(UserError, match="access denied"):
        fresh.run(denied, b"never read")
    assert fresh.left == 1  # not retried
    store = _Flaky()
    assert store.run(b"ok") == b"ok"
    before = storage.stats["retries"]
    assert store.run(denied, denied, b"back") == b"back"  # a restarting server: retried, then answered
    assert storage.stats["retries"] == before + 2
    with pytest.raises(UserError, match="access denied"):
        store.run(denied, denied, denied, denied)  # 1 + 3 retries, all denied: the key is wrong after all
    assert store.left == 0
    gone = urllib.error.HTTPError("http://x", 404, "Not Found", {}, None)
    with pytest.raises(OSError, match="HTTP 404"):
        store.run(gone, b"never read")
