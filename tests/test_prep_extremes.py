"""Issue 25 (hidden classes: per-row network failures in prep, manifest cells of extreme size):
a row whose remote video cannot be reached is a quarantine record with the reason (the run goes on;
it used to end in a traceback when it was the first remote row), and absurd cells (a 20 MB caption,
a 100k-character key, a path with a NUL byte or longer than PATH_MAX, a clip end of 1e300 s, too
many captions) are refused at input with the reason instead of reaching every shard's JSON."""

from __future__ import annotations

import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from fixtures import write_shards
from test_api import extract_videos


def test_extreme_cells_are_quarantined_with_the_reason(tmp_path):
    from hiervl.dataprep.sources import check_samples, read_manifest

    (tmp_path / "a.webm").write_bytes(b"x")
    rows = [dict(key="ok", video="a.webm", caption="x", start=0.0, end=2.0),
            dict(key="huge_t", video="a.webm", caption="x", start=0.0, end=1e300),
            dict(key="big_caption", video="a.webm", caption="y" * 20_000_000, start=None, end=None),
            dict(key="long_path", video="d/" * 3000 + "a.webm", caption="x", start=None, end=None),
            dict(key="k" * 100_000, video="a.webm", caption="x", start=None, end=None),
            dict(key="nul", video="a\x00.webm", caption="x", start=None, end=None)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    good, bad = check_samples(read_manifest(tmp_path / "m.parquet"))
    assert [s.key for s in good] == ["ok"]
    reasons = {r.key[:12]: r.reason for r in bad}
    assert reasons == {"huge_t": "clip end 1e+300 s is past any video (more than 1e+07 s)",
                       "big_caption": "a caption of 20,000,000 characters, longer than 20,000",
                       "k" * 12: "a key of 100,000 characters, longer than 1,024",
                       "nul": "video path holds a NUL byte", "long_path": reasons["long_path"]}, reasons
    assert reasons["long_path"].startswith("video path of 6,") and reasons["long_path"].endswith("than 4,096")
    assert all(len(r.key) <= 300 and len(r.source) <= 300 for r in bad)  # the quarantine row stays small
    (tmp_path / "many.jsonl").write_text('{"video": "a.webm", "caption": [%s]}\n' % ",".join(['"c"'] * 1001))
    (refused,) = check_samples(read_manifest(tmp_path / "many.jsonl"))[1]
    assert refused.reason == "1001 captions, more than 1000 for one video"


def test_an_unreachable_remote_video_is_one_quarantine_record_not_a_crashed_job(tmp_path):
    from hiervl.config import load_config
    from hiervl.dataprep.driver import prepare

    paths = extract_videos(write_shards(tmp_path / "shards", 2, "vp9", split="train", per_shard=2), tmp_path / "v",
                           split="train")
    with socket.socket() as s:  # nothing listens there: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lines = ["key,video,caption"] + [f"{k},{p},caption {k}" for k, p in paths.items()]
    lines.append(f"net,http://bob:pw0rd@127.0.0.1:{port}/x.mp4,a video on a host that is down")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    cfg = load_config(None, ["prep.distributor=local", "prep.num_workers=1", "storage.retries=0",
                             "prep.max_failure_rate=0.5"])
    summary = prepare(cfg, tmp_path / "m.csv", tmp_path / "out", progress=False)  # returns: no traceback
    assert (summary["samples_in"], summary["samples_out"], summary["quarantined"]) == (3, 2, 1), summary
    (row,) = pq.read_table(Path(tmp_path / "out" / "quarantine.parquet")).to_pylist()
    assert row["key"] == "net" and row["stage"] == "probe" and "Connection refused" in row["reason"], row
    assert row["source"] == f"http://***@127.0.0.1:{port}/x.mp4"  # the credential is not written
    assert len(pq.read_table(tmp_path / "out" / "manifest.parquet")) == 2
