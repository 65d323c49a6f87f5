"""The prep driver: read inputs, plan shards, run one task per missing shard, write the indexes.

`prepare(cfg, input, out_dir, ...)` is what `hiervl prep` runs. A rerun after a crash finds the
shards whose stats record (the done marker) matches the plan and runs only the others; a rerun
of a complete dataset runs no task. The dataset-level files (`manifest.parquet`,
`quarantine.parquet`, `dataset.json`) are rebuilt from the stats records in plan order, so they
are the same bytes whatever the number of workers or the order tasks finished in.

One run at a time per folder: the lock (dataprep/out_lock.py) is taken before anything is read
or removed, and the clean-up never deletes a temporary file whose writer still runs. A folder
may hold splits other inputs made; they are kept (shards, rows, refusals, counts), and a run that
would replace or drop anything it does not own refuses unless `overwrite`
(dataprep/dataset_inputs.py).

`out_dir` may be an s3:// / gs:// prefix (pipeline/storage.py): the input records, the policy and
the dataset-level files go through the same store; shards are staged locally and uploaded whole
(worker.py). Such a prefix is not locked (see `_out_lock`): one prep at a time into it.

Where the tasks run is dataprep/distribute.py's (`prep.distributor`): a local process pool for
small jobs, Ray (a local cluster of prep.num_workers CPUs, the cluster at `ray_address`, whose
workers must have hiervl installed, or a Ray this process already holds) when asked or past a size.

Owns: `prepare`: the run of one dataset (plan, shard tasks, the dataset-level files).
Must not touch: per-sample media work (transcode, worker) or the files' schema
(pipeline/data/manifest.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from collections import Counter
from pathlib import Path

from hiervl.data.manifest import (
    DATASET_FILE,
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    QUARANTINE_FILE,
    QUARANTINE_SCHEMA,
    SCHEMA_VERSION,
    table_bytes,
)
from hiervl.dataprep.dataset_inputs import SHARD_FILE, input_identity, reconcile, record_name
from hiervl.dataprep.distribute import choose, open_distributor
from hiervl.dataprep.out_lock import PrepLock, pid_alive
from hiervl.dataprep.plan import make_plan, output_config
from hiervl.dataprep.sources import check_samples, manifest_path, read_input
from hiervl.dataprep.worker import is_done, read_stats, write_shard
from hiervl.errors import UserError
from hiervl.log import get_logger
from hiervl.storage import Store, is_remote, open_store, parent

log = get_logger(__name__)
# PrepConfig fields about how a prep runs, not what it makes: left out of dataset.json, so the same
# input gives the same bytes whatever the workers, the memory or the distributor
RUN_ONLY_FIELDS = ("num_workers", "object_store_mb", "distributor")


def reason_kind(reason: str) -> str:
    """The reason without its details ("truncated: frames end at ..." -> "truncated")."""
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip()


def _temp_writer_alive(name: str) -> bool:
    """Whether the process that writes temporary file `name` (`.{target}.{pid}.{random}.tmp`,
    pipeline/atomic_write.py) still runs on this host: its file is then not a leftover."""
    m = re.match(r"^\..*\.(\d+)\.[0-9a-f]{8}\.tmp$", name)
    return bool(m) and pid_alive(int(m.group(1)))


def _clean(store: Store, remove: list[str]) -> None:
    """Remove temporary files of dead writers and the shard files `reconcile` gave up (named in `remove`).
    `store`: the --out folder or object-store prefix (nothing temporary is ever written to a prefix:
    worker.py stages shards locally and uploads them whole)."""
    by_split = Counter(SHARD_FILE.match(n)["split"] for n in remove if SHARD_FILE.match(n))
    for name in store.list():
        if name.startswith(".") and name.endswith(".tmp") and (store.remote or not _temp_writer_alive(name)):
            store.delete(name)
    for name in remove:
        log.info("removing %s: not in the current plan", name)
        store.delete(name)
    if by_split:
        log.warning("removed %s from %s", ", ".join(f"{n} files of split {s}" for s, n in sorted(by_split.items())),
                    store.url)


def _check_sources(samples: list, storage) -> None:
    """Read access to the first remote source, so bad credentials or a missing bucket stop the run
    with one line before any shard is transcoded (instead of every video being quarantined)."""
    remote = next((s.video for s in samples if is_remote(s.video)), None)
    if remote is not None:
        try:
            open_store(parent(remote), storage).size(remote.rsplit("/", 1)[1])
        except OSError as exc:  # unreachable past the retries: that row's (its worker quarantines it), not the run's
            log.warning("the first remote video could not be reached (%s); rows whose videos stay unreachable are "
                        "quarantined with the reason", str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)


def _open_out(out_dir, storage) -> Store:
    """The --out store, checked before any work: a local folder is created and must be writable; an
    s3:// / gs:// prefix gets one listing and a probe object (one line for wrong credentials or a
    missing bucket)."""
    if is_remote(str(out_dir)):
        store = open_store(str(out_dir), storage)
        store.check(write=True)
        return store
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except FileExistsError:
        raise UserError(f"--out {out} is a file, not a folder; give a folder for the dataset") from None
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create or write the folder ({exc.strerror}); give a folder you "
                        f"can write") from None
    return open_store(out)


def _out_lock(store: Store):
    """The folder's lock (dataprep/out_lock.py) for a local --out. An object-store prefix is not
    locked: the lock rests on an atomic create-if-absent, which pyarrow.fs does not offer for S3/GCS
    (no conditional PUT, apache/arrow#44281), so two preps into one prefix at once are the user's
    to avoid (README, "Storage")."""
    if store.remote:
        log.warning("%s: an object-store --out is not locked; run one `hiervl prep` at a time into it", store.url)
        return contextlib.nullcontext()
    return PrepLock(store.local_path(""))


def _run_shards(todo: list[dict], out_cfg: dict, out: str, prep, ray_address, progress: bool,
                storage: dict | None = None) -> tuple[float, str]:
    """Run `write_shard` once per shard in `todo` on the distributor `prep.distributor` resolves to
    (dataprep/distribute.py); return (the seconds spent on the tasks after the backend started,
    "local" or "ray")."""
    from tqdm import tqdm
    kind = choose(prep.distributor, sum(len(spec["samples"]) for spec in todo), ray_address)
    with open_distributor(kind, prep.num_workers, ray_address, prep.object_store_mb) as backend:
        bar = tqdm(total=len(todo), desc=f"prep shards ({kind})", unit="shard", disable=not progress)
        t0, samples = time.time(), 0
        for _, stats in backend.run(write_shard, [(spec, out_cfg, out, storage, prep.decode_timeout_s)
                                                          for spec in todo]):
            samples += stats["samples_in"]
            bar.update(1)
            bar.set_postfix(samples_per_s=f"{samples / max(time.time() - t0, 1e-9):.1f}")
        bar.close()
        return time.time() - t0, kind


def _check_input_outside_out(input, fmt, out_dir) -> None:
    """Refuse an input file that prep would overwrite: `--input DIR/manifest.parquet --out DIR` would
    replace the user's manifest with the dataset's (and a shard or dataset.json given as input alike)."""
    if is_remote(str(input)) or is_remote(str(out_dir)):
        return
    try:
        named = (manifest_path(input) if fmt in (None, "manifest") else Path(input)).resolve()
    except UserError:
        return  # read_input says what is wrong with it
    out = Path(out_dir).resolve()
    if named.parent != out:
        return
    if (named.name in (MANIFEST_FILE, QUARANTINE_FILE, DATASET_FILE) or re.fullmatch(r"input-[0-9a-f]{12}\.json", named.name)
            or SHARD_FILE.match(named.name)):
        raise UserError(f"--input {input} is {named.name} inside --out {out_dir}, which prep writes: it would be "
                        f"overwritten with the dataset's; move it out of {out_dir} (or give another --out)")


def prepare(cfg, input, out_dir, fmt: str | None = None, videos_dir=None, ray_address: str | None = None,
            progress: bool = True, overwrite: bool = False, **format_options) -> dict:
    """Prepare shards from `input` into `out_dir`; return the summary (see `summary_line`).

    Holds the folder's lock (dataprep/out_lock.py) throughout; keeps the splits other inputs made
    there and refuses conflicts unless `overwrite` (dataprep/dataset_inputs.py). The summary's
    figures are this run's; `dataset_counts` are the whole folder's."""
    prep = cfg.prep
    t0 = time.time()
    choose(prep.distributor, 0, ray_address)  # refuses --ray-address with prep.distributor=local before any work
    storage = dataclasses.asdict(cfg.storage) if hasattr(cfg, "storage") else None
    _check_input_outside_out(input, fmt, out_dir)
    store = _open_out(out_dir, storage)  # a local folder or an s3:// / gs:// prefix (pipeline/storage.py)
    out = store.url
    with _out_lock(store):
        samples = read_input(input, fmt, videos_dir, storage=storage, **format_options)
        if not samples:
            raise UserError(f"{input}: no samples found; check the file and --format")
        good, refused = check_samples(samples)
        _check_sources(good, storage)
        plan = make_plan(good, prep)
        out_cfg = output_config(prep)
        named = input if fmt not in (None, "manifest") or is_remote(str(input)) else manifest_path(input)
        identity = input_identity(named, fmt, format_options)
        state = reconcile(store, plan, identity, out_cfg, overwrite)
        _clean(store, state["remove"])
        mine = {"identity": identity, "out_cfg": out_cfg, "splits": sorted({s["split"] for s in plan}),
                "shards": [s["name"] for s in plan], "refused": [r.to_dict() for r in refused]}
        store.put(record_name(identity), _dumps(mine))  # local: temp + rename; remote: one PUT
        todo = [spec for spec in plan if not is_done(out, spec, storage)]
        task_s, kind = _run_shards(todo, out_cfg, out, prep, ray_address, progress, storage) if todo else (0.0, None)
        wall = time.time() - t0
        stats, dataset = _write_dataset(store, prep, {spec["name"]: spec["fingerprint"] for spec in plan},
                                        [mine, *state["keep"]], storage)
    run = [stats[spec["name"]] for spec in plan]
    rows = [r for st in run for r in st["rows"]]
    quarantine = mine["refused"] + [q for st in run for q in st["refused"]]
    bytes_out = sum(st["bytes"] for st in run)
    hours = sum(r["duration"] for r in rows) / 3600.0
    source_s_run = sum(stats[spec["name"]]["source_seconds"] for spec in todo)
    processed = sum(len(s["samples"]) for s in todo)
    rate = len(quarantine) / len(samples)
    return {"samples_in": len(samples), "samples_out": len(rows), "quarantined": len(quarantine),
            "quarantined_by_reason": dict(Counter(f"{q['stage']}: {reason_kind(q['reason'])}" for q in quarantine)),
            "hours": hours, "bytes": bytes_out, "shards": len(plan), "shards_run": len(todo),
            "seconds": wall, "task_seconds": task_s, "distributor": kind, "videos_processed": processed,
            "source_seconds": source_s_run,
            "videos_per_s": processed / wall if wall > 0 else 0.0,
            "videos_per_s_tasks": processed / task_s if task_s > 0 else 0.0,
            "realtime_factor": source_s_run / wall if wall > 0 else 0.0, "failure_rate": rate,
            "ok": rate <= prep.max_failure_rate, "out_dir": out, "dataset_counts": dataset["counts"],
            "quarantine_examples": quarantine[:QUARANTINE_SHOWN]}


def _dumps(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _shard_order(name: str) -> tuple[str, int]:
    split, n = name.rsplit("-", 1)
    return split, int(n)


def _write_dataset(store: Store, prep, fingerprints: dict, records: list[dict], storage=None) -> tuple[dict, dict]:
    """Rebuild manifest.parquet, quarantine.parquet and dataset.json from every input record's
    shards, splits in sorted order (so the bytes do not depend on which run came first); return
    (the stats record of every shard by name, dataset.json's content). `fingerprints`: this run's
    plan, name -> fingerprint. In an object store each file is one PUT, dataset.json last."""
    records = sorted(records, key=lambda r: (r["splits"][:1], r["identity"]["input"]))
    names = sorted((name for r in records for name in r["shards"]), key=_shard_order)
    rows, quarantine, stats = [], [q for r in records for q in r["refused"]], {}
    for name in names:
        st = read_stats(store.url, name, storage)
        if name in fingerprints and (st is None or st.get("fingerprint") != fingerprints[name]):
            raise RuntimeError(f"shard {name} has no valid stats record after its task ran")
        if st is None:
            raise UserError(f"{store.url}/{name}.stats.json is missing or unreadable: that split is damaged; prepare "
                            f"it again from its input, or use --overwrite")
        stats[name] = st
        rows += st["rows"]
        quarantine += st["refused"]
    store.put(MANIFEST_FILE, table_bytes(rows, MANIFEST_SCHEMA))  # local: temp + rename; remote: one PUT
    store.put(QUARANTINE_FILE, table_bytes(quarantine, QUARANTINE_SCHEMA))
    counts = dict(sorted(Counter(r["split"] for r in rows).items()))
    hours = sum(r["duration"] for r in rows) / 3600.0
    prep_cfg = {k: v for k, v in dataclasses.asdict(prep).items() if k not in RUN_ONLY_FIELDS}
    dataset = {"schema_version": SCHEMA_VERSION, "codec": prep.codec, "fps": prep.fps,
               "short_side": prep.short_side, "counts": counts, "quarantined": len(quarantine),
               "hours": round(hours, 6), "bytes": sum(st["bytes"] for st in stats.values()),
               "num_samples": len(rows), "shards": [f"{n}.tar" for n in names if stats[n]["samples_out"]],
               "inputs": [{**r["identity"], "splits": r["splits"]} for r in records], "prep_config": prep_cfg}
    store.put(DATASET_FILE, (json.dumps(dataset, indent=2, sort_keys=True) + "\n").encode())
    return stats, dataset


QUARANTINE_SHOWN = 5  # quarantine records printed on the terminal (all are in quarantine.parquet)


def quarantine_lines(s: dict) -> list[str]:
    """The first few quarantined inputs, one line each (source, stage, reason), then where the rest are."""
    shown = s.get("quarantine_examples") or []
    lines = [f"  quarantined {q.get('source') or q.get('key')}: {q.get('stage')}: {q.get('reason')}" for q in shown]
    if s.get("quarantined", 0) > len(shown):
        lines.append(f"  ... and {s['quarantined'] - len(shown)} more in {s['out_dir']}/{QUARANTINE_FILE}")
    return lines


def summary_line(s: dict) -> str:
    by = ", ".join(f"{k} {v}" for k, v in sorted(s["quarantined_by_reason"].items())) or "none"
    return (f"prep: {s['samples_in']} samples in, {s['samples_out']} out, {s['quarantined']} quarantined ({by}); "
            f"{s['hours']:.3f} h of video, {s['bytes'] / 1e6:.1f} MB in {s['shards']} shards "
            f"({s['shards_run']} written now) in {s['seconds']:.1f}s: {s['videos_per_s']:.1f} videos/s "
            f"({s['videos_per_s_tasks']:.1f} after {'Ray' if s.get('distributor') == 'ray' else 'pool'} start-up), realtime x{s['realtime_factor']:.1f}"
            + ("; the dataset now holds " + ", ".join(f"{k} {v}" for k, v in s["dataset_counts"].items())
               if s.get("dataset_counts") else ""))
