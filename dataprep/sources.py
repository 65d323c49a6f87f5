"""Inputs: a manifest (CSV/TSV, JSONL, JSON list, Parquet) or a benchmark's annotation files, read into `Sample`s.

A manifest has columns `video` (a local path or an s3://, gs://, http(s):// URL; relative paths resolve against the
manifest's folder, or `--videos DIR` when given), `caption` (a string, or a JSON list of
strings) and optional `key`, `split`, `start`, `end` (seconds, a clip of a longer video) and
`group` (a string naming a set of related samples, e.g. the clips of one source video or a set of
synthetic siblings; empty or absent = no group; `data.order=grouped` puts a group's members in
one global batch as hard negatives, pipeline/data/sampler.py).
The benchmark formats live in `dataprep/benchmarks.py`. CSV and JSON may start with a UTF-8 BOM.

What is refused, and how (one policy for every format):
- the file's structure (not valid CSV/JSON, a JSONL line or JSON element that is not an object,
  no `video` / `caption` column): the whole manifest, before any work, in one line
  `FILE:ROW: what is wrong; the fix` (UserError);
- a bad cell (a caption that is a number, null inside a list, an object or a Parquet struct; a
  `start` / `end` that is not a finite number of seconds or is negative; a list or object where
  text belongs; a CSV row with more cells than the header): that row only, quarantined at stage
  `input` with `bad manifest cell (row N, column C: what is wrong)`. ROW is the line for CSV and
  JSONL, the 1-based position for a JSON list or Parquet.

`check_samples` applies the input-stage checks (a bad cell, caption empty or not valid UTF-8,
duplicate key, negative or empty clip times)
and makes keys safe for WebDataset and DALI: only `[A-Za-z0-9_-]`, at most 64 characters; a
key that had to change gets a short hash of the original, which is kept as `orig_key`.

Owns: manifest inputs (CSV/TSV, JSONL, JSON, Parquet), the one reader of their cells, input-stage checks
and safe keys.
Must not touch: media work or shard writing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from pathlib import Path

from hiervl.dataprep.benchmarks import read_benchmark
from hiervl.dataprep.sample import Refusal, Sample
from hiervl.errors import UserError
from hiervl.storage import as_local_path, is_remote, join, open_store, parent

MANIFEST_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
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


class BadCell(ValueError):
    """A manifest cell of the wrong type or value; the row is quarantined with this reason."""


def parse_captions(value) -> list:
    """A caption cell -> list of strings: a string (one caption, or a JSON list of strings as text),
    or a list of strings (JSON / Parquet list columns). Null / NaN -> [] (an empty caption).
    Anything else (a number, a bool, a JSON object, a Parquet struct, a list holding a non-string)
    raises `BadCell`: turning it into "42" or "None" would train on text nobody wrote."""
    if value is None or (isinstance(value, float) and value != value):
        return []
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy array from parquet list columns
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        out = []
        for c in value:
            if isinstance(c, bytes):
                c = c.decode("utf-8", "surrogateescape")
            if not isinstance(c, str):
                raise BadCell(f"a caption list holds {_describe(c)}; every caption must be a string")
            out.append(c)
        return out
    if not isinstance(value, str):
        raise BadCell(f"{_describe(value)} is not a caption; give a string or a list of strings")
    if value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return [value]
        if isinstance(parsed, list):
            return parse_captions(parsed)
    return [value]


def _describe(v) -> str:
    """`v` for a message: its type and a short repr ("a number (42)", "null", "an object ({...})")."""
    if v is None:
        return "null"
    kind = ("a bool" if isinstance(v, bool) else "a number" if isinstance(v, (int, float))
            else "an object" if isinstance(v, dict) else "a list" if isinstance(v, (list, tuple))
            else f"a {type(v).__name__}")
    text = repr(v)
    return f"{kind} ({text[:40] + '...' if len(text) > 40 else text})"


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # lone surrogates from surrogateescape: the bytes were not UTF-8
        return False


def _printable(text: str) -> str:
    """`text` writable as UTF-8: lone surrogates (bytes that were not UTF-8, or a JSON "\\ud800")
    shown as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _seconds_or_none(v, column: str):
    """A `start` / `end` cell -> seconds (finite, >= 0) or None for empty / null / NaN; else BadCell."""
    if v is None or (isinstance(v, str) and v.strip().lower() in ("", "nan")) or (isinstance(v, float) and v != v):
        return None  # empty, null, NaN (also as pandas writes it in a CSV): no clip time
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise BadCell(f"{_describe(v)} is not a number of seconds")
    try:
        x = float(v)
    except ValueError:
        raise BadCell(f"{v!r} is not a number of seconds") from None
    if not math.isfinite(x):
        raise BadCell(f"{v!r} is not a finite number of seconds")
    if x < 0:
        raise BadCell(f"{v!r} is negative; clip times are seconds from the video's start (>= 0)")
    return x


