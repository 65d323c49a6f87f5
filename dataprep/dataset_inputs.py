"""Which input made which splits of a dataset folder, and what a new prep run may do there.

A dataset folder can hold several splits made by several runs (MSR-VTT train from one
annotation file, then test from another, into the same `--out`). Each run's input owns its
splits through an input record, `input-{id}.json`, written before any shard task starts (so an
interrupted run is known too): the input's identity (path, format, options), the output config,
its splits, its shard names and its input-stage refusals. The driver rebuilds
`manifest.parquet`, `quarantine.parquet` and `dataset.json` from every record, so adding a split
keeps the others' shards, rows, refusals and counts.

`reconcile` is the policy, safe by default; without `--overwrite` it refuses (one line naming
the split, where it came from and the fix) when this run would
- remake a split that another input made,
- drop a split its own earlier run made (the input no longer has it),
- write with another output config (codec, fps, size...) than the splits already there,
- remove shard files nobody's record names (a dataset from before the records, or an
  interrupted prep of an unknown input) -- except that a dataset from before the records whose
  splits this run all remakes with the same config is adopted as this input's (a plain rerun).
With `--overwrite` the folder becomes this run's dataset alone: everything else is removed, with
a warning naming each split removed.

The folder is a `Store` (pipeline/storage.py): a local folder or an s3:// / gs:// prefix, so the
records and the policy are the same for a dataset in object storage.

Owns: input records and the add/keep/refuse/overwrite policy of a dataset folder.
Must not touch: shard contents or the dataset-level tables' schema (pipeline/data/manifest.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from hiervl.data.manifest import DATASET_FILE
from hiervl.errors import UserError
from hiervl.storage import Store, as_local_path, is_remote

SHARD_FILE = re.compile(r"^(?P<split>[A-Za-z0-9_-]+)-(?P<n>\d{6})\.(tar|idx|stats\.json)$")
RECORD_FILE = re.compile(r"^input-[0-9a-f]{12}\.json$")


def input_identity(input, fmt: str | None, options: dict) -> dict:
    """What names an input: its absolute path (or URL), format and reader options."""
    text = str(input)
    path = text if is_remote(text) else str(Path(as_local_path(text)).resolve())
    return {"input": path, "format": fmt or "manifest", "options": {k: options[k] for k in sorted(options)}}


def record_name(identity: dict) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return f"input-{digest}.json"


def read_records(store: Store, names: list[str]) -> dict[str, dict]:
    """Every input record among `names` (the files in `store`), by file name."""
    records = {}
    for name in sorted(names):
        if RECORD_FILE.match(name):
            try:
                records[name] = json.loads(store.read(name))
            except (FileNotFoundError, PermissionError, ValueError):  # a network failure says its own line
                raise UserError(f"{store.url}/{name} is unreadable; run again with --overwrite to rebuild "
                                f"{store.url}") from None
    return records


def _describe(identity: dict) -> str:
    opts = "".join(f" {k}={v}" for k, v in identity.get("options", {}).items())
    return f"{identity['input']} (format {identity['format']}{opts})"


def reconcile(store: Store, plan: list[dict], identity: dict, out_cfg: dict, overwrite: bool) -> dict:
    """Decide what this run keeps and removes in `store` (the --out folder or prefix); raise UserError
    on a conflict unless `overwrite`.

    Returns {"keep": [records of other inputs, kept], "remove": [file names to delete]}.
    """
    out = store.url
    mine = record_name(identity)
    plan_splits = {spec["split"] for spec in plan}
    plan_files = {f"{spec['name']}.{ext}" for spec in plan for ext in ("tar", "idx", "stats.json")}
    names = store.list()
    records = read_records(store, names)
    shard_files = sorted(n for n in names if SHARD_FILE.match(n))
    problems, keep = [], []

    legacy = None
    if not records and DATASET_FILE in names:  # made before input records existed
        try:
            legacy = json.loads(store.read(DATASET_FILE))
        except (FileNotFoundError, ValueError):
            legacy = {}
    if legacy is not None:
        old_cfg = {k: v for k, v in legacy.get("prep_config", {}).items() if k in out_cfg}
        old_splits = set(legacy.get("counts", {})) | {SHARD_FILE.match(f)["split"] for f in shard_files}
        if not _same_cfg(old_cfg, out_cfg):
            problems.append(f"{out} was prepared with {_cfg_diff(old_cfg, out_cfg)}")
        elif not old_splits <= plan_splits:
            problems.append(f"{out} holds split(s) {', '.join(sorted(old_splits - plan_splits))} of a dataset "
                            f"made by an earlier hiervl (no record of their input), which this input does not have")
    else:
        for name, rec in records.items():
            ident = rec["identity"]
            if name == mine:
                for split in sorted(set(rec["splits"]) - plan_splits):
                    problems.append(f"split {split} in {out} came from this input, which no longer has it")
            else:
                clash = sorted(set(rec["splits"]) & plan_splits)
                for split in clash:
                    problems.append(f"split {split} in {out} was made from {_describe(ident)}; this input has "
                                    f"split {split} too")
                if not clash:
                    keep.append(rec)
            if not _same_cfg(rec["out_cfg"], out_cfg) and not any(
                    p.startswith(f"{out} was prepared with") for p in problems):
                problems.append(f"{out} was prepared with {_cfg_diff(rec['out_cfg'], out_cfg)}")
        owned = {f for rec in keep for s in rec["shards"] for f in (f"{s}.tar", f"{s}.idx", f"{s}.stats.json")}
        mine_before = records.get(mine, {}).get("shards", [])
        own_old = {f for s in mine_before for f in (f"{s}.tar", f"{s}.idx", f"{s}.stats.json")}
        unknown = [f for f in shard_files if f not in plan_files and f not in owned and f not in own_old
                   and SHARD_FILE.match(f)["split"] not in plan_splits]
        if unknown:
            problems.append(f"{out} holds shard files no input record names ({', '.join(unknown[:3])}"
                            f"{', ...' if len(unknown) > 3 else ''}: an interrupted prep of another input?)")
    if problems and not overwrite:
        raise UserError(f"{problems[0]}; run with --overwrite to replace what is in {out} with this run's "
                        f"dataset, or write to another --out")
    if overwrite:
        keep = []
    keep_files = {f for rec in keep for s in rec["shards"] for f in (f"{s}.tar", f"{s}.idx", f"{s}.stats.json")}
    remove = [f for f in shard_files if f not in plan_files and f not in keep_files]
    remove += [name for name in records if name != mine and name not in {record_name(r["identity"]) for r in keep}]
    return {"keep": keep, "remove": remove}


def _same_cfg(old: dict, new: dict) -> bool:
    """Equal on the fields both know (a field added to the output config later is not a change)."""
    return all(old[k] == new[k] for k in old if k in new)


def _cfg_diff(old: dict, new: dict) -> str:
    diff = [f"prep.{k}={old[k]!r}" for k in sorted(old) if k in new and old[k] != new[k]]
    now = [f"prep.{k}={new[k]!r}" for k in sorted(old) if k in new and old[k] != new[k]]
    return f"{', '.join(diff)} (this run: {', '.join(now)})"
