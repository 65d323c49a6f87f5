"""The synthetic corpus: real decodable videos, deterministic bytes, captions that need order."""

import csv
import hashlib
import json

import av
import numpy as np
import pytest

from dataprep.synth import GROUP, make_corpus, render_frames, video_events


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("codec,ext,name", [("vp9", "webm", "vp9"), ("h264", "mp4", "h264")])
def test_corpus_is_real_video_and_deterministic(tmp_path, codec, ext, name):
    m1 = make_corpus(tmp_path / "a", 8, seed=3, codec=codec)
    m2 = make_corpus(tmp_path / "b", 8, seed=3, codec=codec)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    make_corpus(tmp_path / "c", 8, seed=4, codec=codec)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    rows = list(csv.DictReader(open(m1)))
    assert [r["key"] for r in rows] == [f"synth{i:06d}" for i in range(8)]
    assert m2.name == "manifest.csv"
    path = tmp_path / "a" / rows[0]["video"]
    assert path.suffix == f".{ext}"
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == name
        frames = list(c.decode(video=0))
    assert len(frames) == 16 and (frames[0].width, frames[0].height) == (64, 64)
    # keyframe at least every second (8 frames at 8 fps) so decoders can seek
    assert [i for i, f in enumerate(frames) if f.key_frame] == [0, 8]
    # decoded frames are close to what was rendered (the encode is real, lossy but faithful)
    ref = render_frames(3, 0, 64, 16).astype(np.float32)
    got = np.stack([f.to_ndarray(format="rgb24") for f in frames]).astype(np.float32)
    assert np.abs(ref - got).mean() < 12


def test_captions_name_both_events_in_order(tmp_path):
    m = make_corpus(tmp_path, 8, seed=0)
    for i, row in enumerate(csv.DictReader(open(m))):
        caps = json.loads(row["caption"])
        assert len(caps) >= 3 and len(set(caps)) == len(caps)
        (c1, s1, _), (c2, s2, _) = video_events(0, i)
        for cap in caps:
            assert f"{c1} {s1}" in cap and f"{c2} {s2}" in cap


def test_groups_share_objects_but_differ_in_order_or_direction():
    for g in range(20):
        evs = [video_events(7, g * GROUP + v) for v in range(GROUP)]
        assert len({frozenset((c, s) for c, s, _ in e) for e in evs}) == 1  # same two objects
        assert len({tuple(e) for e in evs}) == GROUP  # all four differ
        assert evs[1] == evs[0][::-1] and evs[3] == evs[2][::-1]  # reversed order
        assert {e[2] for e in evs[0]} != {e[2] for e in evs[2]} or evs[0] != evs[2]
        # the object that moves first actually moves first: frames differ in the first half only for it
    fr = render_frames(7, 0, 64, 16).astype(np.int32)
    assert np.abs(fr[7] - fr[0]).sum() > 0 and np.abs(fr[15] - fr[8]).sum() > 0


def test_splits_keep_groups_whole(tmp_path):
    m = make_corpus(tmp_path, 40, seed=1, test_fraction=0.25)
    rows = list(csv.DictReader(open(m)))
    by_group = {}
    for i, r in enumerate(rows):
        by_group.setdefault(i // GROUP, set()).add(r["split"])
    assert all(len(s) == 1 for s in by_group.values())
    n_test = sum(r["split"] == "test" for r in rows)
    assert 4 <= n_test <= 16
