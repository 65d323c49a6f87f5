"""What a prep output folder holds: one prep at a time (the lock), and splits made by several inputs
side by side (dataprep/out_lock.py, dataprep/dataset_inputs.py, dataprep/driver.py). The preps run
on the local distributor (no Ray start): what is checked here is the driver's, whatever runs the tasks."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hiervl.atomic_write import temp_path
from hiervl.config import Config
from hiervl.data.loader import DatasetIndex
from hiervl.dataprep.driver import _clean, prepare
from hiervl.dataprep.out_lock import LOCK_FILE, PrepLock
from hiervl.dataprep.synth import make_corpus
from hiervl.errors import UserError
from hiervl.storage import open_store

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return make_corpus(root, 12, seed=3)


def _cfg(**prep):
    cfg = Config()
    cfg.prep.short_side, cfg.prep.fps, cfg.prep.shard_max_samples = 32, 4.0, 2
    cfg.prep.distributor = "local"
    for k, v in prep.items():
        setattr(cfg.prep, k, v)
    return cfg


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _manifest(corpus: Path, path: Path, rows: range, splits) -> Path:
    """A manifest of the corpus' videos `rows`, with the given split per row."""
    src = list(csv.DictReader(open(corpus, encoding="utf-8")))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["video", "caption", "key", "split"])
        for i, split in zip(rows, splits):
            w.writerow([str(corpus.parent / src[i]["video"]), src[i]["caption"], src[i]["key"], split])
    return path


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_refuses_live_holder_takes_over_stale_and_clean_spares_live_writers(tmp_path):
    """Item 1 (unit): who holds the lock is named; a dead holder's lock is taken over; the clean-up
    never removes a temporary file whose writer (pid in its name) still runs."""
    out = tmp_path / "out"
    out.mkdir()
    with PrepLock(out):
        held = json.loads((out / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(UserError, match=rf"is locked by another `hiervl prep` \(pid {os.getpid()} on host "
                                            rf"{socket.gethostname()}, since .*\); wait for it to finish"):
            PrepLock(out).acquire()
    assert not (out / LOCK_FILE).exists()  # released by its holder
    (out / LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "since": "x"}))
    with PrepLock(out) as lock:  # stale: taken over
        assert json.loads((out / LOCK_FILE).read_text()) == lock.me
    (out / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere-node7", "since": "x"}))
    with pytest.raises(UserError, match=rf"pid 1 on host elsewhere-node7.*delete {out / LOCK_FILE}"):
        PrepLock(out).acquire()
    (out / LOCK_FILE).unlink()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = temp_path(out / "train-000000.tar").name.replace(f".{os.getpid()}.", f".{sleeper.pid}.")
        dead = temp_path(out / "train-000001.tar").name.replace(f".{os.getpid()}.", f".{_dead_pid()}.")
        (out / live).write_bytes(b"being written")
        (out / dead).write_bytes(b"left by a killed run")
        _clean(open_store(out), [])
        assert (out / live).exists() and not (out / dead).exists()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.integration
def test_second_prep_into_the_same_out_refuses_and_the_first_finishes_intact(corpus, tmp_path):
    """Item 1: two `hiervl prep` into one --out at once; the second used to delete the first's
    temporary files (and the first crashed). Now it refuses in one line naming the holder."""
    manifest = _manifest(corpus, tmp_path / "m.csv", range(12), ["train"] * 12)
    ref = tmp_path / "ref"
    prepare(_cfg(), manifest, ref, progress=False)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hiervl.launch.cli", "prep", "--input", str(manifest), "--out", str(out),
           "prep.short_side=32", "prep.fps=4", "prep.shard_max_samples=2", "prep.num_workers=1"]
    first = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / LOCK_FILE).exists():
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)  # the holder stays mid-run (alive, lock held) while the second tries
        try:
            assert (out / LOCK_FILE).exists() and first.poll() is None
            second = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 1
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in second.stderr
        assert f"is locked by another `hiervl prep` (pid {first.pid} on host {socket.gethostname()}" in err[0]
        assert "wait for it to finish or write to another --out" in err[0]
        _, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    assert _files(out) == _files(ref)  # whole, and the same bytes as a run nobody disturbed


