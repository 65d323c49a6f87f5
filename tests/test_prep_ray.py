"""`hiervl prep` end to end on a real local Ray cluster and real video files.

The session's Ray cluster (conftest.py `ray_cluster`; ray.init costs seconds) with
prep.distributor=ray; the crash test runs the CLI in a subprocess with its own cluster and
SIGKILLs it half-way.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from hiervl.config import Config
from hiervl.dataprep.driver import prepare
from hiervl.dataprep.synth import make_corpus
from hiervl.dataprep.verify import verify

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _cfg(**prep):
    cfg = Config()
    cfg.prep.short_side, cfg.prep.fps, cfg.prep.shard_max_samples = 32, 4.0, 3
    cfg.prep.distributor = "ray"
    for k, v in prep.items():
        setattr(cfg.prep, k, v)
    return cfg


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, 12, seed=1)
    return root / "manifest.csv"


def _bad_manifest(root: Path, corpus_manifest: Path) -> Path:
    """The corpus plus one input of each bad kind."""
    vids = corpus_manifest.parent / "videos"
    good = sorted(vids.glob("*.webm"))
    (root / "zero.webm").write_bytes(b"")
    (root / "trunc.webm").write_bytes(good[0].read_bytes()[:1500])
    (root / "text.webm").write_text("not a video at all\n" * 30)
    with av.open(str(root / "audio.wav"), "w", format="wav") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        f = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
        f.sample_rate = 8000
        for p in list(s.encode(f)) + list(s.encode()):
            c.mux(p)
    rows = list(csv.reader(open(corpus_manifest, encoding="utf-8")))[1:]
    lines = [b"video,caption,key,split"]
    for video, caption, key, split, *_ in rows:
        lines.append(f'{corpus_manifest.parent / video},"{caption.replace(chr(34), chr(34) * 2)}",{key},{split}'.encode())
    g = str(good[1]).encode()
    lines += [b"missing.webm,a caption,missing,train", b"zero.webm,a caption,zero,train",
              b"trunc.webm,a caption,trunc,train", b"text.webm,a caption,text,train",
              b"audio.wav,a caption,audio,train", g + b",,emptycap,train", g + b",caf\xff caption,badutf8,train",
              g + b",dup caption,synth000003,train", g + b",evil key,../../escape/a.b,train",
              g + b",a clip,clip1,train,0.5,1.5"]
    lines[0] = b"video,caption,key,split,start,end"
    lines[1:] = [ln if ln.count(b",") - ln.count(b'",') >= 5 or ln.endswith(b"1.5") else ln + b",," for ln in lines[1:]]
    (root / "bad.csv").write_bytes(b"\n".join(lines) + b"\n")
    return root / "bad.csv"


def test_bad_inputs_quarantined_good_land_rerun_noop_verify(ray_cluster, corpus, tmp_path):
    manifest = _bad_manifest(tmp_path, corpus)
    out = tmp_path / "out"
    s = prepare(_cfg(), manifest, out, progress=False)
    q = pq.read_table(out / "quarantine.parquet").to_pylist()
    reasons = {r["key"]: (r["stage"], r["reason"]) for r in q}
    assert reasons["missing"][0] == "probe" and reasons["missing"][1].startswith(
        f"missing file (looked for {tmp_path / 'missing.webm'};")
    assert reasons["zero"] == ("probe", "zero-byte file")
    assert reasons["text"] == ("probe", "not a video (no known container)")
    assert reasons["audio"] == ("probe", "no video stream")
    assert reasons["trunc"][0] in ("probe", "decode") and "truncated" in reasons["trunc"][1]
    assert reasons["emptycap"] == ("input", "empty caption")
    assert reasons["badutf8"] == ("input", "caption or key is not valid UTF-8")
    assert reasons["synth000003"] == ("input", "duplicate key")
    assert len(q) == 8 and s["quarantined"] == 8 and s["samples_in"] == 12 + 10
    m = pq.read_table(out / "manifest.parquet").to_pylist()
    assert s["samples_out"] == len(m) == 14  # the 12 good videos + the unsafe key + the clip
    evil = next(r for r in m if r["orig_key"] == "../../escape/a.b")
    assert "." not in evil["key"] and "/" not in evil["key"]
    clip = next(r for r in m if r["key"] == "clip1")
    assert (clip["start"], clip["end"], clip["num_frames"]) == (0.5, 1.5, 4)
    assert not (tmp_path / "escape").exists() and not any(p.name.startswith(".") for p in out.iterdir())
    assert s["failure_rate"] > 0.2 and not s["ok"]  # 8/22 refused: past the default max_failure_rate
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["counts"] == dict(Counter(r["split"] for r in m)) and sum(ds["counts"].values()) == 14
    assert ds["quarantined"] == 8 and ds["schema_version"] == 1
    # a rerun is a no-op with identical bytes
    before = _files(out)
    s2 = prepare(_cfg(), manifest, out, progress=False)
    assert s2["shards_run"] == 0 and _files(out) == before
    # verify passes, then catches a tampered shard (same size, one byte of a video changed)
    res = verify(out)
    assert res["problems"] == [] and res["webdataset"] == res["dali"] == 14
    tar = out / m[5]["shard"]
    raw = bytearray(tar.read_bytes())
    raw[m[5]["video_offset"] + 100] ^= 0xFF
    tar.write_bytes(bytes(raw))
    bad = verify(out)["problems"]
    assert any(m[5]["key"] in p for p in bad) and any("webdataset reader" in p for p in bad)
    assert any("DALI reader" in p for p in bad)
    # and the CLI exits non-zero on it
    r = subprocess.run([sys.executable, "-m", "hiervl.launch.cli", "prep", "--verify", str(out), "--no-dali"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 1 and "FAILED" in r.stdout


def test_sigkill_half_way_then_rerun_gives_same_bytes(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    manifest = make_corpus(root / "corpus", 60, seed=2)
    ref = root / "ref"
    prepare(_cfg(shard_max_samples=2), manifest, ref, progress=False)  # uninterrupted, 2 workers
    out = root / "out"
    cmd = [sys.executable, "-m", "hiervl.launch.cli", "prep", "--input", str(manifest), "--out", str(out),
           "prep.short_side=32", "prep.fps=4", "prep.shard_max_samples=2", "prep.num_workers=1",
           "prep.distributor=ray"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: its Ray cluster can be cleaned up
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(out.glob("*.stats.json"))) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "prep finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)  # the driver dies mid-run, no clean-up handlers
    proc.wait()
    try:  # then what is left of the local cluster it had started (orphaned agents, workers)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    time.sleep(0.5)
    done = len(list(out.glob("*.stats.json")))
    assert 3 <= done < 30 and not (out / "manifest.parquet").exists()
    assert json.loads((out / ".hiervl-prep.lock").read_text())["pid"] == proc.pid  # a dead run's lock: taken over
    s = prepare(_cfg(shard_max_samples=2), manifest, out, progress=False)
    assert s["shards_run"] == 30 - done
    assert _files(out) == _files(ref)
