"""Inputs: a manifest (CSV, JSONL, Parquet) or a benchmark's annotation files, read into `Sample`s.

A manifest has columns `video` (local or fsspec path; relative paths resolve against the
manifest's folder, or `--videos DIR` when given), `caption` (a string, or a JSON list of
strings) and optional `key`, `split`, `start`, `end` (seconds, a clip of a longer video) and
`group` (a string naming a set of related samples, e.g. the clips of one source video or a set of
synthetic siblings; empty or absent = no group; `data.order=grouped` puts a group's members in
one global batch as hard negatives, pipeline/data/sampler.py).
The benchmark formats live in `dataprep/benchmarks.py`.

`check_samples` applies the input-stage checks (caption empty or not valid UTF-8, duplicate key)
and makes keys safe for WebDataset and DALI: only `[A-Za-z0-9_-]`, at most 64 characters; a
key that had to change gets a short hash of the original, which is kept as `orig_key`.

Owns: manifest inputs (CSV, JSONL, Parquet), input-stage checks and safe keys.
Must not touch: media work or shard writing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

from dataprep.benchmarks import read_benchmark
from dataprep.sample import Refusal, Sample
from pipeline.errors import UserError
from pipeline.storage import is_remote, join, open_store, parent

MANIFEST_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
MAX_KEY = 64


def safe_key(key: str) -> str:
    """A key WebDataset and DALI can use (no dots, slashes, `..`); stable; unique per original."""
    key = str(key)
    safe = _UNSAFE.sub("_", key).strip("_") or "sample"
    if safe == key and len(key) <= MAX_KEY:
        return key
    tag = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{safe[:MAX_KEY - 9]}-{tag}"


def parse_captions(value) -> list:
    """A caption cell -> list of strings: a JSON list, or a plain string (one caption)."""
    if value is None:
        return []
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    if isinstance(value, (list, tuple)):
        return [c.decode("utf-8", "surrogateescape") if isinstance(c, bytes) else str(c) for c in value]
    if hasattr(value, "tolist"):  # numpy array from parquet list columns
        return parse_captions(value.tolist())
    text = str(value)
    if text.lstrip().startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return [text]
        if isinstance(parsed, list):
            return [str(c) for c in parsed]
    return [text]


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # lone surrogates from surrogateescape: the bytes were not UTF-8
        return False


def _float_or_none(v):
    if v is None or v == "" or (isinstance(v, float) and v != v):
        return None
    return float(v)


def _group_or_none(v) -> str | None:
    """A `group` cell -> its name as a string, or None for empty / missing / NaN."""
    if v is None or (isinstance(v, float) and v != v):
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", "surrogateescape")
    text = str(v).strip()
    return text or None


def _resolve(path: str, base: str) -> str:
    if "://" in path or Path(path).is_absolute():
        return path
    return join(base, path)  # base may be an s3:// / gs:// / http(s):// prefix


def read_manifest(path: str | Path, videos_dir: str | Path | None = None, base: str | None = None) -> list[Sample]:
    """Read a CSV / JSONL / Parquet manifest into samples (keys not yet checked).

    Relative video paths resolve against `videos_dir`, else `base` (the folder or URL prefix the
    manifest came from, when `path` is a downloaded copy), else the manifest's folder."""
    path = Path(path)
    kind = MANIFEST_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{path}: unknown manifest type; use .csv, .jsonl or .parquet, or give --format")
    if not path.is_file():
        raise UserError(f"{path}: manifest not found")
    if kind == "csv":
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            first = f.readline()
            f.seek(0)
            delim = "\t" if path.suffix.lower() == ".tsv" or ("\t" in first and "," not in first) else ","
            rows = list(csv.DictReader(f, delimiter=delim))
    elif kind == "jsonl":
        rows = []
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise UserError(f"{path}:{n}: not valid JSON ({exc}); one object per line") from exc
    else:
        import pyarrow.parquet as pq
        rows = pq.read_table(path).to_pylist()
    if rows and ("video" not in rows[0] or "caption" not in rows[0]):
        raise UserError(f"{path}: needs columns 'video' and 'caption' (has {', '.join(rows[0])})")
    base = str(videos_dir) if videos_dir else (base or str(path.parent))
    samples = []
    for i, row in enumerate(rows):
        video = row.get("video")
        if isinstance(video, bytes):
            video = video.decode("utf-8", "surrogateescape")
        video = "" if video is None else str(video)
        key = row.get("key")
        if key in (None, ""):
            stem = Path(video).stem or f"row{i}"
            key = stem
            if _float_or_none(row.get("start")) is not None:
                key = f"{stem}_{row.get('start')}_{row.get('end')}"
        samples.append(Sample(key=str(key), video=_resolve(video, base) if video else "",
                              captions=parse_captions(row.get("caption")),
                              split=str(row.get("split") or "train"),
                              start=_float_or_none(row.get("start")), end=_float_or_none(row.get("end")),
                              group=_group_or_none(row.get("group"))))
    return samples


