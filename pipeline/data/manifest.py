"""The prepared dataset's contract: `manifest.parquet`, `quarantine.parquet` and `dataset.json`.

Owns: the schema version, the two parquet schemas, the one function that builds a manifest row
(`manifest_row`) and a quarantine row (`quarantine_row`), the columns the loader reads, writing
those tables, and reading them back: `read_dataset_info` (dataset.json, its schema version checked)
and `read_manifest` (manifest.parquet, the columns asked for checked); a damaged or foreign file is
one UserError naming it and the fix, never a pyarrow / json traceback (`--verify`, eval, `train --dry-run`).
`dataprep/` writes through it, `hiervl.data.loader` reads through it, so both sides agree.
Must not touch: shards' bytes, decoding, sampling; it imports nothing of the model or training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
from hiervl.atomic_write import write_atomic
from hiervl.errors import UserError

SCHEMA_VERSION = 1  # of dataset.json and the tables beside it; bump when a reader must change
MANIFEST_FILE, QUARANTINE_FILE, DATASET_FILE = "manifest.parquet", "quarantine.parquet", "dataset.json"

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("orig_key", pa.string()), ("video_id", pa.string()), ("split", pa.string()),
    ("shard", pa.string()), ("shard_index", pa.int64()), ("index_in_shard", pa.int64()),
    ("video_ext", pa.string()), ("video_offset", pa.int64()), ("video_size", pa.int64()),
    ("json_offset", pa.int64()), ("json_size", pa.int64()), ("captions", pa.list_(pa.string())),
    ("num_frames", pa.int64()), ("fps", pa.float64()), ("width", pa.int64()), ("height", pa.int64()),
    ("duration", pa.float64()), ("codec", pa.string()), ("source", pa.string()),
    ("start", pa.float64()), ("end", pa.float64()), ("content_hash", pa.string()),
    # hard-negative group (dataprep/sources.py), null when the sample has none; datasets prepared
    # before this column lack it and load with no groups (OPTIONAL_COLUMNS)
    ("group", pa.string()),
])
QUARANTINE_SCHEMA = pa.schema([("source", pa.string()), ("key", pa.string()), ("stage", pa.string()),
                               ("reason", pa.string())])

# what the loader reads (pipeline/data/loader.py DatasetIndex); OPTIONAL_COLUMNS only when present
READ_COLUMNS = ["key", "video_id", "split", "shard", "index_in_shard", "video_offset", "video_size",
                "captions", "num_frames", "codec"]
OPTIONAL_COLUMNS = ["group"]


def manifest_row(sample: dict, tar_name: str, shard_index: int, index_in_shard: int, video_ext: str,
                 video: tuple[int, int], json_member: tuple[int, int], meta: dict, content_hash: str) -> dict:
    """One sample's manifest row; `video` and `json_member` are (offset, size) in the tar.

    `group` is in the row only when the sample has one (absent = null in MANIFEST_SCHEMA), so the
    stats records of inputs without groups stay the same bytes as before the column.
    """
    row = {"key": sample["key"], "orig_key": sample["orig_key"], "video_id": sample["video_id"],
           "split": sample["split"], "shard": tar_name, "shard_index": shard_index,
           "index_in_shard": index_in_shard, "video_ext": video_ext, "video_offset": video[0],
           "video_size": video[1], "json_offset": json_member[0], "json_size": json_member[1],
           "captions": sample["captions"], "num_frames": meta["num_frames"], "fps": meta["fps"],
           "width": meta["width"], "height": meta["height"], "duration": meta["duration"],
           "codec": meta["codec"], "source": sample["video"], "start": sample["start"], "end": sample["end"],
           "content_hash": content_hash}
    if sample.get("group") is not None:
        row["group"] = sample["group"]
    return row


def quarantine_row(source: str, key: str, stage: str, reason: str) -> dict:
    """One refused input: where it came from, at which stage (input | probe | validate | decode |
    transcode | internal) and why. A credential in a source URL is not written (pipeline/redact.py)."""
    from hiervl.redact import redact

    return {"source": redact(source), "key": key, "stage": stage, "reason": redact(reason)}


def table_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    """`rows` as the bytes of a zstd parquet file with `schema` (what `write_table` writes)."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_table(path: str | Path, rows: list[dict], schema: pa.Schema) -> None:
    """Write `rows` as a zstd parquet file with `schema`, atomically."""
    write_atomic(path, table_bytes(rows, schema))


def read_dataset_info(root: str | Path, store=None) -> dict | None:
    """`dataset.json` of a prepared dataset, its schema version checked; None when there is none
    (a manifest built by hand, as tests do). `store`: the dataset's hiervl.storage store (default:
    a local folder `root`), so an s3:// dataset is read the same way."""
    from hiervl.storage import join, open_store

    store = store if store is not None else open_store(root)
    path = join(str(root), DATASET_FILE)
    if not store.exists(DATASET_FILE):
        return None
    try:
        info = json.loads(store.read(DATASET_FILE))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise UserError(f"{path} is not valid JSON ({str(exc).splitlines()[0][:120]}); the dataset's metadata is "
                        f"damaged: prepare it again (`hiervl prep --input MANIFEST --out {root}`)") from None
    if not isinstance(info, dict):
        raise UserError(f"{path} is a JSON {type(info).__name__}, not the dataset's summary object; prepare the "
                        f"dataset again (`hiervl prep --input MANIFEST --out {root}`)")
    version = info.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"{path} has schema_version {version}, this hiervl reads {SCHEMA_VERSION}; "
                        f"prepare the dataset again with this version (`hiervl prep --out {root}`)")
    return info


def read_manifest(source, columns: list[str] | None = None, name: str | None = None,
                  optional: list[str] | None = None) -> pa.Table:
    """`manifest.parquet` (a path, or a pyarrow buffer / file read from a store) as a table of
    `columns` (all when None) plus those of `optional` it has; a file that is not parquet, or lacks a
    column asked for, is one UserError naming it (`name`, default `source`) and the fix."""
    import pyarrow.parquet as pq

    name = str(name or source)
    fix = "the dataset's manifest is damaged or not hiervl's: prepare the dataset again (`hiervl prep`)"
    try:
        present = set(pq.read_schema(source).names)
        if hasattr(source, "seek"):
            source.seek(0)
        missing = [c for c in (columns or []) if c not in present]
        if missing:
            raise UserError(f"{name} has no column {', '.join(missing)} (it has: {', '.join(sorted(present))}); {fix}")
        want = None if columns is None else list(columns) + [c for c in optional or [] if c in present]
        return pq.ParquetFile(source).read(columns=want)  # one file: read_table's dataset layer imports pandas
    except UserError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise UserError(f"{name} is not a readable parquet table ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120]}); {fix}") from None
