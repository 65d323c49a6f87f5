"""The standard retrieval benchmarks' annotation files, read into `Sample`s (`--format NAME`).

Parsed from the real public files (fixtures in shared/fixtures, described in SOURCES.md there):
- msrvtt: the split CSVs. The 1k-A test CSV (`key,vid_key,video_id,sentence`; the canonical
  comma/LF file or the semicolon/CRLF re-save users also have: the delimiter is sniffed from the
  header) gives one sample per row, its sentence as the caption. A `video_id`-only list (the 9k /
  7k train CSVs) takes captions from MSRVTT_data.json beside it.
- didemo: `{train,val,test}_data.json` (a list of {description, times, video, annotation_id,...}).
  Retrieval is video-paragraph: one sample per video, its descriptions joined in time order
  (by the mean annotated start segment, then end, then annotation_id), as the peers evaluate it.
  `segments=True` gives one clip per description instead (the most common annotated
  [start, end] 5-second segment pair).
- activitynet: ActivityNet Captions `train.json` / `val_1.json` / `val_2.json` (a dict keyed by
  `v_<youtube id>` of {duration, timestamps, sentences}). Video-paragraph by default (sentences
  stripped, sorted by start time, joined); `segments=True`: one clip per sentence.
- msvd: `youtube_mapping.txt` (real file: `<clip name> vid<N>` per line, CRLF) for the names and
  the standard split (vid1-1200 train, 1201-1300 val, 1301-1970 test).

Built from published descriptions only (no copy of the file could be had; see the docs):
- MSRVTT_data.json: {"videos": [{"video_id", "split", ...}], "sentences": [{"video_id",
  "caption", "sen_id"}]} as released with MSR-VTT and used by CLIP4Clip.
- MSVD captions: the "MSR Video Description Corpus" CSV (columns VideoID, Start, End, WorkerID,
  Source, AnnotationTime, Language, Description; English rows kept), found beside the mapping.
- LSMDC: `LSMDC16_annos_*.csv` / `LSMDC16_challenge_1000_publictect.csv`, tab-separated
  `clip_id, start_aligned, end_aligned, start_extracted, end_extracted, sentence`; videos under
  `<movie>/<clip_id>.avi` where `<movie>` is the clip id up to its last `_`.

Videos are looked up under `videos_dir` by name (any of the usual extensions); a video the
annotations name but the folder lacks is still emitted and quarantined as missing at probe.

Owns: each benchmark's annotation format (msrvtt, msvd, lsmdc, didemo, activitynet) read into `Sample`s.
Must not touch: media work, planning or writing shards.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

from hiervl.dataprep.sample import Sample
from hiervl.errors import UserError
from hiervl.storage import is_remote

FORMATS = ("msrvtt", "msvd", "lsmdc", "didemo", "activitynet")
VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".wmv", ".3gp")


def find_video(videos_dir: Path | None, name: str, stems: tuple = ()) -> str:
    """Path of a video under `videos_dir`: `name` itself, else any stem with a usual extension.
    When nothing exists, the first candidate (quarantined as missing later)."""
    if videos_dir is not None and is_remote(str(videos_dir)):  # an object-store prefix: no listing per video,
        return str(videos_dir).rstrip("/") + "/" + name  # so the name as the annotations give it
    base = Path(videos_dir) if videos_dir else Path(".")
    first = base / name
    if first.is_file():
        return str(first)
    for stem in stems or (Path(name).stem,):
        for ext in VIDEO_EXTS:
            p = base / f"{stem}{ext}"
            if p.is_file():
                return str(p)
    return str(first)


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8-sig", "surrogateescape")


# ---------------------------------------------------------------------------- MSR-VTT


def read_msrvtt(path: Path, videos_dir, split: str | None = None, data_json: str | None = None) -> list[Sample]:
    path = Path(path)
    if path.suffix == ".json":
        return _msrvtt_from_json(path, videos_dir, only=None, split=split)
    text = _read_text(path)
    header = text.split("\n", 1)[0].rstrip("\r")
    delim = ";" if header.count(";") > header.count(",") else ","
    rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delim))
    if not rows:
        raise UserError(f"{path}: no rows")
    if "sentence" in rows[0]:  # the 1k-A test file: one caption per video
        out = []
        for r in rows:
            vid = r["video_id"].strip()
            out.append(Sample(key=vid, video=find_video(videos_dir, f"{vid}.mp4"), captions=[r["sentence"]],
                              split=split or "test", video_id=vid, extra={"ret_key": r.get("key")}))
        return out
    ids = [r["video_id"].strip() for r in rows]
    json_path = Path(data_json) if data_json else path.parent / "MSRVTT_data.json"
    if not json_path.is_file():
        raise UserError(f"{path}: a video_id list needs MSRVTT_data.json for captions; put it beside the CSV "
                        f"or pass data_json (looked for {json_path})")
    return _msrvtt_from_json(json_path, videos_dir, only=ids, split=split or "train")


def _msrvtt_from_json(path: Path, videos_dir, only: list | None, split: str | None) -> list[Sample]:
    data = json.loads(_read_text(path))
    caps: dict[str, list] = {}
    for s in sorted(data.get("sentences", []), key=lambda s: s.get("sen_id", 0)):
        caps.setdefault(s["video_id"], []).append(s["caption"])
    splits = {v["video_id"]: v.get("split", "train") for v in data.get("videos", [])}
    ids = only if only is not None else list(splits) or list(caps)
    return [Sample(key=v, video=find_video(videos_dir, f"{v}.mp4"), captions=caps.get(v, []),
                   split=split or {"validate": "val"}.get(splits.get(v, "train"), splits.get(v, "train")),
                   video_id=v) for v in ids]


# ---------------------------------------------------------------------------- MSVD


def msvd_split(n: int) -> str:
    return "train" if n <= 1200 else "val" if n <= 1300 else "test"


def read_msvd(path: Path, videos_dir, corpus_csv: str | None = None, split: str | None = None) -> list[Sample]:
    """`path`: youtube_mapping.txt (or its folder); captions from the MSR Video Description Corpus CSV."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    mapping = path / "youtube_mapping.txt" if path.is_dir() else path
    names = []
    for line in _read_text(mapping).splitlines():
        if line.strip():
            clip, vid = line.split()
            names.append((clip, int(vid[3:])))
    corpus = Path(corpus_csv) if corpus_csv else next(
        (p for p in (folder / "MSR Video Description Corpus.csv", folder / "video_corpus.csv") if p.is_file()), None)
    caps: dict[str, list] = {}
    if corpus is not None:
        for r in csv.DictReader(io.StringIO(_read_text(corpus), newline="")):
            if (r.get("Language") or "").strip().lower() == "english":
                clip = f"{r['VideoID']}_{r['Start']}_{r['End']}"
                caps.setdefault(clip, []).append((r.get("Description") or "").strip())
    return [Sample(key=clip, video=find_video(videos_dir, f"{clip}.avi"), captions=caps.get(clip, []),
                   split=split or msvd_split(n), video_id=clip, extra={"vid": f"vid{n}"}) for clip, n in names]