def check_samples(samples: list[Sample]) -> tuple[list[Sample], list[Refusal]]:
    """Input-stage checks: refuse empty / non-UTF-8 captions, empty paths and duplicate keys;
    make keys safe (original kept). Returns (accepted in input order, refused)."""
    good, bad, seen = [], [], set()
    for s in samples:
        orig = s.key
        if not s.video:
            bad.append(Refusal("", orig, "input", "no video path"))
            continue
        if not all(_is_utf8(c) for c in s.captions) or not _is_utf8(orig) or not _is_utf8(s.video):
            bad.append(Refusal(s.video.encode("utf-8", "backslashreplace").decode(),
                               orig.encode("utf-8", "backslashreplace").decode(), "input",
                               "caption or key is not valid UTF-8"))
            continue
        if s.group is not None and not _is_utf8(s.group):
            bad.append(Refusal(s.video, orig, "input", "group is not valid UTF-8"))
            continue
        captions = [c.strip() for c in s.captions]
        if not captions or not any(captions):
            bad.append(Refusal(s.video, orig, "input", "empty caption"))
            continue
        s.captions = [c for c in captions if c]
        s.key = safe_key(orig)
        s.orig_key = orig
        s.video_id = safe_key(s.video_id) if s.video_id else s.key
        if s.key in seen:
            bad.append(Refusal(s.video, orig, "input", "duplicate key"))
            continue
        if s.start is not None and s.end is not None and s.end <= s.start:
            bad.append(Refusal(s.video, orig, "input", f"clip end {s.end} <= start {s.start}"))
            continue
        if not re.fullmatch(r"[A-Za-z0-9_-]+", s.split):
            bad.append(Refusal(s.video, orig, "input", f"split {s.split!r} must be letters, digits, _ or -"))
            continue
        seen.add(s.key)
        good.append(s)
    return good, bad


def read_input(path: str | Path, fmt: str | None = None, videos_dir: str | Path | None = None,
               storage=None, **options) -> list[Sample]:
    """Samples from a manifest (fmt None/'manifest') or a benchmark format (msrvtt, msvd, lsmdc,
    didemo, activitynet). A folder given as a manifest means its manifest.{csv,jsonl,parquet}.
    A manifest may be an s3:// / gs:// / http(s):// URL (file or prefix); it is read once into
    memory and its relative video paths resolve against its URL prefix."""
    if is_remote(str(path)):
        return _read_remote_manifest(str(path), fmt, videos_dir, storage)
    path = Path(path)
    if fmt in (None, "manifest"):
        if path.is_dir():
            for name in ("manifest.csv", "manifest.jsonl", "manifest.parquet"):
                if (path / name).is_file():
                    return read_manifest(path / name, videos_dir)
            raise UserError(f"{path}: folder has no manifest.csv/.jsonl/.parquet; give the file or --format")
        return read_manifest(path, videos_dir)
    return read_benchmark(fmt, path, videos_dir, **options)


def _read_remote_manifest(url: str, fmt: str | None, videos_dir, storage) -> list[Sample]:
    import tempfile

    if fmt not in (None, "manifest"):
        raise UserError(f"{url}: benchmark annotations (--format {fmt}) are read from a local file; copy them "
                        "here (the videos, --videos, may stay in the object store)")
    name = url.rstrip("/").rsplit("/", 1)[1]
    if Path(name).suffix.lower() in MANIFEST_SUFFIXES:
        folder = parent(url)
    else:  # a prefix: its manifest.{csv,jsonl,parquet}
        folder, store = url.rstrip("/"), open_store(url, storage)
        name = next((n for n in ("manifest.csv", "manifest.jsonl", "manifest.parquet") if store.exists(n)), None)
        if name is None:
            raise UserError(f"{url}: no manifest.csv/.jsonl/.parquet under this prefix; give the file's URL")
    store = open_store(folder, storage)
    try:
        data = store.read(name)
    except FileNotFoundError:
        raise UserError(f"{join(folder, name)}: manifest not found") from None
    with tempfile.TemporaryDirectory(prefix="hiervl-manifest-") as tmp:
        local = Path(tmp) / name
        local.write_bytes(data)
        return read_manifest(local, videos_dir, base=folder)
