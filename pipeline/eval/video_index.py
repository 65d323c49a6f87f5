"""Embed any folder or manifest of videos for search: no shards, no captions needed.

    entries = list_videos(videos="clips/")                 # every video file under clips/
    entries = list_videos(entries=rows)                    # a manifest's rows (launch/search.py reads it)
    keys, embeddings, skipped = embed_videos(model, entries)

Each video is read whole and preprocessed exactly like an evaluation clip, by the one owner of
preprocessing (pipeline/data/preprocess.py: the eval frame plan and clip transform, decoded with
PyAV, any codec FFmpeg reads). The settings are the checkpoint's, so the embeddings match what
eval computes on the same clip once prepared.

A manifest is read by the one input-manifest reader, dataprep/sources.py (`hiervl search index
--manifest`, launch/search.py: captions optional there), and arrives here as entries.

Owns: listing videos for an index, decoding them for the model, embedding them in batches.
Must not touch: the index files (pipeline/eval/search.py) or the dataset contract.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hiervl.data.preprocess import Preprocessing
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


def list_videos(videos: str | Path | None = None, entries: list[CatalogEntry] | None = None) -> list[CatalogEntry]:
    """The videos to index: `entries` (a manifest's rows, read by dataprep/sources.py in
    `hiervl search index`), or every video file under `videos` (sorted); keys must be unique."""
    if entries is not None:
        entries = list(entries)
        if not entries:
            raise UserError("the manifest lists no videos")
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
    return _unique(entries)


def _unique(entries: list[CatalogEntry]) -> list[CatalogEntry]:
    seen: dict[str, str] = {}
    for e in entries:
        if e.key in seen:
            raise UserError(f"two videos have the key {e.key!r} ({seen[e.key]} and {e.path}); give a unique "
                            "`key` column in a manifest")
        seen[e.key] = e.path
    return entries


@torch.no_grad()
def embed_videos(model, entries: list[CatalogEntry], batch_size: int = 16, num_threads: int = 2,
                 progress: bool = True) -> tuple[list[str], dict[str, torch.Tensor], list[tuple[str, str]]]:
    """(keys of the videos embedded, {level: [N, ...]} float32 CPU, [(key, reason)] of the ones that failed).

    A video that cannot be read or decoded is skipped with its reason (logged, and listed in the
    index), never silently: the index says how many of the videos it holds.
    """
    from tqdm import tqdm

    param = next(model.parameters())
    prep = Preprocessing.from_config(model.cfg)
    keys, parts, skipped = [], [], []

    def work(e: CatalogEntry):
        try:
            return e, prep.clip_from_bytes(Path(e.path).read_bytes(), e.path), None  # [T, 3, S, S] float32
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