# ---------------------------------------------------------------------------- LSMDC


def read_lsmdc(path: Path, videos_dir, split: str | None = None) -> list[Sample]:
    path = Path(path)
    name = path.name.lower()
    split = split or ("test" if ("test" in name or "publictect" in name) else "val" if "val" in name else "train")
    out = []
    for line in _read_text(path).splitlines():
        parts = line.split("\t")
        if len(parts) < 6:
            continue
        clip, sentence = parts[0].strip(), parts[5].strip()
        movie = clip.rsplit("_", 1)[0]
        folder = f"{videos_dir}/{movie}" if is_remote(str(videos_dir)) else Path(videos_dir or ".") / movie
        out.append(Sample(key=clip, video=find_video(folder, f"{clip}.avi"),
                          captions=[sentence], split=split, video_id=clip))
    return out


# ---------------------------------------------------------------------------- DiDeMo


def _didemo_span(times: list) -> tuple[int, int]:
    """Most common annotated [start, end] segment pair (ties: earliest)."""
    counts = Counter(tuple(t) for t in times)
    best = max(counts.values())
    return min(t for t, c in counts.items() if c == best)


def read_didemo(path: Path, videos_dir, split: str | None = None, segments: bool = False) -> list[Sample]:
    path = Path(path)
    split = split or next((s for s in ("train", "val", "test") if s in path.name), "test")
    records = json.loads(_read_text(path))
    by_video: dict[str, list] = {}
    for r in records:
        by_video.setdefault(r["video"], []).append(r)
    out = []
    for video, recs in by_video.items():
        vpath = find_video(videos_dir, video, stems=(video.rsplit(".", 1)[0],))
        vid = video  # the full file name: some names differ only in their extension
        if segments:
            for r in recs:
                a, b = _didemo_span(r["times"])
                out.append(Sample(key=f"{vid}_{r['annotation_id']}", video=vpath, captions=[r["description"]],
                                  split=split, start=5.0 * a, end=5.0 * (b + 1), video_id=vid,
                                  extra={"annotation_id": r["annotation_id"]}))
            continue
        recs = sorted(recs, key=lambda r: (sum(t[0] for t in r["times"]) / len(r["times"]),
                                           sum(t[1] for t in r["times"]) / len(r["times"]), r["annotation_id"]))
        sents = [r["description"].strip() for r in recs]
        out.append(Sample(key=vid, video=vpath, captions=[" ".join(sents)], split=split, video_id=vid,
                          sentences=sents, extra={"annotation_ids": [r["annotation_id"] for r in recs]}))
    return out


# ---------------------------------------------------------------------------- ActivityNet Captions


def read_activitynet(path: Path, videos_dir, split: str | None = None, segments: bool = False) -> list[Sample]:
    path = Path(path)
    split = split or ("val" if "val" in path.name else "test" if "test" in path.name else "train")
    data = json.loads(_read_text(path))
    out = []
    for vid, ann in data.items():
        vpath = find_video(videos_dir, f"{vid}.mp4", stems=(vid, vid[2:] if vid.startswith("v_") else vid))
        pairs = sorted(zip(ann["timestamps"], (s.strip() for s in ann["sentences"])),
                       key=lambda p: (float(p[0][0]), float(p[0][1])))
        if segments:
            for i, ((a, b), sent) in enumerate(pairs):
                out.append(Sample(key=f"{vid}_{i}", video=vpath, captions=[sent], split=split, start=float(a),
                                  end=float(b), video_id=vid, extra={"duration": ann.get("duration")}))
            continue
        sents = [s for _, s in pairs]
        out.append(Sample(key=vid, video=vpath, captions=[" ".join(sents)], split=split, video_id=vid,
                          sentences=sents, extra={"duration": ann.get("duration")}))
    return out


def read_benchmark(fmt: str, path: Path, videos_dir=None, **options) -> list[Sample]:
    """Dispatch on the format name; `options` go to the reader (split, segments, ...)."""
    readers = {"msrvtt": read_msrvtt, "msvd": read_msvd, "lsmdc": read_lsmdc, "didemo": read_didemo,
               "activitynet": read_activitynet}
    if fmt not in readers:
        raise UserError(f"--format {fmt!r}: choose one of manifest, {', '.join(FORMATS)}")
    if not Path(path).exists():
        raise UserError(f"{path}: annotation file not found")
    return readers[fmt](Path(path), videos_dir, **options)
