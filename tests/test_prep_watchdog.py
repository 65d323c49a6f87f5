"""prep.decode_timeout_s (dataprep/watchdog.py): a video whose decoder hangs or crashes is quarantined,
the shard is written with the others, in bytes equal to a run without the bad video's neighbours touched.

The hang is real: the decoder of the matching file blocks in a kernel read that never returns
(the `decode-hang` fault hook in dataprep/transcode.py), which no Python-level timeout in that
process could interrupt; `decode-crash` kills the decoding process with SIGSEGV."""

import time

import pytest
from hiervl.config import PrepConfig
from hiervl.dataprep.plan import make_plan
from hiervl.dataprep.sources import Sample, check_samples
from hiervl.dataprep.synth import make_corpus
from hiervl.dataprep.worker import write_shard

PREP = {"codec": "vp9", "fps": 4.0, "short_side": 32, "max_seconds": 30.0, "min_seconds": 0.5,
        "keyframe_interval": 1.0, "crf": 32}
LIMIT = 3.0


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, 4, seed=7)
    samples = [Sample(f"s.{i}", str(root / "videos" / f"synth{i:06d}.webm"), [f"cap {i}"]) for i in range(4)]
    return make_plan(check_samples(samples)[0], PrepConfig(shard_max_samples=8))[0]


@pytest.mark.parametrize("fault,reason", [("decode-hang", "timed out after 3s (prep.decode_timeout_s)"),
                                          ("decode-crash", "decoder process died (signal 11)")])
def test_a_hanging_or_crashing_decoder_is_quarantined_within_the_limit(spec, tmp_path, monkeypatch, fault, reason):
    (tmp_path / "ref").mkdir()
    ref = write_shard(spec, PREP, str(tmp_path / "ref"))  # no limit, no fault: the in-process path
    monkeypatch.setenv("HIERVL_FAULT", fault)
    monkeypatch.setenv("HIERVL_FAULT_MATCH", "synth000001")
    (tmp_path / "dog").mkdir()
    t0 = time.monotonic()
    got = write_shard(spec, PREP, str(tmp_path / "dog"), decode_timeout_s=LIMIT)
    elapsed = time.monotonic() - t0
    assert elapsed < LIMIT + 60, elapsed  # 4 videos, one child restart, the hung one cut at the limit
    assert fault != "decode-hang" or elapsed >= LIMIT  # it was waited for, not refused up front
    assert [r["key"] for r in got["refused"]] == ["s.1"]
    refusal = got["refused"][0]
    assert refusal["stage"] == "decode" and reason in refusal["reason"], refusal
    assert [r["orig_key"] for r in got["rows"]] == ["s.0", "s.2", "s.3"]  # the sample after it decoded too
    # the samples the watchdog let through are the in-process ones, byte for byte
    by_key = {r["orig_key"]: r["content_hash"] for r in ref["rows"]}
    assert all(r["content_hash"] == by_key[r["orig_key"]] for r in got["rows"])


def test_without_a_fault_the_watchdog_gives_the_in_process_bytes(spec, tmp_path):
    for d, limit in (("a", 0.0), ("b", 60.0)):
        (tmp_path / d).mkdir()
        write_shard(spec, PREP, str(tmp_path / d), decode_timeout_s=limit)
    for name in ("train-000000.tar", "train-000000.idx", "train-000000.stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_hiervl_prep_quarantines_a_hanging_video_and_finishes(tmp_path, monkeypatch):
    """Through the driver (the distributor's shard processes, then the manifest and quarantine files)."""
    import pyarrow.parquet as pq
    from hiervl.config import Config
    from hiervl.dataprep import driver

    manifest = make_corpus(tmp_path / "corpus", 6, seed=3)
    cfg = Config()
    cfg.prep.codec, cfg.prep.num_workers, cfg.prep.shard_max_samples = "copy", 1, 8
    cfg.prep.decode_timeout_s = LIMIT
    monkeypatch.setenv("HIERVL_FAULT", "decode-hang")
    monkeypatch.setenv("HIERVL_FAULT_MATCH", "synth000002")
    t0 = time.monotonic()
    driver.prepare(cfg, str(manifest), str(tmp_path / "out"))
    assert time.monotonic() - t0 < 120
    quarantine = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()
    assert len(quarantine) == 1 and "synth000002" in quarantine[0]["source"], quarantine
    assert "timed out after 3s (prep.decode_timeout_s)" in quarantine[0]["reason"]
    keys = pq.read_table(tmp_path / "out" / "manifest.parquet", columns=["source"]).column(0).to_pylist()
    assert len(keys) == 5 and not any("synth000002" in k for k in keys)
