"""The synthetic corpus: real decodable videos, deterministic bytes, captions that need order."""

import csv
import hashlib
import json

import av
import numpy as np
import pytest
from hiervl.dataprep.synth import (
    _VERBS,
    COLOURS,
    EVENT_OBJECTS,
    GROUP,
    event_captions,
    event_video_events,
    make_corpus,
    render_event_frames,
    render_frames,
    video_events,
)


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


# ---------------------------------------------------------------------------- kind "events"


def _centroid(frame, rgb):
    """(x, y) centre of the pixels of exactly this colour (the rendered, not encoded, frame), or None."""
    ys, xs = np.nonzero(np.all(frame == np.array(rgb, np.uint8), axis=-1))
    return (xs.mean(), ys.mean()) if len(xs) else None


def _subsequence(small, big):
    it = iter(big)
    return all(any(e == v for v in it) for e in small)


def test_events_kind_is_real_video_deterministic_and_grouped(tmp_path):
    m = make_corpus(tmp_path / "a", 8, seed=3, kind="events")
    make_corpus(tmp_path / "b", 8, seed=3, kind="events")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    make_corpus(tmp_path / "c", 8, seed=4, kind="events")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    # another kind, another corpus (same seed): the pairs default is not what events writes
    make_corpus(tmp_path / "d", 8, seed=3)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "d")
    rows = list(csv.DictReader(open(m)))
    assert list(rows[0]) == ["video", "caption", "key", "split", "group"]
    assert [r["group"] for r in rows] == ["g00000"] * 4 + ["g00001"] * 4
    with av.open(str(tmp_path / "a" / rows[5]["video"])) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == 24 and (frames[0].width, frames[0].height) == (64, 64)  # 3 s at 8 fps
    assert [i for i, f in enumerate(frames) if f.key_frame] == [0, 8, 16]
    ref = render_event_frames(3, 5, 64, 24).astype(np.float32)
    got = np.stack([f.to_ndarray(format="rgb24") for f in frames]).astype(np.float32)
    assert np.abs(ref - got).mean() < 12


def test_events_counts_groups_and_siblings():
    counts = set()
    for g in range(30):
        evs = [event_video_events(5, g * GROUP + v) for v in range(GROUP)]
        counts |= {len(e) for e in evs}
        assert len({len(e) for e in evs}) == 1 and 3 <= len(evs[0]) <= 5
        objs = {frozenset((c, s) for c, s, _ in e) for e in evs}
        assert len(objs) == 1 and len(next(iter(objs))) == EVENT_OBJECTS  # same three objects, all move
        assert len({tuple(e) for e in evs}) == GROUP  # the four differ
        assert evs[3] == evs[0][::-1]  # the whole story reversed
        assert sorted(evs[1]) == sorted(evs[0]) and evs[1] != evs[0]  # same events, another order
        assert sum(a != b for a, b in zip(evs[0], evs[2])) == 1  # one event's direction changed
    assert counts == {3, 4, 5}


