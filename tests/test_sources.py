"""Input parsing: manifests, key safety, and the real benchmark annotation files (shared/fixtures)."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hiervl.dataprep.benchmarks import read_activitynet, read_didemo, read_msrvtt, read_msvd
from hiervl.dataprep.sources import Sample, check_samples, read_input, read_manifest, safe_key
from hiervl.errors import UserError

FIX = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
needs_fixtures = pytest.mark.skipif(not FIX.is_dir(), reason="shared/fixtures not beside the repo")


def test_safe_key_removes_dots_slashes_and_keeps_unique():
    for bad in ("a.b", "../etc/passwd", "x/y", "..", "video 1.mp4", "é"):
        k = safe_key(bad)
        assert "." not in k and "/" not in k and k and len(k) <= 64
        assert all(c.isalnum() or c in "_-" for c in k)
    assert safe_key("a.b") != safe_key("a/b")  # both become a_b, the hash keeps them apart
    assert safe_key("plain_key-1") == "plain_key-1"
    assert len(safe_key("k" * 200)) == 64


def test_check_samples_refuses_bad_captions_and_duplicates():
    samples = [Sample("a", "v.mp4", ["ok"]), Sample("a", "w.mp4", ["dup"]), Sample("b", "v.mp4", ["  "]),
               Sample("c", "v.mp4", ["bad \udcff utf8"]), Sample("d.e/f", "v.mp4", ["fine"]),
               Sample("g", "v.mp4", ["x"], start=3.0, end=1.0)]
    good, bad = check_samples(samples)
    assert [s.orig_key for s in good] == ["a", "d.e/f"]
    assert good[1].key == safe_key("d.e/f") and good[1].video_id == good[1].key
    assert [(r.key, r.stage, r.reason) for r in bad][:3] == [
        ("a", "input", "duplicate key"), ("b", "input", "empty caption"),
        ("c", "input", "caption or key is not valid UTF-8")]
    assert bad[3].reason.startswith("clip end")


def test_manifest_formats_agree(tmp_path):
    rows = [{"video": "v/a.webm", "caption": json.dumps(["one", "two"]), "key": "a", "split": "test", "start": None, "end": None},
            {"video": "/abs/b.webm", "caption": "plain text", "key": "b", "split": "train", "start": 1.0, "end": 2.5}]
    (tmp_path / "m.csv").write_text("video,caption,key,split,start,end\n"
                                    'v/a.webm,"[""one"", ""two""]",a,test,,\n/abs/b.webm,plain text,b,train,1.0,2.5\n')
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist([dict(r, caption=json.loads(r["caption"]) if r["key"] == "a" else [r["caption"]])
                                         for r in rows]), tmp_path / "m.parquet")  # a list<string> column
    for name in ("m.csv", "m.jsonl", "m.parquet"):
        s = read_manifest(tmp_path / name)
        assert [x.captions for x in s] == [["one", "two"], ["plain text"]], name
        assert s[0].video == str(tmp_path / "v/a.webm") and s[1].video == "/abs/b.webm"
        assert (s[1].start, s[1].end, s[0].start) == (1.0, 2.5, None) and s[0].split == "test"
    with pytest.raises(UserError, match="needs columns"):
        (tmp_path / "x.csv").write_text("path,text\na,b\n")
        read_manifest(tmp_path / "x.csv")


def test_group_column_in_every_format_empty_means_none(tmp_path):
    rows = [{"video": "a.webm", "caption": "x", "key": "a", "group": "src1"},
            {"video": "b.webm", "caption": "y", "key": "b", "group": ""},
            {"video": "c.webm", "caption": "z", "key": "c", "group": "src1"},
            {"video": "d.webm", "caption": "w", "key": "d", "group": None}]
    (tmp_path / "m.csv").write_text("video,caption,key,group\na.webm,x,a,src1\nb.webm,y,b,\nc.webm,z,c,src1\n"
                                    "d.webm,w,d,\n")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    for name in ("m.csv", "m.jsonl", "m.parquet"):
        samples, refused = check_samples(read_manifest(tmp_path / name))
        assert [x.group for x in samples] == ["src1", None, "src1", None] and not refused, name
    (tmp_path / "n.jsonl").write_text(json.dumps({"video": "a.webm", "caption": "x", "group": 7}) + "\n")
    assert read_manifest(tmp_path / "n.jsonl")[0].group == "7"  # a numeric id becomes its string
    (tmp_path / "old.csv").write_text("video,caption,key\na.webm,x,a\n")
    old = read_manifest(tmp_path / "old.csv")[0]
    assert old.group is None
    # a sample without a group has the same plan entry (so the same shard fingerprint) as before the column
    assert "group" not in old.to_dict() and Sample("a", "v", ["c"], group="g").to_dict()["group"] == "g"
    (tmp_path / "bad.csv").write_bytes(b"video,caption,key,group\na.webm,x,a,g\xff\nb.webm,y,b,g\n")
    good, bad = check_samples(read_manifest(tmp_path / "bad.csv"))
    assert [s.key for s in good] == ["b"] and [(r.key, r.reason) for r in bad] == [("a", "group is not valid UTF-8")]


def test_invalid_utf8_in_csv_is_detected(tmp_path):
    (tmp_path / "m.csv").write_bytes(b"video,caption,key\na.webm,caf\xff,k1\nb.webm,good,k2\n")
    good, bad = check_samples(read_input(tmp_path / "m.csv"))
    assert [s.key for s in good] == ["k2"] and bad[0].reason == "caption or key is not valid UTF-8"


@needs_fixtures
@pytest.mark.parametrize("name", ["MSRVTT_JSFUSION_test.csv", "MSRVTT_JSFUSION_test.canonical.csv"])
def test_msrvtt_1ka_test_either_variant(name):
    s = read_msrvtt(FIX / "msrvtt" / name, None)
    assert len(s) == 1000 and len({x.key for x in s}) == 1000
    assert s[0].key == "video9770" and s[0].captions == ["a person is connecting something to system"]
    assert s[1].key == "video9771" and s[1].captions == ["a little girl does gymnastics"]
    assert all(x.split == "test" and 7010 <= int(x.key[5:]) <= 9999 for x in s)
    assert all(not x.captions[0].endswith("\r") for x in s)
    # both variants parse to the same samples
    other = read_msrvtt(FIX / "msrvtt" / "MSRVTT_JSFUSION_test.canonical.csv", None)
    assert [(x.key, x.captions) for x in s] == [(x.key, x.captions) for x in other]


@needs_fixtures
def test_msrvtt_9k_list_with_data_json(tmp_path):
    ids = (FIX / "msrvtt" / "MSRVTT_train.9k.csv").read_text().split()[1:]
    assert len(ids) == 9000
    with pytest.raises(UserError, match="MSRVTT_data.json"):
        read_msrvtt(FIX / "msrvtt" / "MSRVTT_train.9k.csv", None)
    # MSRVTT_data.json from its published layout (the real file could not be had)
    data = {"videos": [{"video_id": v, "split": "train"} for v in ids[:3]],
            "sentences": [{"video_id": ids[0], "caption": "second", "sen_id": 5},
                          {"video_id": ids[0], "caption": "first", "sen_id": 1},
                          {"video_id": ids[1], "caption": "other", "sen_id": 2}]}
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(data))
    (tmp_path / "MSRVTT_train.9k.csv").write_bytes((FIX / "msrvtt" / "MSRVTT_train.9k.csv").read_bytes())
    s = read_msrvtt(tmp_path / "MSRVTT_train.9k.csv", "/videos")
    assert len(s) == 9000 and s[0].key == "video0" and s[0].captions == ["first", "second"]
    assert s[0].video == "/videos/video0.mp4" and s[2].captions == []


@needs_fixtures
def test_didemo_test_counts_paragraphs_and_segments():
    s = read_didemo(FIX / "didemo" / "test_data.json", None)
    assert len(s) == 1037 and sum(len(x.sentences) for x in s) == 4021
    assert all(x.split == "test" and x.captions == [" ".join(x.sentences)] for x in s)
    seg = read_didemo(FIX / "didemo" / "test_data.json", None, segments=True)
    assert len(seg) == 4021 and len({x.video_id for x in seg}) == 1037
    first = next(x for x in seg if x.extra["annotation_id"] == 1)  # times: 4x[4,4], 3x[0,0]
    assert (first.start, first.end) == (20.0, 25.0)
    val = read_didemo(FIX / "didemo" / "val_data.json", None)
    assert len(val) == 1094 and sum(len(x.sentences) for x in val) == 4180 and val[0].split == "val"
    # keys are made safe (video names hold dots and @)
    good, bad = check_samples(s)
    assert len(good) == 1037 and not bad and all("." not in x.key for x in good)


@needs_fixtures
def test_activitynet_val1_counts_and_order():
    s = read_activitynet(FIX / "activitynet" / "val_1.json", None)
    assert len(s) == 4917 and sum(len(x.sentences) for x in s) == 17505
    x = next(v for v in s if v.key == "v_bXdq2zI1Ms0")
    assert x.sentences[0].startswith("A man is seen speaking") and x.sentences[1].startswith("The first man")
    seg = read_activitynet(FIX / "activitynet" / "val_1.json", None, segments=True)
    assert len(seg) == 17505 and all(c.end > c.start or c.end == c.start for c in seg)
    head = read_activitynet(FIX / "activitynet" / "train_modified.head.json", None)
    assert len(head) == 200 and sum(len(v.sentences) for v in head) == 746 and head[0].split == "train"


@needs_fixtures
def test_msvd_mapping_names_and_split(tmp_path):
    s = read_msvd(FIX / "msvd" / "youtube_mapping.txt", None)
    assert len(s) == 1970 and s[0].key == "-4wsuPCjDBc_5_15" and s[0].extra["vid"] == "vid1"
    assert [sum(x.split == k for x in s) for k in ("train", "val", "test")] == [1200, 100, 670]
    # captions from the corpus CSV's published layout (English rows only)
    (tmp_path / "youtube_mapping.txt").write_bytes((FIX / "msvd" / "youtube_mapping.txt").read_bytes())
    (tmp_path / "video_corpus.csv").write_text(
        "VideoID,Start,End,WorkerID,Source,AnnotationTime,Language,Description\n"
        "-4wsuPCjDBc,5,15,1,clean,10,English,a man plays\n-4wsuPCjDBc,5,15,2,clean,9,German,ein Mann\n")
    s = read_msvd(tmp_path, None)
    assert s[0].captions == ["a man plays"]
