"""`hiervl prep --verify DIR`: re-read every shard with stock readers and check it against the manifest.

Two independent readers: the `webdataset` package (tar streaming, keys from member names) and
DALI's `fn.readers.webdataset` (through the `.idx` files, keys from each sample's JSON). For each,
the samples must match the manifest exactly: count, order, keys and the sha256 of the video
bytes. The `.idx` files must also equal what `wds2idx` would write for the tar as it is on disk,
and the manifest's member offsets must point at the video bytes. Returns a list of problems
(empty = verified).

Owns: `--verify`: re-reading a prepared dataset with stock readers.
Must not touch: writing or repairing anything.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

from hiervl.data.manifest import read_dataset_info, read_manifest
from hiervl.dataprep.shard_writer import index_text
from hiervl.errors import UserError


def _sha(b) -> str:
    return hashlib.sha256(bytes(b)).hexdigest()


def _tar_members(path: Path) -> list[tuple[str, int, int]]:
    with tarfile.open(path) as tf:
        return [(m.name, m.offset_data, m.size) for m in tf.getmembers() if m.isreg()]


def _check_files(out: Path, by_shard: dict, problems: list) -> None:
    for shard, rows in by_shard.items():
        tar = out / shard
        if not tar.is_file():
            problems.append(f"{shard}: missing")
            continue
        try:
            members = _tar_members(tar)
            expected_idx = index_text(members)
        except (tarfile.TarError, ValueError, OSError) as exc:
            problems.append(f"{shard}: unreadable tar ({exc})")
            continue
        idx = tar.with_suffix(".idx")
        if not idx.is_file() or idx.read_text() != expected_idx:
            problems.append(f"{idx.name}: does not match the tar (rebuild with wds2idx or rerun prep)")
        with open(tar, "rb") as f:
            for r in rows:
                f.seek(r["video_offset"])
                if _sha(f.read(r["video_size"])) != r["content_hash"]:
                    problems.append(f"{shard}: {r['key']}: bytes at the manifest offset do not match its hash")


def _check_webdataset(out: Path, by_shard: dict, problems: list) -> int:
    import webdataset as wds
    n = 0
    for shard, rows in by_shard.items():
        if not (out / shard).is_file():
            continue
        try:
            got = [(s["__key__"], _sha(s.get("webm", s.get("mp4", b"")))) for s in
                   wds.WebDataset(str(out / shard), shardshuffle=False, empty_check=False)]
        except Exception as exc:  # any reader failure is a verification failure
            problems.append(f"{shard}: webdataset reader failed ({type(exc).__name__}: {exc})")
            continue
        want = [(r["key"], r["content_hash"]) for r in rows]
        n += len(got)
        if got != want:
            bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            problems.append(f"{shard}: webdataset reader: {len(got)} samples vs {len(want)} in the manifest; "
                            f"first difference at sample {bad}")
    return n


def _check_dali(out: Path, by_shard: dict, problems: list) -> int:
    from nvidia.dali import fn, pipeline_def
    shards = [s for s in by_shard if (out / s).is_file()]
    if not shards:
        return 0
    want = [(r["key"], r["content_hash"]) for s in shards for r in by_shard[s]]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def reader():
        video, meta = fn.readers.webdataset(paths=[str(out / s) for s in shards],
                                            index_paths=[str((out / s).with_suffix(".idx")) for s in shards],
                                            ext=["webm;mp4", "json"], missing_component_behavior="error",
                                            random_shuffle=False, name="reader")
        return video, meta

    got = []
    try:
        pipe = reader()
        pipe.build()
        total = pipe.epoch_size("reader")
        for _ in range(total):
            video, meta = pipe.run()
            key = json.loads(bytes(meta.at(0)).decode("utf-8"))["key"]
            got.append((key, _sha(video.at(0))))
        del pipe
    except Exception as exc:  # DALI raises RuntimeError on a corrupt tar or index
        problems.append(f"DALI readers.webdataset failed ({type(exc).__name__}: {str(exc).splitlines()[0]})")
        return len(got)
    if got != want:
        bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        problems.append(f"DALI reader: {len(got)} samples vs {len(want)} in the manifest; first difference at {bad}")
    return len(got)


VERIFY_COLUMNS = ["key", "split", "shard", "index_in_shard", "video_offset", "video_size", "content_hash"]


def verify(out_dir: str | Path, dali: bool = True) -> dict:
    """Check a prepared dataset; {'problems': [...], 'samples': n, 'webdataset': n, 'dali': n}."""
    out = Path(out_dir)
    problems: list[str] = []
    for name in ("manifest.parquet", "dataset.json"):
        if not (out / name).is_file():
            return {"problems": [f"{out / name}: missing (is {out} a prepared dataset?)"], "samples": 0}
    try:  # damaged metadata: one problem line naming the file and the fix, not a traceback
        rows = read_manifest(out / "manifest.parquet", VERIFY_COLUMNS).to_pylist()
        dataset = read_dataset_info(out)
    except UserError as exc:
        return {"problems": [str(exc)], "samples": 0}
    by_shard: dict[str, list] = {}
    for r in sorted(rows, key=lambda r: (r["shard"], r["index_in_shard"])):
        by_shard.setdefault(r["shard"], []).append(r)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["split"]] = counts.get(r["split"], 0) + 1
    if counts != dataset.get("counts"):
        problems.append(f"dataset.json counts {dataset.get('counts')} != manifest {counts}")
    if len({r["key"] for r in rows}) != len(rows):
        problems.append("manifest: duplicate keys")
    _check_files(out, by_shard, problems)
    n_wds = _check_webdataset(out, by_shard, problems)
    n_dali = _check_dali(out, by_shard, problems) if dali else None
    return {"problems": problems, "samples": len(rows), "webdataset": n_wds, "dali": n_dali}