def _text_or_none(v, column: str) -> str | None:
    """A text cell (video, key, split, group) -> its string, or None for empty / missing / NaN.
    Numbers become their string (an id 7 -> "7"); lists, objects and bools are refused."""
    if v is None or (isinstance(v, float) and v != v):
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", "surrogateescape")
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise BadCell(f"{_describe(v)} is not text")
    text = str(v).strip()
    return text or None


def _resolve(path: str, base: str) -> str:
    if is_remote(path) or Path(as_local_path(path)).is_absolute():
        return path
    return join(base, path)  # base may be an s3:// / gs:// / http(s):// prefix


def _structure_error(path: Path, where, what: str) -> UserError:
    """A problem with the manifest file itself: the whole manifest is refused (file:row, what, fix)."""
    return UserError(f"{path}:{where}: {what}")


def _needs(path: Path, columns, caption_required: bool) -> None:
    """The manifest's columns: `video`, and `caption` too unless `caption_required` is off."""
    columns = list(columns)
    want = ("video", "caption") if caption_required else ("video",)
    if not all(c in columns for c in want):
        raise UserError(f"{path}: needs column{'s' if len(want) > 1 else ''} {' and '.join(repr(c) for c in want)} "
                        f"(has {', '.join(map(str, columns))})")


def _read_rows(path: Path, kind: str, caption_required: bool = True) -> list[tuple[int, dict]]:
    """(row number, row) pairs; the number is the line for CSV / JSONL, the position for JSON / Parquet.
    A file that cannot be read as rows at all raises UserError naming the row and the fix."""
    if kind == "csv":
        # utf-8-sig: a BOM (Excel's "CSV UTF-8") would otherwise become part of the first column's name
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            first = f.readline()
            f.seek(0)
            delim = "\t" if path.suffix.lower() == ".tsv" or ("\t" in first and "," not in first) else ","
            reader = csv.reader(f, delimiter=delim)
            try:
                header = next(reader, None)
                if header is None:
                    return []
                header = [h.strip() for h in header]
                twice = sorted({h for h in header if header.count(h) > 1})
                if twice:
                    raise _structure_error(path, 1, f"column {', '.join(twice)} appears more than once in the "
                                                    "header; keep one")
                rows = []
                for cells in reader:
                    if not cells:
                        continue
                    row = dict(zip(header, cells))
                    if len(cells) > len(header):  # DictReader would hide these under the key None
                        row[_EXTRA] = (len(cells), len(header))
                    rows.append((reader.line_num, row))
            except csv.Error as exc:
                raise _structure_error(path, reader.line_num, f"not valid CSV ({exc}); quote cells that hold "
                                                              "the delimiter, quotes or line breaks") from None
        _needs(path, header, caption_required)
        return rows
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"{path}: not a readable Parquet file ({exc}); write it again") from None
        _needs(path, table.column_names, caption_required)
        return list(enumerate(table.to_pylist(), 1))
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        text = f.read()
    if kind == "json" and text.lstrip().startswith("["):  # a JSON array of row objects
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _structure_error(path, exc.lineno, f"not valid JSON ({exc.msg}); give a JSON list of objects "
                                                     "or one object per line (JSONL)") from None
        rows = list(enumerate(items, 1))
        unit = "element"
    else:  # JSONL: one object per line (also a .json holding that)
        rows = []
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a string
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise _structure_error(path, n, f"not valid JSON ({exc.msg}); one object per line") from None
        unit = "line"
    for n, row in rows:
        if not isinstance(row, dict):
            raise _structure_error(path, n, f"{unit} is {_describe(row)}, not an object; write each row as "
                                            '{"video": ..., "caption": ...}')
    if rows:
        _needs(path, rows[0][1], caption_required)
    return rows


