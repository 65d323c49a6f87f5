"""The embedded default corpus: real, tiny videos of coloured shapes doing two things in order.

Each video shows two objects (a colour and a shape each) on a textured background. In the
first half one object moves (slides left/right, rises, drops); in the second half the other
one does. Its captions name both events in order, in several paraphrases, built from words
(colour, shape, direction), phrases (one event: "a red circle slides left") and sentences
("a red circle slides left, then a blue square drops").

The corpus is made to need the hierarchy: videos come in groups of four that share the same
two objects — (A then B), (B then A) with the same directions, and (A then B), (B then A) with
other directions — so a model that ignores event order or direction confuses a video with its
siblings. Groups are kept whole in one split, so the test gallery holds the hard negatives.

A second kind, `make_corpus(kind="events")` (`hiervl synth --kind events`), has longer videos of
three objects doing 3-5 things in turn, and captions that name only some of the events (one
anchored event, two or three in order, or all of them as a paragraph), DiDeMo / ActivityNet
style: a task where the clip and event levels should matter. See the "events" section below.

Determinism: every video is drawn from `numpy.random.default_rng([seed, group, variant])` and
encoded single-threaded with bitexact muxer/encoder flags, so the same seed gives the same
bytes (checked by tests/test_synth.py). A corpus of N videos is a prefix of one of N+k.

Output: `out_dir/videos/{key}.{webm|mp4}` and `out_dir/manifest.csv` with columns
video (path relative to the manifest), caption (JSON list of strings), key, split, group
(`g{i // GROUP:05d}`: the sibling group, for `data.order=grouped` hard-negative batches).

Owns: the synthetic corpus: its videos, captions, groups and splits.
Must not touch: preparing shards (that is `hiervl prep` on its manifest.csv).
"""

from __future__ import annotations

import csv
import json
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from hiervl.atomic_write import atomic_output

# Colours chosen to be far apart in RGB and from the (muted) backgrounds.
COLOURS = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 240),
    "yellow": (245, 225, 30),
    "white": (250, 250, 250),
    "purple": (170, 40, 220),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
_DELTA = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy)
_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}

# Paraphrases of one event (a phrase), by direction.
_VERBS = {
    "left": ("slides left", "moves to the left", "goes left"),
    "right": ("slides right", "moves to the right", "goes right"),
    "up": ("rises", "moves up", "goes up"),
    "down": ("drops", "falls down", "moves down"),
}
# Sentence templates over two phrases p1 (first event) and p2 (second event).
_TEMPLATES = (
    "{p1}, then {p2}",
    "first {p1}, after that {p2}",
    "{p1} and then {p2}",
    "{p2} after {p1}",
    "{p1} before {p2}",
)
CODECS = {"vp9": ("libvpx-vp9", "webm"), "h264": ("libx264", "mp4")}
CAPTIONS_PER_VIDEO = 4
GROUP = 4  # videos per group sharing the same two objects


def _event_phrase(rng: np.random.Generator, colour: str, shape: str, direction: str, article: str) -> str:
    verb = _VERBS[direction][int(rng.integers(len(_VERBS[direction])))]
    return f"{article} {colour} {shape} {verb}"


def make_captions(rng: np.random.Generator, events: list[tuple[str, str, str]], n: int = CAPTIONS_PER_VIDEO) -> list[str]:
    """`n` distinct paraphrases naming the two events (colour, shape, direction) in order."""
    order = rng.permutation(len(_TEMPLATES))[:n]
    out = []
    for t in order:
        art = "the" if rng.random() < 0.5 else "a"
        p1 = _event_phrase(rng, *events[0], art)
        p2 = _event_phrase(rng, *events[1], art)
        out.append(_TEMPLATES[int(t)].format(p1=p1, p2=p2))
    return out


def _group_spec(seed: int, group: int) -> dict:
    """The two objects and the base/alternative directions shared by a group of four videos."""
    rng = np.random.default_rng([seed, group, 0])
    c = rng.choice(len(COLOURS), size=2, replace=False)
    s = rng.integers(len(SHAPES), size=2)
    names = list(COLOURS)
    objs = [(names[int(c[i])], SHAPES[int(s[i])]) for i in range(2)]
    dirs = [DIRECTIONS[int(d)] for d in rng.integers(len(DIRECTIONS), size=2)]
    # the alternative changes one object's direction (to the opposite or a perpendicular one)
    which = int(rng.integers(2))
    alt = list(dirs)
    alt[which] = _OPPOSITE[dirs[which]] if rng.random() < 0.5 else DIRECTIONS[(DIRECTIONS.index(dirs[which]) + 2 + int(rng.integers(2))) % 4]
    if alt[which] == dirs[which]:
        alt[which] = _OPPOSITE[dirs[which]]
    return {"objs": objs, "dirs": dirs, "alt": alt}