@pytest.mark.integration
def test_splits_of_several_inputs_share_one_folder(corpus, tmp_path):
    """Item 2: MSR-VTT-style train/val from one input, then test from another, into one --out:
    adding a split keeps the others (shards, rows, counts); remaking another input's split, another
    prep config, or leftovers of an unknown dataset refuse unless overwrite."""
    a = _manifest(corpus, tmp_path / "trainval.csv", range(0, 6), ["train"] * 4 + ["val"] * 2)
    b = _manifest(corpus, tmp_path / "test.csv", range(6, 10), ["test"] * 4)
    c = _manifest(corpus, tmp_path / "other_test.csv", range(10, 12), ["test"] * 2)
    out = tmp_path / "one"
    prepare(_cfg(), a, out, progress=False)
    s = prepare(_cfg(), b, out, progress=False)
    assert s["samples_out"] == 4 and s["dataset_counts"] == {"test": 4, "train": 4, "val": 2}
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert Counter(r["split"] for r in rows) == {"train": 4, "val": 2, "test": 4}
    info = json.loads((out / "dataset.json").read_text())
    assert info["counts"] == {"test": 4, "train": 4, "val": 2} and info["num_samples"] == 10
    assert [(i["input"], i["splits"]) for i in info["inputs"]] == [(str(b), ["test"]), (str(a), ["train", "val"])]
    assert (out / "val-000000.tar").is_file() and (out / "train-000001.tar").is_file()
    assert len(DatasetIndex(out, "val")) == 2 and len(DatasetIndex(out, "test")) == 4  # the loader reads it
    # the order of the runs does not matter: the same bytes
    other = tmp_path / "two"
    prepare(_cfg(), b, other, progress=False)
    prepare(_cfg(), a, other, progress=False)
    assert _files(other) == _files(out)
    # a rerun of either input is a no-op that keeps the other's split
    before = _files(out)
    assert prepare(_cfg(), a, out, progress=False)["shards_run"] == 0 and _files(out) == before
    # another input with a split that is already there, another config: refused, nothing touched
    with pytest.raises(UserError, match=rf"split test in {out} was made from {b} \(format manifest\); this input "
                                        r"has split test too; run with --overwrite"):
        prepare(_cfg(), c, out, progress=False)
    with pytest.raises(UserError, match=r"was prepared with prep.fps=4.0 \(this run: prep.fps=8.0\)"):
        prepare(_cfg(fps=8.0), a, out, progress=False)
    assert _files(out) == before
    # told to: the folder becomes that run's dataset alone
    s = prepare(_cfg(), c, out, progress=False, overwrite=True)
    assert s["dataset_counts"] == {"test": 2}
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar"]
    assert [i["input"] for i in json.loads((out / "dataset.json").read_text())["inputs"]] == [str(c)]
    # a dataset made before input records: a plain rerun is adopted, a new split is refused
    legacy = tmp_path / "legacy"
    prepare(_cfg(), a, legacy, progress=False)
    for p in legacy.glob("input-*.json"):
        p.unlink()
    info = json.loads((legacy / "dataset.json").read_text())
    info.pop("inputs")
    (legacy / "dataset.json").write_text(json.dumps(info))
    assert prepare(_cfg(), a, legacy, progress=False)["shards_run"] == 0
    for p in legacy.glob("input-*.json"):
        p.unlink()
    with pytest.raises(UserError, match="holds split\\(s\\) train, val of a dataset made by an earlier hiervl"):
        prepare(_cfg(), b, legacy, progress=False)


@pytest.mark.integration
def test_bad_cells_and_bad_media_reach_the_quarantine_of_a_real_prep(corpus, tmp_path):
    """Items 6, 7, 9, 10 end to end: a JSONL manifest with bad cells and bad media; each refusal is
    in quarantine.parquet with its reason, the good rows (and the upright rotated video) are shards."""
    from PIL import Image
    from test_prep_media import _encode  # tests/ is on sys.path under pytest
    good = [str(p) for p in sorted((corpus.parent / "videos").glob("*.webm"))[:2]]
    (tmp_path / "folder.webm").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "still.png")
    _encode(tmp_path / "portrait.mp4", rotation=-90)
    rows = [{"key": "g0", "video": good[0], "caption": "fine"}, {"key": "g1", "video": good[1], "caption": ["a", "b"]},
            {"key": "num", "video": good[0], "caption": 42}, {"key": "abc", "video": good[0], "caption": "x", "start": "abc"},
            {"key": "neg", "video": good[0], "caption": "x", "start": -1, "end": 1},
            {"key": "dir", "video": "folder.webm", "caption": "x"}, {"key": "png", "video": "still.png", "caption": "x"},
            {"key": "rot", "video": "portrait.mp4", "caption": "a phone video"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = prepare(_cfg(), tmp_path / "m.jsonl", tmp_path / "out", progress=False)
    q = {r["key"]: (r["stage"], r["reason"]) for r in pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()}
    assert q["num"] == ("input", "bad manifest cell (row 3, column caption: a number (42) is not a caption; give a "
                                 "string or a list of strings)")
    assert q["abc"] == ("input", "bad manifest cell (row 4, column start: 'abc' is not a number of seconds)")
    assert q["neg"][0] == "input" and q["neg"][1].startswith("bad manifest cell (row 5, column start: -1 is negative")
    assert q["dir"] == ("probe", f"a directory, not a video file ({tmp_path / 'folder.webm'})")
    assert q["png"] == ("probe", "not a video (a PNG image; give a video file)")
    assert len(q) == 5 and s["quarantined_by_reason"] == {"input: bad manifest cell": 3, "probe: a directory, not a "
                                                          "video file": 1, "probe: not a video": 1}
    m = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    assert sorted(m) == ["g0", "g1", "rot"] and m["g1"]["captions"] == ["a", "b"]
    assert (m["rot"]["width"], m["rot"]["height"]) == (32, 64)  # upright portrait
