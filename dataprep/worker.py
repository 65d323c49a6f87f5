"""One shard's work: process its samples, write tar + DALI index, then the stats record (done marker).

`write_shard` is a plain, picklable function of (shard spec, output config, out dir): the Ray
driver runs one task per shard, tests call it directly. Order of writes: tar, index, stats, each
renamed into place; the stats record is last, so its presence means the shard is whole. It holds
the shard's manifest rows and refusals (built by pipeline/data/manifest.py), so the driver can
build the manifest from the records without touching the tars again. Everything in it is deterministic (no timings), so a rerun
gives the same bytes. A sample's optional `group` goes into its JSON and its manifest row only
when it has one, so the shards of inputs without groups are byte-identical to before the column.

Object storage: with `out_dir` an s3:// / gs:// prefix the same files are written to a local temporary
folder and then uploaded, each as one complete object under its final name (an object-store PUT is
atomic: nothing partial is ever visible), the stats record last; `is_done` checks the uploaded tar's
size against the record, so a rerun skips finished shards and rewrites the rest with the same bytes.

Owns: one shard's work and its stats record (the done marker).
Must not touch: Ray itself or the dataset-level files (driver).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from hiervl.atomic_write import write_atomic
from hiervl.data.manifest import manifest_row, quarantine_row
from hiervl.dataprep.shard_writer import ShardWriter, index_text
from hiervl.dataprep.transcode import SampleRefused, process_sample
from hiervl.dataprep.watchdog import SampleWatchdog
from hiervl.storage import configure, is_remote, open_store


def stats_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.stats.json"


def read_stats(out_dir: str | Path, name: str, storage=None) -> dict | None:
    """Shard `name`'s stats record in `out_dir` (a folder or an s3:// / gs:// prefix), None if absent."""
    try:
        return json.loads(open_store(str(out_dir), storage).read(f"{name}.stats.json"))
    except (OSError, json.JSONDecodeError):
        return None


def _dumps(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def write_shard(spec: dict, out_cfg: dict, out_dir: str, storage: dict | None = None,
                decode_timeout_s: float = 0.0) -> dict:
    """Process and write shard `spec`; return its stats record (also written as {name}.stats.json).

    `out_dir` an object-store prefix (s3://, gs://): the shard is written to a local temporary folder
    first, then uploaded file by file, each a complete object under its final name (a PUT is atomic),
    the stats record last. `storage`: the StorageConfig fields (endpoint, retries), as a dict.
    `decode_timeout_s` > 0: each sample runs in a child process killed past that time (dataprep/watchdog.py)."""
    if storage is not None:
        configure(storage)  # this process's defaults: the remote sources this shard reads use them too
    if not is_remote(out_dir):
        return _write_shard(spec, out_cfg, out_dir, decode_timeout_s)
    store = open_store(out_dir, storage)
    with tempfile.TemporaryDirectory(prefix=f"hiervl-{spec['name']}-") as stage:
        stats = _write_shard(spec, out_cfg, stage, decode_timeout_s)
        for name in (stats["tar"], f"{spec['name']}.idx"):
            if name and (Path(stage) / name).is_file():
                store.put_file(name, Path(stage) / name)
        store.put_file(stats_path(stage, spec["name"]).name, stats_path(stage, spec["name"]))  # the done marker
    return stats


def _write_shard(spec: dict, out_cfg: dict, out_dir: str, decode_timeout_s: float = 0.0) -> dict:
    """`write_shard` into a local folder."""
    out = Path(out_dir)
    tar_name = f"{spec['name']}.tar"
    rows, refused, writer = [], [], None
    source_seconds = 0.0
    dog = SampleWatchdog(decode_timeout_s) if decode_timeout_s > 0 else None
    process = dog.process if dog is not None else process_sample
    try:
        for s in spec["samples"]:
            try:
                blob, ext, meta = process(s, out_cfg)
            except SampleRefused as exc:
                refused.append(quarantine_row(s["video"], s["orig_key"], exc.stage, exc.reason))
                continue
            except Exception as exc:  # a bug or an exotic file: keep going, say what happened
                refused.append(quarantine_row(s["video"], s["orig_key"], "internal", f"{type(exc).__name__}: {exc}"))
                continue
            if writer is None:
                writer = ShardWriter(out / tar_name)
            source_seconds += meta.pop("source_duration")
            doc = {"key": s["key"], "orig_key": s["orig_key"], "video_id": s["video_id"], "split": s["split"],
                   "captions": s["captions"], "source": s["video"], "start": s["start"], "end": s["end"], **meta}
            if s.get("sentences"):
                doc["sentences"] = s["sentences"]
            if s.get("extra"):
                doc["extra"] = s["extra"]
            if s.get("group") is not None:  # only when set: ungrouped inputs keep their exact shard bytes
                doc["group"] = s["group"]
            jbytes = _dumps(doc)
            v_off, v_size = writer.add(f"{s['key']}.{ext}", blob)
            j_off, j_size = writer.add(f"{s['key']}.json", jbytes)
            rows.append(manifest_row(s, tar_name, spec["shard_index"], len(rows), ext, (v_off, v_size),
                                     (j_off, j_size), meta, hashlib.sha256(blob).hexdigest()))
        tar_bytes = 0
        if writer is not None:
            tar_bytes = writer.close()
            write_atomic(out / f"{spec['name']}.idx", index_text(writer.members).encode())
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if dog is not None:
            dog.close()
    stats = {"name": spec["name"], "tar": tar_name if rows else None, "fingerprint": spec["fingerprint"],
             "samples_in": len(spec["samples"]), "samples_out": len(rows), "bytes": tar_bytes,
             "source_seconds": round(source_seconds, 6), "rows": rows, "refused": refused}
    write_atomic(stats_path(out, spec["name"]), _dumps(stats))
    return stats


def is_done(out_dir: str | Path, spec: dict, storage=None) -> bool:
    """A shard is done when its stats record exists, matches the plan and its files are there
    (the tar of the recorded size, the index), locally or in the object store."""
    st = read_stats(out_dir, spec["name"], storage)
    if st is None or st.get("fingerprint") != spec["fingerprint"]:
        return False
    if st["samples_out"] == 0:
        return True
    store = open_store(str(out_dir), storage)
    return store.size(st["tar"]) == st["bytes"] and store.exists(f"{spec['name']}.idx")