_EXTRA = object()  # marks a CSV row with more cells than the header


def _row_sample(row: dict, n: int, i: int, base: str) -> Sample:
    """One manifest row -> a Sample; a bad cell makes a Sample carrying `invalid` (quarantined by
    `check_samples` with the row number and column), so one bad row never stops the others."""
    problems = []

    def cell(column, parse, default=None):
        try:
            return parse(row.get(column), column)
        except BadCell as exc:
            problems.append(f"column {column}: {exc}")
            return default

    video = cell("video", _text_or_none) or ""
    key = cell("key", _text_or_none)
    captions = cell("caption" if "caption" in row or "captions" not in row else "captions",
                    lambda v, c: parse_captions(v), [])
    split = cell("split", _text_or_none) or "train"
    start = cell("start", _seconds_or_none)
    end = cell("end", _seconds_or_none)
    group = cell("group", _text_or_none)
    if _EXTRA in row:
        problems.append("{} cells but the header has {} (a delimiter inside an unquoted caption? quote "
                        "that cell)".format(*row[_EXTRA]))
    if key is None:
        key = Path(video).stem or f"row{i}"
        if start is not None:
            key = f"{key}_{row.get('start')}_{row.get('end')}"
    invalid = f"bad manifest cell (row {n}, {'; '.join(problems)})" if problems else None
    return Sample(key=key, video=_resolve(video, base) if video else "", captions=captions, split=split,
                  start=start, end=end, group=group, invalid=invalid)


def read_manifest(path: str | Path, videos_dir: str | Path | None = None, base: str | None = None,
                  caption_required: bool = True) -> list[Sample]:
    """Read a CSV / TSV / JSONL / JSON (a list of objects) / Parquet manifest into samples (keys not yet
    checked). The file's structure is all-or-nothing (UserError naming file:row and the fix); a bad
    cell only marks its row's sample `invalid`, quarantined with the row and column by check_samples.

    Relative video paths resolve against `videos_dir`, else `base` (the folder or URL prefix the
    manifest came from, when `path` is a downloaded copy), else the manifest's folder.
    `caption_required=False` (a list of videos to index for search): the caption column is optional."""
    path = Path(path)
    kind = MANIFEST_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{path}: unknown manifest type; use .csv, .tsv, .jsonl, .json or .parquet, or give --format")
    if not path.is_file():
        raise UserError(f"{path}: manifest not found")
    rows = _read_rows(path, kind, caption_required)
    base = str(videos_dir) if videos_dir else (base or str(path.parent))
    return [_row_sample(row, n, i, base) for i, (n, row) in enumerate(rows)]


# extreme cells: each would be copied into every shard's JSON and the manifest, or break a path
MAX_CAPTION_CHARS = 20_000  # one caption (a paragraph-level dataset's longest are a few thousand)
MAX_CAPTIONS = 1_000  # captions of one sample
MAX_KEY_CHARS = 1_024  # an input key (kept as orig_key; the shard key is safe_key's, at most MAX_KEY)
MAX_PATH_CHARS = 4_096  # a video path or URL (PATH_MAX)
MAX_SECONDS = 1e7  # a clip time (115 days): beyond, frame arithmetic is meaningless


