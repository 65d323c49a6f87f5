"""Shard pieces without Ray: tar + index bytes (vs the real wds2idx), transcode, bad-input reasons, plan."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from hiervl.config import PrepConfig
from hiervl.dataprep.plan import make_plan
from hiervl.dataprep.shard_writer import ShardWriter, index_text, read_index
from hiervl.dataprep.sources import Sample, check_samples
from hiervl.dataprep.synth import make_corpus
from hiervl.dataprep.transcode import SampleRefused, process_sample
from hiervl.dataprep.worker import is_done, write_shard

WDS2IDX = Path(sys.executable).with_name("wds2idx")
PREP = {"codec": "vp9", "fps": 4.0, "short_side": 32, "max_seconds": 30.0, "min_seconds": 0.5,
        "keyframe_interval": 1.0, "crf": 32}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, 4, seed=5)
    return root


def test_index_equals_real_wds2idx_and_offsets_point_at_data(tmp_path):
    w = ShardWriter(tmp_path / "s.tar")
    blobs = {"k1.webm": b"a" * 1000, "k1.json": b"{}", "k-2.webm": b"b" * 513, "k-2.json": b"[1]"}
    offsets = {name: w.add(name, data) for name, data in blobs.items()}
    w.close()
    (tmp_path / "mine.idx").write_text(index_text(w.members))
    if not WDS2IDX.exists():
        pytest.skip("wds2idx (installed with DALI) not found")
    subprocess.run([str(WDS2IDX), str(tmp_path / "s.tar"), str(tmp_path / "ref.idx")], check=True, capture_output=True)
    assert (tmp_path / "mine.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()
    raw = (tmp_path / "s.tar").read_bytes()
    for name, (off, size) in offsets.items():
        assert raw[off:off + size] == blobs[name]
    assert [len(g) for g in read_index(tmp_path / "ref.idx")] == [2, 2]
    with tarfile.open(tmp_path / "s.tar") as tf:
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tf.getmembers())
    assert not list(tmp_path.glob(".*.tmp"))


def test_transcode_resamples_resizes_and_seeks(corpus):
    src = str(next((corpus / "videos").glob("*.webm")))
    blob, ext, meta = process_sample({"video": src}, PREP)
    assert ext == "webm" and (meta["num_frames"], meta["width"], meta["height"]) == (8, 32, 32)
    assert process_sample({"video": src}, PREP)[0] == blob  # reproducible
    h = dict(PREP, codec="h264", fps=8.0)
    blob2, ext2, meta2 = process_sample({"video": src, "start": 0.5, "end": 1.5}, h)
    assert ext2 == "mp4" and meta2["num_frames"] == 8 and meta2["codec"] == "h264"
    import io
    with av.open(io.BytesIO(blob2)) as c:
        name = c.streams.video[0].codec_context.name
        frames = list(c.decode(video=0))
    assert len(frames) == 8 and frames[0].key_frame and name == "h264"


def _refusal(sample, prep=PREP):
    with pytest.raises(SampleRefused) as exc:
        process_sample(sample, prep)
    return exc.value.stage, exc.value.reason


def test_bad_inputs_get_stage_and_reason(corpus, tmp_path):
    good = next((corpus / "videos").glob("*.webm")).read_bytes()
    (tmp_path / "zero.webm").write_bytes(b"")
    (tmp_path / "trunc.webm").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.webm").write_bytes(b"hello, I am not a video\n" * 20)
    stage, reason = _refusal({"video": str(tmp_path / "nope.webm")})
    assert stage == "probe" and reason.startswith(f"missing file (looked for {tmp_path / 'nope.webm'};")
    assert _refusal({"video": str(tmp_path / "zero.webm")}) == ("probe", "zero-byte file")
    assert _refusal({"video": str(tmp_path / "text.webm")}) == ("probe", "not a video (no known container)")
    stage, reason = _refusal({"video": str(tmp_path / "trunc.webm")})
    assert stage == "decode" and reason.startswith("truncated")
    stage, reason = _refusal({"video": str(next((corpus / "videos").glob("*.webm"))), "start": 1.8, "end": 2.0})
    assert stage == "validate" and reason.startswith("too short")


def test_plan_is_a_pure_function_of_input_and_config(corpus):
    samples = [Sample(f"k{i}", str(corpus / "videos" / f"synth{i % 4:06d}.webm"), ["c"], split=("train", "test")[i % 2])
               for i in range(11)]
    prep = PrepConfig(shard_max_samples=3)
    a = make_plan(check_samples(samples)[0], prep)
    b = make_plan(check_samples([Sample(**{**s.to_dict(), "orig_key": None}) for s in samples])[0], prep)
    assert [(p["name"], [s["key"] for s in p["samples"]]) for p in a] == \
           [(p["name"], [s["key"] for s in p["samples"]]) for p in b]
    assert [p["name"] for p in a] == ["test-000000", "test-000001", "train-000000", "train-000001"]
    assert [len(p["samples"]) for p in a] == [3, 2, 3, 3]
    c = make_plan(check_samples(samples)[0], PrepConfig(shard_max_samples=3, crf=20))
    assert a[0]["fingerprint"] != c[0]["fingerprint"]  # output config changes mark shards stale


def test_write_shard_directly_is_deterministic(corpus, tmp_path):
    samples = [Sample(f"s.{i}", str(corpus / "videos" / f"synth{i:06d}.webm"), [f"cap {i}"]) for i in range(3)]
    spec = make_plan(check_samples(samples)[0], PrepConfig(shard_max_samples=8))[0]
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        st = write_shard(spec, PREP, str(tmp_path / d))
        assert is_done(tmp_path / d, spec)
    for name in ("train-000000.tar", "train-000000.idx", "train-000000.stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert st["samples_out"] == 3 and st["rows"][0]["orig_key"] == "s.0" and "." not in st["rows"][0]["key"]
    arr = np.frombuffer((tmp_path / "a" / "train-000000.tar").read_bytes(), np.uint8)
    r = st["rows"][1]
    assert bytes(arr[r["json_offset"]:r["json_offset"] + r["json_size"]]).startswith(b'{"captions":["cap 1"]')


def test_group_goes_into_the_sample_json_and_row_only_when_set(corpus, tmp_path):
    def shard(groups, out):
        samples = [Sample(f"s{i}", str(corpus / "videos" / f"synth{i:06d}.webm"), [f"cap {i}"], group=g)
                   for i, g in enumerate(groups)]
        spec = make_plan(check_samples(samples)[0], PrepConfig(shard_max_samples=8))[0]
        (tmp_path / out).mkdir()
        st = write_shard(spec, PREP, str(tmp_path / out))
        raw = (tmp_path / out / "train-000000.tar").read_bytes()
        docs = [json.loads(raw[r["json_offset"]:r["json_offset"] + r["json_size"]]) for r in st["rows"]]
        return st, docs, raw

    st, docs, raw = shard(["g1", None, "g1"], "grouped")
    assert [d.get("group") for d in docs] == ["g1", None, "g1"] and "group" not in docs[1]
    assert [r.get("group") for r in st["rows"]] == ["g1", None, "g1"] and "group" not in st["rows"][1]
    _, plain_docs, plain_raw = shard([None, None, None], "plain")
    assert all("group" not in d for d in plain_docs)
    assert docs[1] == plain_docs[1] and docs[0] == {**plain_docs[0], "group": "g1"}
    assert raw != plain_raw  # the group really is in the grouped shard's bytes


def test_loader_refuses_dataset_of_other_schema_version(tmp_path):
    """dataset.json's schema_version is checked where the dataset is read, with the fix named."""
    from hiervl.data.manifest import SCHEMA_VERSION, read_dataset_info
    from hiervl.errors import UserError

    assert read_dataset_info(tmp_path) is None  # a hand-built manifest has no dataset.json
    (tmp_path / "dataset.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION}))
    assert read_dataset_info(tmp_path)["schema_version"] == SCHEMA_VERSION
    (tmp_path / "dataset.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(UserError, match=f"schema_version {SCHEMA_VERSION + 1}.*hiervl prep"):
        read_dataset_info(tmp_path)
