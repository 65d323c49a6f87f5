"""The Ray driver: read inputs, plan shards, run one Ray task per missing shard, write the indexes.

`prepare(cfg, input, out_dir, ...)` is what `hiervl prep` runs. A rerun after a crash finds the
shards whose stats record (the done marker) matches the plan and runs only the others; a rerun
of a complete dataset runs no task. The dataset-level files (`manifest.parquet`,
`quarantine.parquet`, `dataset.json`) are rebuilt from the stats records in plan order, so they
are the same bytes whatever the number of workers or the order tasks finished in.

Ray: a local cluster `ray.init(num_cpus=prep.num_workers, object_store_memory=...)` by default,
an existing one with `ray_address` (workers there must have hiervl installed). An already
initialised Ray (tests) is used as it is.

Owns: `prepare`: the run of one dataset (plan, Ray tasks, the dataset-level files).
Must not touch: per-sample media work (transcode, worker) or the files' schema
(pipeline/data/manifest.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections import Counter
from pathlib import Path

from dataprep.plan import make_plan, output_config
from dataprep.sources import check_samples, read_input
from dataprep.worker import is_done, read_stats, write_shard
from pipeline.data.manifest import (
    DATASET_FILE,
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    QUARANTINE_FILE,
    QUARANTINE_SCHEMA,
    SCHEMA_VERSION,
    table_bytes,
)
from pipeline.errors import UserError
from pipeline.log import get_logger
from pipeline.storage import Store, is_remote, open_store, parent

log = get_logger(__name__)
_SHARD_FILE = re.compile(r"^[A-Za-z0-9_-]+-\d{6}\.(tar|idx|stats\.json)$")


def reason_kind(reason: str) -> str:
    """The reason without its details ("truncated: frames end at ..." -> "truncated")."""
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip()


def _clean(store: Store, plan: list[dict]) -> None:
    """Remove temporary files of killed runs and shard files this plan does not have (a local
    folder or an object-store prefix: nothing temporary is ever written there, see worker.py)."""
    expected = set()
    for spec in plan:
        expected |= {f"{spec['name']}.tar", f"{spec['name']}.idx", f"{spec['name']}.stats.json"}
    for name in store.list():
        if name.startswith(".") and name.endswith(".tmp"):
            store.delete(name)
        elif _SHARD_FILE.match(name) and name not in expected:
            log.info("removing %s: not in the current plan", name)
            store.delete(name)


def _check_sources(samples: list, storage) -> None:
    """Read access to the first remote source, so bad credentials or a missing bucket stop the run
    with one line before any shard is transcoded (instead of every video being quarantined)."""
    remote = next((s.video for s in samples if is_remote(s.video)), None)
    if remote is not None:
        open_store(parent(remote), storage).size(remote.rsplit("/", 1)[1])


def _init_ray(prep, ray_address: str | None) -> bool:
    """Start or join Ray; return True when this call started it (and should shut it down)."""
    import ray
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING"}
    if ray_address:
        ray.init(address=ray_address, **kwargs)
    else:
        ray.init(num_cpus=prep.num_workers, object_store_memory=prep.object_store_mb * 1024 * 1024, **kwargs)
    return True


def _run_shards(todo: list[dict], out_cfg: dict, out: str, prep, ray_address, progress: bool,
                storage: dict | None = None) -> float:
    """Run one Ray task per shard in `todo`; return the seconds spent on the tasks (after Ray start-up)."""
    import ray
    from tqdm import tqdm
    started = _init_ray(prep, ray_address)
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(write_shard)
        pending = [task.remote(spec, out_cfg, out, storage) for spec in todo]
        bar = tqdm(total=len(todo), desc="prep shards", unit="shard", disable=not progress)
        t0, samples = time.time(), 0
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                stats = ray.get(ref)
                samples += stats["samples_in"]
                bar.update(1)
                bar.set_postfix(samples_per_s=f"{samples / max(time.time() - t0, 1e-9):.1f}")
        bar.close()
        return time.time() - t0
    finally:
        if started:
            ray.shutdown()


def prepare(cfg, input, out_dir, fmt: str | None = None, videos_dir=None, ray_address: str | None = None,
            progress: bool = True, **format_options) -> dict:
    """Prepare shards from `input` into `out_dir`; return the summary (see `summary_line`)."""
    prep = cfg.prep
    t0 = time.time()
    # out_dir: a local folder or an s3:// / gs:// prefix (pipeline/storage.py); checked before any work
    out = str(out_dir) if is_remote(str(out_dir)) else str(Path(out_dir))
    storage = dataclasses.asdict(cfg.storage) if hasattr(cfg, "storage") else None
    store = open_store(out, storage)
    store.check(write=True)  # one line for wrong credentials / a missing bucket (locally: mkdir)
    samples = read_input(input, fmt, videos_dir, storage=storage, **format_options)
    if not samples:
        raise UserError(f"{input}: no samples found; check the file and --format")
    good, refused = check_samples(samples)
    _check_sources(good, storage)
    plan = make_plan(good, prep)
    out_cfg = output_config(prep)
    _clean(store, plan)
    todo = [spec for spec in plan if not is_done(out, spec, storage)]
    task_s = _run_shards(todo, out_cfg, out, prep, ray_address, progress, storage) if todo else 0.0
    wall = time.time() - t0

    rows, quarantine = [], [r.to_dict() for r in refused]
    bytes_out, source_s_run = 0, 0.0
    todo_names = {spec["name"] for spec in todo}
    records = {}
    for spec in plan:
        st = records[spec["name"]] = read_stats(out, spec["name"], storage)
        if st is None or st.get("fingerprint") != spec["fingerprint"]:
            raise RuntimeError(f"shard {spec['name']} has no valid stats record after its task ran")
        rows += st["rows"]
        quarantine += st["refused"]
        bytes_out += st["bytes"]
        if spec["name"] in todo_names:
            source_s_run += st["source_seconds"]
    store.put(MANIFEST_FILE, table_bytes(rows, MANIFEST_SCHEMA))  # local: temp + rename; remote: one PUT
    store.put(QUARANTINE_FILE, table_bytes(quarantine, QUARANTINE_SCHEMA))
    counts = dict(sorted(Counter(r["split"] for r in rows).items()))
    hours = sum(r["duration"] for r in rows) / 3600.0
    prep_cfg = {k: v for k, v in dataclasses.asdict(prep).items() if k not in ("num_workers", "object_store_mb")}
    dataset = {"schema_version": SCHEMA_VERSION, "codec": prep.codec, "fps": prep.fps,
               "short_side": prep.short_side, "counts": counts, "quarantined": len(quarantine),
               "hours": round(hours, 6), "bytes": bytes_out, "num_samples": len(rows),
               "shards": [f"{s['name']}.tar" for s in plan if records[s['name']]["samples_out"]],
               "prep_config": prep_cfg}
    store.put(DATASET_FILE, (json.dumps(dataset, indent=2, sort_keys=True) + "\n").encode())

    processed = sum(len(s["samples"]) for s in todo)
    rate = len(quarantine) / len(samples)
    return {"samples_in": len(samples), "samples_out": len(rows), "quarantined": len(quarantine),
            "quarantined_by_reason": dict(Counter(f"{q['stage']}: {reason_kind(q['reason'])}" for q in quarantine)),
            "hours": hours, "bytes": bytes_out, "shards": len(plan), "shards_run": len(todo),
            "seconds": wall, "task_seconds": task_s, "videos_processed": processed,
            "source_seconds": source_s_run,
            "videos_per_s": processed / wall if wall > 0 else 0.0,
            "videos_per_s_tasks": processed / task_s if task_s > 0 else 0.0,
            "realtime_factor": source_s_run / wall if wall > 0 else 0.0, "failure_rate": rate,
            "ok": rate <= prep.max_failure_rate, "out_dir": out}


def summary_line(s: dict) -> str:
    by = ", ".join(f"{k} {v}" for k, v in sorted(s["quarantined_by_reason"].items())) or "none"
    return (f"prep: {s['samples_in']} samples in, {s['samples_out']} out, {s['quarantined']} quarantined ({by}); "
            f"{s['hours']:.3f} h of video, {s['bytes'] / 1e6:.1f} MB in {s['shards']} shards "
            f"({s['shards_run']} written now) in {s['seconds']:.1f}s: {s['videos_per_s']:.1f} videos/s "
            f"({s['videos_per_s_tasks']:.1f} after Ray start-up), realtime x{s['realtime_factor']:.1f}")