def _absurd(s: Sample, key: str) -> str | None:
    """Why a sample's cells are out of any sane range (NaN / infinite / huge times, huge or too many
    captions, a huge key, a path with a NUL byte or longer than PATH_MAX), or None."""
    for name in ("start", "end"):
        t = getattr(s, name)
        if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t)):
            return f"clip {name} {t!r} is not a finite number of seconds"
        if t is not None and abs(t) > MAX_SECONDS:
            return f"clip {name} {t:g} s is past any video (more than {MAX_SECONDS:g} s)"
    if len(s.captions) > MAX_CAPTIONS:
        return f"{len(s.captions)} captions, more than {MAX_CAPTIONS} for one video"
    longest = max((len(c) for c in s.captions), default=0)
    if longest > MAX_CAPTION_CHARS:
        return f"a caption of {longest:,} characters, longer than {MAX_CAPTION_CHARS:,}"
    if len(key) > MAX_KEY_CHARS:
        return f"a key of {len(key):,} characters, longer than {MAX_KEY_CHARS:,}"
    if "\x00" in s.video or len(s.video) > MAX_PATH_CHARS:
        return ("video path holds a NUL byte" if "\x00" in s.video else
                f"video path of {len(s.video):,} characters, longer than {MAX_PATH_CHARS:,}")
    return None


def check_samples(samples: list[Sample]) -> tuple[list[Sample], list[Refusal]]:
    """Input-stage checks: refuse empty / non-UTF-8 captions, empty paths and duplicate keys;
    make keys safe (original kept). Returns (accepted in input order, refused)."""
    good, bad, seen = [], [], set()
    for s in samples:
        orig = s.key
        if s.invalid:  # its cells may hold bytes that are not UTF-8 too: the quarantine row must be writable
            bad.append(Refusal(_printable(s.video), _printable(orig), "input", _printable(s.invalid)))
            continue
        if not s.video:
            bad.append(Refusal("", orig, "input", "no video path"))
            continue
        if not all(_is_utf8(c) for c in s.captions) or not _is_utf8(orig) or not _is_utf8(s.video):
            bad.append(Refusal(_printable(s.video), _printable(orig), "input", "caption or key is not valid UTF-8"))
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
        absurd = _absurd(s, orig)
        if absurd:
            bad.append(Refusal(_printable(s.video[:300]), _printable(orig[:300]), "input", absurd))
            continue
        if (s.start is not None and s.start < 0) or (s.end is not None and s.end < 0):
            bad.append(Refusal(s.video, orig, "input", f"negative clip time (start {s.start}, end {s.end}); "
                                                       "clip times are seconds from the video's start"))
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


def manifest_path(path: str | Path) -> Path:
    """The manifest file a `--input` names: the file, or a folder's manifest.{csv,jsonl,parquet}."""
    path = Path(path)
    if path.is_dir():
        for name in ("manifest.csv", "manifest.jsonl", "manifest.parquet"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path}: folder has no manifest.csv/.jsonl/.parquet; give the file or --format")
    return path


def read_input(path: str | Path, fmt: str | None = None, videos_dir: str | Path | None = None,
               storage=None, **options) -> list[Sample]:
    """Samples from a manifest (fmt None/'manifest') or a benchmark format (msrvtt, msvd, lsmdc,
    didemo, activitynet). A folder given as a manifest means its manifest.{csv,jsonl,parquet}.
    A manifest may be an s3:// / gs:// / http(s):// URL (file or prefix); it is read once into
    memory and its relative video paths resolve against its URL prefix."""
    if is_remote(str(path)):
        return _read_remote_manifest(str(path), fmt, videos_dir, storage)
    if fmt in (None, "manifest"):
        return read_manifest(manifest_path(path), videos_dir)
    return read_benchmark(fmt, Path(path), videos_dir, **options)


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
    except OSError as exc:  # the store unreachable past storage.retries: one line (the message names the URL)
        raise UserError(f"could not read the input manifest: {exc}; check the URL and the network, or raise "
                        "storage.retries") from None
    with tempfile.TemporaryDirectory(prefix="hiervl-manifest-") as tmp:
        local = Path(tmp) / name
        local.write_bytes(data)
        return read_manifest(local, videos_dir, base=folder)
