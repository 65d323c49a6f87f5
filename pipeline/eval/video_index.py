"""Embed any folder or manifest of videos for search: no shards, no captions needed.

    entries = list_videos(videos="clips/")                 # every video file under clips/
    entries = list_videos(manifest="videos.csv")           # columns video (+ key, caption: optional)
    keys, embeddings, skipped = embed_videos(model, entries)

Each video is read whole and preprocessed exactly like an evaluation clip (pipeline/data/loader.py
with train=False): `data.num_frames` frames at the centres of equal segments of the whole video
(`frame_indices(n, T, None)`), the short side resized to `data.short_side`, a centre crop of
`data.size`, the training mean/std, decoded with PyAV (any codec FFmpeg reads). The settings are
the checkpoint's, so the embeddings match what eval computes on the same clip once prepared.

A manifest is CSV/TSV, JSONL or Parquet with a `video` column (a path, relative to the
manifest's folder or to `videos` when given), and optionally `key` (default: the path's stem)
and `caption` (a string, a JSON list of strings, or a list). Clip bounds (`start`/`end`) are
refused: cut the clips first, or `hiervl prep` them and index with `hiervl eval`.

Owns: listing videos for an index, decoding them for the model, embedding them in batches.
Must not touch: the index files (pipeline/eval/search.py) or the dataset contract.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hiervl.data.decode import transform_clip
from hiervl.data.sampler import frame_indices
from hiervl.errors import UserError
from hiervl.log import get_logger

log = get_logger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ogv", ".gif")
AUDIO_SUFFIXES = (".m4a", ".mp3", ".wav", ".aac", ".flac", ".ogg", ".opus", ".wma")  # reported, not indexed


@dataclass
class CatalogEntry:
    key: str
    path: str
    captions: list[str] = field(default_factory=list)


def audio_files(videos: str | Path) -> list[str]:
    """Audio files under a --videos folder (paths below it): not indexed (no picture), but reported."""
    root = Path(videos)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES) if root.is_dir() else []


def list_videos(videos: str | Path | None = None, manifest: str | Path | None = None) -> list[CatalogEntry]:
    """The videos to index: a manifest's rows, or every video file under `videos` (sorted)."""
    if manifest is not None:
        entries = _read_manifest(Path(manifest), Path(videos) if videos else None)
    elif videos is not None:
        root = Path(videos)
        if not root.is_dir():
            raise UserError(f"--videos {root}: not a directory; give a folder of video files or --manifest FILE")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        # key: the path below --videos without its extension; with it where two files share that
        # (clip.mkv beside clip.mp4), so no key collides
        stems = Counter(p.relative_to(root).with_suffix("").as_posix() for p in files)
        entries = [CatalogEntry(p.relative_to(root).with_suffix("").as_posix() if stems[
            p.relative_to(root).with_suffix("").as_posix()] == 1 else p.relative_to(root).as_posix(), str(p.resolve()))
            for p in files]
        if not entries:
            raise UserError(f"--videos {root}: no video files ({', '.join(VIDEO_SUFFIXES)}) in it or below")
    else:
        raise UserError("give the videos to index: --videos DIR or --manifest FILE")
    seen: dict[str, str] = {}
    for e in entries:
        if e.key in seen:
            raise UserError(f"two videos have the key {e.key!r} ({seen[e.key]} and {e.path}); give a unique "
                            "`key` column in a manifest")
        seen[e.key] = e.path
    return entries


def _captions(value, where: str) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return [value]
        else:
            return [value] if text else []
    if isinstance(value, (list, tuple)) and all(isinstance(c, str) for c in value):
        return [c for c in value if c.strip()]
    raise UserError(f"{where}: caption {value!r} is not a string or a list of strings; fix the cell or leave it empty")