def video_events(seed: int, index: int) -> list[tuple[str, str, str]]:
    """The two (colour, shape, direction) events of video `index`, in temporal order."""
    spec = _group_spec(seed, index // GROUP)
    variant = index % GROUP
    dirs = spec["dirs"] if variant < 2 else spec["alt"]
    ev = [(*spec["objs"][0], dirs[0]), (*spec["objs"][1], dirs[1])]
    return ev if variant % 2 == 0 else ev[::-1]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted two-tone gradient with faint stripes: [H, W, 3] float32."""
    a = rng.uniform(20, 120, size=3)
    b = rng.uniform(20, 120, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]
    period = rng.uniform(6, 16)
    stripes = 8.0 * np.sin(2 * math.pi * (xx * np.sin(angle) - yy * np.cos(angle)) * size / period)
    return (img + stripes[..., None]).astype(np.float32)


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean [H, W] mask of a shape of half-size r centred at (cx, cy)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    # triangle pointing up: below the two slanted edges and above the base
    return (dy <= r * 0.8) & (dy >= -r + 2 * np.abs(dx))


def render_frames(seed: int, index: int, size: int = 64, num_frames: int = 16) -> np.ndarray:
    """The frames of video `index`: [T, H, W, 3] uint8. Object 1 moves in the first half, object 2 in the second."""
    events = video_events(seed, index)
    rng = np.random.default_rng([seed, index // GROUP, 1 + index % GROUP])
    bg = _background(rng, size)
    r = size * 0.16  # half-size: ~10 px at 64, ~6 px after resizing to a 36 px short side
    travel = size * 0.42
    margin = r + 1
    half = num_frames / 2

    def path(k, start, f):  # centre of object k at frame f
        p = min(max((f + 0.5 - k * half) / half, 0.0), 1.0)
        dx, dy = _DELTA[events[k][2]]
        return start[0] + dx * travel * p, start[1] + dy * travel * p

    best, best_gap = None, -1.0
    for _ in range(12):  # keep the two objects apart: the candidate whose closest approach is largest
        starts = []
        for _, _, d in events:
            dx, dy = _DELTA[d]
            lo_x = margin + (travel if dx < 0 else 0)
            hi_x = size - margin - (travel if dx > 0 else 0)
            lo_y = margin + (travel if dy < 0 else 0)
            hi_y = size - margin - (travel if dy > 0 else 0)
            starts.append((rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)))
        gap = min(math.dist(path(0, starts[0], f), path(1, starts[1], f)) for f in range(num_frames))
        if gap > best_gap:
            best, best_gap = starts, gap
        if gap > 2.2 * r:
            break
    starts = best
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for f in range(num_frames):
        img = bg.copy()
        for k, (colour, shape, _) in enumerate(events):
            # event 0 moves over the first half, event 1 over the second
            m = _shape_mask(shape, *path(k, starts[k], f), r, size)
            img[m] = COLOURS[colour]
        frames[f] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def encode_video(frames: np.ndarray, path: str | Path, codec: str = "vp9", fps: int = 8, crf: int = 30) -> None:
    """Encode [T, H, W, 3] uint8 frames to `path`, reproducibly (same frames, same bytes).

    Single-threaded encoder and bitexact flags (no version strings or timestamps in the file);
    a keyframe every `fps` frames (1 s) so decoders can seek.
    """
    enc, fmt = CODECS[codec]
    with av.open(str(path), "w", format=fmt, options={"fflags": "+bitexact"}) as out:
        st = out.add_stream(enc, rate=Fraction(fps).limit_denominator(1001))
        st.width, st.height = frames.shape[2], frames.shape[1]
        st.pix_fmt = "yuv420p"
        st.codec_context.gop_size = max(1, int(fps))
        opts = {"flags": "+bitexact", "threads": "1", "crf": str(crf), "g": str(max(1, int(fps)))}
        if codec == "vp9":
            opts.update({"b": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "0",
                         "lag-in-frames": "0", "auto-alt-ref": "0"})
        else:
            opts.update({"preset": "veryfast", "tune": "zerolatency", "x264-params": "keyint=%d:min-keyint=1:scenecut=0" % max(1, int(fps))})
        st.options = opts
        for frame in frames:
            for pkt in st.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)


def split_of(seed: int, group: int, test_fraction: float) -> str:
    """Low-discrepancy split per group (whole groups, so siblings share a split): ~test_fraction test."""
    u = (group * 0.6180339887498949 + seed * 0.7548776662466927) % 1.0
    return "test" if u < test_fraction else "train"


def make_corpus(out_dir: str | Path, num_videos: int, seed: int = 0, codec: str = "vp9", size: int = 64,
                fps: int = 8, seconds: float | None = None, test_fraction: float = 0.2, progress: bool = False,
                kind: str = "pairs") -> Path:
    """Write `num_videos` videos plus `manifest.csv` under `out_dir`; return the manifest path.

    Deterministic: the same arguments give the same bytes. `codec`: vp9 (webm) or h264 (mp4).
    `kind`: "pairs" (two events, captions name both) or "events" (3-5 events, captions name
    some of them; see the "events" section below). `seconds` defaults to 2.0 for pairs and
    EVENT_SECONDS for events.
    """
    if kind not in EVENT_KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {', '.join(EVENT_KINDS)}")
    if seconds is None:
        seconds = 2.0 if kind == "pairs" else EVENT_SECONDS
    if codec not in CODECS:
        raise ValueError(f"codec={codec!r}: choose vp9 or h264")
    if num_videos < 1 or size < 16 or size % 2 or fps < 1 or seconds <= 0:
        raise ValueError("need num_videos >= 1, an even size >= 16, fps >= 1 and seconds > 0")
    out_dir = Path(out_dir)
    vids = out_dir / "videos"
    vids.mkdir(parents=True, exist_ok=True)
    ext = CODECS[codec][1]
    num_frames = max(2, int(round(fps * seconds)))
    rows = []
    it = range(num_videos)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="synth videos", unit="video")
    for i in it:
        key = f"synth{i:06d}"
        if kind == "pairs":
            frames = render_frames(seed, i, size, num_frames)
        else:
            frames = render_event_frames(seed, i, size, num_frames)
        with atomic_output(vids / f"{key}.{ext}", suffix=f".tmp.{ext}") as tmp:  # the encoder reads the suffix
            encode_video(frames, tmp, codec, fps)
        if kind == "pairs":
            rng = np.random.default_rng([seed, i // GROUP, 100 + i % GROUP])
            captions = make_captions(rng, video_events(seed, i))
        else:
            captions = [c["text"] for c in event_captions(seed, i)]
        rows.append({"video": f"videos/{key}.{ext}", "caption": json.dumps(captions), "key": key,
                     "split": split_of(seed, i // GROUP, test_fraction), "group": f"g{i // GROUP:05d}"})
    manifest = out_dir / "manifest.csv"
    with atomic_output(manifest) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["video", "caption", "key", "split", "group"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return manifest


# ---------------------------------------------------------------------------- kind "events"
#
# Longer videos of three objects doing 3-5 things one after the other (one object moves in one
# direction per event), with captions that describe only SOME of the events, as DiDeMo and
# ActivityNet queries do: one event anchored in time ("at first, the red circle slides left"),
# two or three events in order, or every event as a paragraph. The four videos of a group share
# their objects and number of events and differ in event order (two adjacent events swapped, the
# whole story reversed) or in one event's direction, and every caption is chosen so that it is
# true of its own video and false of each sibling: a caption is a partial description that still
# pins its video down within the group, and only a model that keeps order (and which object did
# what) can tell the siblings apart.

EVENT_KINDS = ("pairs", "events")
EVENT_OBJECTS = 3  # objects per events-kind video
EVENT_COUNTS = (3, 4, 5)  # events per video (the same within a group)
EVENT_SECONDS = 3.0  # default length of an events-kind video: 24 frames at 8 fps
_MAX_RANGE = 2  # an object's path spans at most this many steps per axis (keeps it in the frame)
# Partial descriptions never say "first" or "finally" (that would claim the video's first / last
# event); only anchored single events and the whole-story paragraph do.
_TWO = ("{p1}, then {p2}", "{p1}, after that {p2}", "{p1} and then {p2}", "{p1} before {p2}")
_THREE = ("{p1}, then {p2}, then {p3}", "{p1}, next {p2}, and then {p3}", "{p1}; after that {p2}; then {p3}")
_START = ("at first {p}", "first, {p}", "{p} at the start")
_END = ("in the end {p}", "finally, {p}", "{p} at the end")
_NEXT = ("Then", "Next,", "After that,")

Event = tuple[str, str, str]  # (colour, shape, direction)


def _valid_story(events: list[Event]) -> bool:
    """No object repeats the same move twice in a row (it would read as one event), and every
    object's path spans at most _MAX_RANGE steps per axis (so it fits in the frame)."""
    for a, b in zip(events, events[1:]):
        if a == b:
            return False
    for obj in {e[:2] for e in events}:
        x = y = 0
        xs, ys = [0], [0]
        for c, s, d in events:
            if (c, s) == obj:
                x, y = x + _DELTA[d][0], y + _DELTA[d][1]
                xs.append(x)
                ys.append(y)
        if max(xs) - min(xs) > _MAX_RANGE or max(ys) - min(ys) > _MAX_RANGE:
            return False
    return True


def _event_group_spec(seed: int, group: int) -> list[list[Event]]:
    """The four event lists of an events-kind group: base, two adjacent events swapped, one
    event's direction changed, the whole order reversed. All four differ and are valid."""
    rng = np.random.default_rng([seed, group, 10])
    names = list(COLOURS)
    while True:  # a few draws at most: most stories are valid
        c = rng.choice(len(COLOURS), size=EVENT_OBJECTS, replace=False)
        objs = [(names[int(c[k])], SHAPES[int(rng.integers(len(SHAPES)))]) for k in range(EVENT_OBJECTS)]
        n = int(EVENT_COUNTS[int(rng.integers(len(EVENT_COUNTS)))])
        who = [int(rng.integers(EVENT_OBJECTS))]
        for _ in range(n - 1):  # a different object than the previous event's
            who.append(int((who[-1] + 1 + rng.integers(EVENT_OBJECTS - 1)) % EVENT_OBJECTS))
        if len(set(who)) < EVENT_OBJECTS:
            continue  # every object moves at least once
        base = [(*objs[k], DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]) for k in who]
        p = int(rng.integers(n - 1))
        swapped = base[:p] + [base[p + 1], base[p]] + base[p + 2:]
        q = int(rng.integers(n))
        new_dir = DIRECTIONS[(DIRECTIONS.index(base[q][2]) + 1 + int(rng.integers(3))) % 4]
        turned = base[:q] + [(*base[q][:2], new_dir)] + base[q + 1:]
        variants = [base, swapped, turned, base[::-1]]
        if len({tuple(v) for v in variants}) == GROUP and all(_valid_story(v) for v in variants):
            return variants


