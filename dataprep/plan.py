"""The shard plan: which sample goes to which shard, a pure function of the input and the config.

Samples are grouped by split (splits in sorted order), kept in input order, and cut into shards
of at most `prep.shard_max_samples` samples and about `prep.shard_max_bytes` bytes (estimated
from the source file sizes, which are part of the input). A shard's `fingerprint` hashes its
samples and the output-shaping config; a finished shard whose stats record carries another
fingerprint is stale and is rewritten.

Owns: sample-to-shard assignment and each shard's fingerprint.
Must not touch: reading media or writing files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from hiervl.storage import as_local_path, is_remote

# PrepConfig fields that change the bytes of a sample (not workers, memory or failure rate)
OUTPUT_FIELDS = ("codec", "fps", "short_side", "max_seconds", "min_seconds", "keyframe_interval", "crf")


def output_config(prep) -> dict:
    d = dataclasses.asdict(prep) if dataclasses.is_dataclass(prep) else dict(prep)
    return {k: d[k] for k in OUTPUT_FIELDS}


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def _source_size(path: str) -> int:
    if is_remote(path):
        return 0
    try:
        return os.path.getsize(as_local_path(path))
    except OSError:
        return 0


def make_plan(samples: list, prep) -> list[dict]:
    """[{name, split, shard_index, samples: [sample dict], fingerprint}] in a fixed order."""
    by_split: dict[str, list] = {}
    for s in samples:
        by_split.setdefault(s.split, []).append(s)
    out_cfg = output_config(prep)
    plan = []
    for split in sorted(by_split):
        current, size = [], 0
        shards = []
        for s in by_split[split]:
            est = _source_size(s.video)
            if current and (len(current) >= prep.shard_max_samples or size + est > prep.shard_max_bytes):
                shards.append(current)
                current, size = [], 0
            current.append(s.to_dict())
            size += est
        if current:
            shards.append(current)
        for i, members in enumerate(shards):
            fp = hashlib.sha256(json.dumps({"samples": members, "config": out_cfg}, sort_keys=True,
                                           ensure_ascii=True).encode()).hexdigest()
            plan.append({"name": shard_name(split, i), "split": split, "shard_index": i, "samples": members,
                         "fingerprint": fp})
    return plan