def _read_manifest(path: Path, base: Path | None) -> list[CatalogEntry]:
    if not path.is_file():
        raise UserError(f"--manifest {path}: not found")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a BOM must not rename the first column
            first = f.readline()
            f.seek(0)
            delim = "\t" if suffix == ".tsv" or ("\t" in first and "," not in first) else ","
            rows = list(csv.DictReader(f, delimiter=delim))
    elif suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{n}: not valid JSON ({exc}); one object per line") from exc
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{n}: a JSON object per line is needed, got {type(row).__name__}")
                rows.append(row)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise UserError(f"--manifest {path}: use a .csv, .tsv, .jsonl or .parquet file")
    if not rows:
        raise UserError(f"--manifest {path}: no rows")
    columns = set(rows[0])
    if "video" not in columns:
        raise UserError(f"--manifest {path}: needs a 'video' column (has {', '.join(sorted(columns))})")
    if columns & {"start", "end"} and any(r.get("start") not in (None, "") or r.get("end") not in (None, "")
                                          for r in rows):
        raise UserError(f"--manifest {path}: clip bounds (start/end) are not supported by `search index`; cut the "
                        "clips into files first, or `hiervl prep` them and index with `hiervl eval`")
    root = base or path.parent
    out = []
    for n, row in enumerate(rows, 1):
        video = row.get("video")
        if not isinstance(video, str) or not video.strip():
            raise UserError(f"{path} row {n}: column 'video' is empty or not a path ({video!r})")
        p = Path(video) if Path(video).is_absolute() else root / video
        key = row.get("key")
        key = str(key) if key not in (None, "") else Path(video).stem
        caps = row.get("captions", row.get("caption"))
        out.append(CatalogEntry(key, str(p.resolve()), _captions(caps, f"{path} row {n}")))
    return out


def load_clip(path: str, data_cfg) -> torch.Tensor:
    """One whole video as the model's eval input, float32 [T, 3, S, S] (see the module docstring)."""
    from hiervl.data.video_file import decode_video_file, probe_video_file

    data = Path(path).read_bytes()
    info = probe_video_file(data, path)  # UserError: no video stream / unreadable / truncated / no frames
    frames = decode_video_file(data, frame_indices(info.frames, data_cfg.num_frames, None), path,
                               info.turns)  # uint8 [T, H, W, 3], upright
    return transform_clip(frames, data_cfg.short_side, data_cfg.size, (0.5, 0.5), False, data_cfg.mean, data_cfg.std)


@torch.no_grad()
def embed_videos(model, entries: list[CatalogEntry], batch_size: int = 16, num_threads: int = 2,
                 progress: bool = True) -> tuple[list[str], dict[str, torch.Tensor], list[tuple[str, str]]]:
    """(keys of the videos embedded, {level: [N, ...]} float32 CPU, [(key, reason)] of the ones that failed).

    A video that cannot be read or decoded is skipped with its reason (logged, and listed in the
    index), never silently: the index says how many of the videos it holds.
    """
    from tqdm import tqdm

    param = next(model.parameters())
    cfg = model.cfg.data
    keys, parts, skipped = [], [], []

    def work(e: CatalogEntry):
        try:
            return e, load_clip(e.path, cfg), None
        except FileNotFoundError:
            return e, None, "file not found"
        except Exception as exc:  # noqa: BLE001 - one bad video must not stop the index
            return e, None, f"{type(exc).__name__}: {exc}"

    bar = tqdm(total=len(entries), desc="index", unit="video", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        for start in range(0, len(entries), batch_size):
            clips, batch_keys = [], []
            for e, clip, err in pool.map(work, entries[start:start + batch_size]):
                if err is not None:
                    skipped.append((e.key, err))
                    log.warning("skipping %s (%s): %s", e.key, e.path, err)
                else:
                    clips.append(clip)
                    batch_keys.append(e.key)
            bar.update(min(batch_size, len(entries) - start))
            if not clips:
                continue
            v = model.encode_video(torch.stack(clips).to(param.device, param.dtype))  # level -> [b, ...]
            parts.append({k: (x.float() if x.is_floating_point() else x).cpu() for k, x in v.items()})
            keys += batch_keys
    bar.close()
    videos = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
    return keys, videos, skipped