def event_video_events(seed: int, index: int) -> list[Event]:
    """The (colour, shape, direction) events of events-kind video `index`, in temporal order."""
    return list(_event_group_spec(seed, index // GROUP)[index % GROUP])


def describes(caption_events: list[Event], anchor: str | None, video: list[Event]) -> bool:
    """Whether a caption naming `caption_events` in order is true of a video with events `video`:
    they happen in that order (not necessarily back to back); anchor "start" / "end" also pins the
    first / last named event to the video's first / last event."""
    if anchor == "start" and (not video or video[0] != caption_events[0]):
        return False
    if anchor == "end" and (not video or video[-1] != caption_events[-1]):
        return False
    it = iter(video)
    return all(any(e == v for v in it) for e in caption_events)  # ordered subsequence


def _caption_text(rng: np.random.Generator, events: list[Event], anchor: str | None, whole: bool) -> str:
    """One caption naming `events` in order; `whole`: they are every event of the video (a paragraph)."""
    art = "the" if rng.random() < 0.5 else "a"
    ps = [_event_phrase(rng, *e, art) for e in events]
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    if anchor == "start":
        return pick(_START).format(p=ps[0])
    if anchor == "end":
        return pick(_END).format(p=ps[0])
    if len(ps) == 2:
        return pick(_TWO).format(p1=ps[0], p2=ps[1])
    if not whole:
        return pick(_THREE).format(p1=ps[0], p2=ps[1], p3=ps[2]) if len(ps) == 3 else ", then ".join(ps)
    # the whole story as a paragraph: one sentence per event
    sents = [f"First {ps[0]}."] + [f"{pick(_NEXT)} {p}." for p in ps[1:-1]] + [f"Finally {ps[-1]}."]
    return " ".join(sents)


def event_captions(seed: int, index: int, n: int = CAPTIONS_PER_VIDEO) -> list[dict]:
    """`n` distinct captions of events-kind video `index`, each {"text", "events" (indices into
    event_video_events, increasing), "anchor" (None, "start" or "end")}.

    One caption per kind in turn: one anchored event, two events, three events, every event.
    Each is drawn among the event subsets of its size that are true of this video and false of
    every sibling (`describes`); when a size has none, the next larger one is used (every event
    always qualifies: the four siblings' event lists differ).
    """
    from itertools import combinations

    group, variant = divmod(index, GROUP)
    spec = _event_group_spec(seed, group)
    ev = spec[variant]
    siblings = [v for k, v in enumerate(spec) if k != variant]
    rng = np.random.default_rng([seed, group, 20 + variant])
    m = len(ev)

    def candidates(size: int) -> list[tuple[tuple[int, ...], str | None]]:
        if size == 1:
            opts = [((0,), "start"), ((m - 1,), "end")]
        else:
            opts = [(c, None) for c in combinations(range(m), min(size, m))]
        return [(c, a) for c, a in opts
                if not any(describes([ev[i] for i in c], a, s) for s in siblings)]

    out, seen_sets, seen_text = [], set(), set()
    for kind in range(n):
        size = (1, 2, 3, m)[kind % 4]
        if size == 3 and m == 3:
            size = 2  # three of three events is the paragraph: ask for another pair instead
        opts = []
        while not opts:
            opts = [o for o in candidates(size) if o not in seen_sets] or (candidates(size) if size >= m else [])
            size += 1
        for _ in range(20):  # a fresh paraphrase (the text must differ from the captions so far)
            idx, anchor = opts[int(rng.integers(len(opts)))]
            text = _caption_text(rng, [ev[i] for i in idx], anchor, whole=len(idx) == m)
            if text not in seen_text:
                break
        seen_sets.add((idx, anchor))
        seen_text.add(text)
        out.append({"text": text, "events": list(idx), "anchor": anchor})
    return out


def render_event_frames(seed: int, index: int, size: int = 64, num_frames: int = 24) -> np.ndarray:
    """The frames of events-kind video `index`: [T, H, W, 3] uint8. Event k of n moves its object
    by one step over frames [k T/n, (k+1) T/n); the other objects stand still meanwhile."""
    events = event_video_events(seed, index)
    group, variant = divmod(index, GROUP)
    rng = np.random.default_rng([seed, group, 11 + variant])
    bg = _background(rng, size)
    objs = list(dict.fromkeys(e[:2] for e in events))  # objects that move, in order of first move
    n = len(events)
    r = size * 0.12
    margin = r + 1
    travel = min(size * 0.25, (size - 2 * margin) / _MAX_RANGE)

    def offset(obj, f):  # displacement of obj at frame f, in steps: [2]
        done = min(max((f + 0.5) / num_frames * n, 0.0), float(n))  # events completed (fractional)
        off = np.zeros(2)
        for k, (c, s, d) in enumerate(events):
            if (c, s) == obj:
                off += np.array(_DELTA[d], float) * min(max(done - k, 0.0), 1.0)
        return off

    offs = {o: np.stack([offset(o, f) for f in range(num_frames)]) for o in objs}  # obj -> [T, 2] steps
    best, best_gap = None, -1.0
    for _ in range(12):  # keep the objects apart: the candidate whose closest approach is largest
        starts = {}
        for o in objs:
            lo, hi = offs[o].min(axis=0), offs[o].max(axis=0)  # [2] step extremes of the path
            starts[o] = np.array([rng.uniform(margin - lo[a] * travel, size - margin - hi[a] * travel) for a in (0, 1)])
        pos = {o: starts[o][None, :] + offs[o] * travel for o in objs}  # obj -> [T, 2] pixels
        gap = min((float(np.min(np.linalg.norm(pos[a] - pos[b], axis=1)))
                   for i, a in enumerate(objs) for b in objs[i + 1:]), default=float(size))
        if gap > best_gap:
            best, best_gap = pos, gap
        if gap > 2.2 * r:
            break
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for f in range(num_frames):
        img = bg.copy()
        for colour, shape in objs:
            cx, cy = best[(colour, shape)][f]
            img[_shape_mask(shape, cx, cy, r, size)] = COLOURS[colour]
        frames[f] = np.clip(img, 0, 255).astype(np.uint8)
    return frames
