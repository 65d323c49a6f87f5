"""The crash ledger: samples whose decode hung past `data.decode_timeout_s` or killed a decode worker.

Without it a sample that crashes libav is met again by every resumed run (a crash loop), and one that
hangs stalls the run. In training, the loader's decode pool (decode_pool.py, `crash_ledger=True`)
kills a worker stuck on one sample past the limit and replaces a dead one; the sample it was on
comes back failed, its batch slot is flagged invalid like any undecodable sample (the batch keeps
its shape; the loss's global valid count leaves it out on every rank alike), and the loader records
it here. Each rank appends to its own file, `<run>/crash_ledger/rank{R}.jsonl`, one JSON line per
sample {key, shard, reason, epoch, position}, flushed and fsync'd before the batch is handed on, so a
checkpoint written after that batch never lacks it. At start every rank reads all the ranks' files;
a ledgered sample is never decoded again: its slot is flagged invalid at once, in this epoch and the
next ones, at any world size (so the result no longer depends on whether a time-out fired).
`status.json` reports the skipped samples by key (`crash_ledger`).

Owns: the ledger files and the lookup. Must not touch: decoding or batch assembly (loader.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FOLDER = "crash_ledger"
LEDGER_REASONS = ("decode worker died", "decode timed out")  # what the pool reports for a crash or a hang


def is_crash(reason: str) -> bool:
    """Whether a decode failure is one the ledger keeps (a hang or a dead worker, not a plain decode error)."""
    return reason.startswith(LEDGER_REASONS)


class CrashLedger:
    """The ledger of run folder `run_dir` as seen by `rank`; see the module docstring."""

    def __init__(self, run_dir: str | Path, rank: int):
        self.folder = Path(run_dir) / FOLDER
        self.path = self.folder / f"rank{rank}.jsonl"
        self.entries: dict[str, dict] = {}
        for f in sorted(self.folder.glob("rank*.jsonl")) if self.folder.is_dir() else []:
            for line in f.read_text().splitlines():
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill mid-write: that sample is met and recorded again
                    self.entries.setdefault(row["key"], row)

    def reason(self, key: str) -> str | None:
        """Why `key` is in the ledger, or None."""
        row = self.entries.get(key)
        return None if row is None else row["reason"]

    def record(self, key: str, shard: str, reason: str, epoch: int, position: int) -> None:
        """Append one sample (durably) unless it is already in."""
        if key in self.entries:
            return
        row = {"key": key, "shard": shard, "reason": reason, "epoch": int(epoch), "position": int(position)}
        self.entries[key] = row
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def summary(self) -> dict[str, dict]:
        """{key: {shard, reason}} of every ledgered sample (all ranks' files read at start, plus this rank's since)."""
        return {k: {"shard": v["shard"], "reason": v["reason"]} for k, v in sorted(self.entries.items())}