def test_events_captions_describe_some_events_in_order_and_no_sibling():
    sizes = set()
    for i in range(80):
        ev = event_video_events(1, i)
        sibs = [event_video_events(1, (i // GROUP) * GROUP + v) for v in range(GROUP) if v != i % GROUP]
        caps = event_captions(1, i)
        assert len(caps) == 4 and len({c["text"] for c in caps}) == 4
        for cap in caps:
            idx, text = cap["events"], cap["text"].lower()
            assert idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < len(ev)
            sizes.add((len(idx), cap["anchor"], len(idx) == len(ev)))
            # the named events appear in the text in the video's order, each with its direction's verb
            starts, pos = [], 0
            for j in idx:
                colour, shape, _ = ev[j]
                at = text.find(f"{colour} {shape}", pos)
                assert at >= 0, (text, ev[j])
                starts.append(at)
                pos = at + 1
            for j, a, b in zip(idx, starts, starts[1:] + [len(text)]):
                assert any(v in text[a:b] for v in _VERBS[ev[j][2]]), (text, ev[j])  # the verb before the next event
            named = [ev[j] for j in idx]
            if cap["anchor"] == "start":
                assert idx == [0] and ("first" in text or "start" in text)
            if cap["anchor"] == "end":
                assert idx == [len(ev) - 1] and ("end" in text or "finally" in text)
            if cap["anchor"] is None and len(idx) < len(ev):
                assert "first" not in text and "finally" not in text  # a partial story claims no ends
            # false of every sibling: the siblings never show these events in this order (with the anchor)
            for s in sibs:
                holds = _subsequence(named, s) and (cap["anchor"] != "start" or s[0] == named[0]) and \
                    (cap["anchor"] != "end" or s[-1] == named[-1])
                assert not holds, (text, s)
    # every kind of query occurs: one anchored event (start and end), two, three, and whole paragraphs
    assert {(1, "start", False), (1, "end", False), (2, None, False), (3, None, False)} <= sizes
    assert {n for n, _, whole in sizes if whole} >= {3, 4, 5}


def test_events_render_each_event_in_its_slot():
    for i in (0, 1, 2, 3, 9, 22):
        ev = event_video_events(2, i)
        n, t = len(ev), 24
        fr = render_event_frames(2, i, 64, t)
        for k, (colour, _, direction) in enumerate(ev):
            a, b = int(np.floor(k * t / n)), min(int(np.ceil((k + 1) * t / n)), t - 1)  # the event's slot
            ca, cb = _centroid(fr[a], COLOURS[colour]), _centroid(fr[b], COLOURS[colour])
            if ca is None or cb is None:
                continue  # hidden under another object at that instant
            dx, dy = cb[0] - ca[0], cb[1] - ca[1]
            want = {"left": -dx, "right": dx, "up": -dy, "down": dy}[direction]
            assert want > 5 and abs({"left": dy, "right": dy, "up": dx, "down": dx}[direction]) < 3, (i, k, dx, dy)
        # and the objects of other events stand still meanwhile (first event's slot)
        a, b = 0, int(t / n) - 1
        for colour, _, _ in {e[:2] + ("",) for e in ev if e[:2] != ev[0][:2]}:
            ca, cb = _centroid(fr[a], COLOURS[colour]), _centroid(fr[b], COLOURS[colour])
            if ca is not None and cb is not None and abs(ca[0] - cb[0]) + abs(ca[1] - cb[1]) > 0.5:
                pytest.fail(f"video {i}: {colour} moved during the first event, which is not its")


def test_events_kind_whole_groups_per_split(tmp_path):
    rows = list(csv.DictReader(open(make_corpus(tmp_path, 40, seed=1, test_fraction=0.25, kind="events",
                                                size=32, seconds=1.0))))
    by_group = {}
    for r in rows:
        by_group.setdefault(r["group"], set()).add(r["split"])
    assert len(by_group) == 10 and all(len(s) == 1 for s in by_group.values())
    assert 4 <= sum(r["split"] == "test" for r in rows) <= 16


def test_synth_help_documents_the_kinds(capsys):
    from hiervl.launch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["synth", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--kind {pairs,events}" in out and "3-5 events" in out and "paragraph" in out
    assert "hiervl synth --kind events" in out


def test_synth_cli_writes_the_events_kind(tmp_path, capsys):
    from hiervl.launch.cli import main

    assert main(["synth", "--kind", "events", "--out", str(tmp_path), "--num-videos", "4", "--size", "32"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "manifest.csv")))
    assert [json.loads(r["caption"]) for r in rows] == [[c["text"] for c in event_captions(0, i)] for i in range(4)]
    with av.open(str(tmp_path / rows[0]["video"])) as c:
        assert len(list(c.decode(video=0))) == 24  # the events default: 3 s at 8 fps
    assert main(["synth", "--kind", "events", "--out", str(tmp_path), "--seconds", "0"]) == 1  # UserError
