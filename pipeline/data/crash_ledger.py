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

In-process decoders (DALI's CPU or mixed backend, and PyAV in threads when data.decode_workers=0: they
cannot be killed apart from the trainer) are covered by a journal instead: before each in-process
decode call the rank writes (fsync'd, atomically)
`inflight-rank{R}.json` with the call's samples and removes it after. A process that dies in the call
(a segfault, or a hang ended by the launcher, the other ranks' collective timeout or the scheduler)
leaves the file; the next run reads it: a single sample is ledgered like a worker crash; several are
*suspects*, decoded one per call from then on, so a second death names the one sample and a
third run skips it. At most two restarts per crashing sample instead of a crash loop.

Owns: the ledger files and the lookup. Must not touch: decoding or batch assembly (loader.py).
"""

from __future__ import annotations

import atexit
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hiervl.atomic_write import write_atomic

FOLDER = "crash_ledger"
LEDGER_REASONS = ("decode worker died", "decode timed out",  # what the pool reports for a crash or a hang
                  "the process died decoding it")  # an in-process decode call that never returned (journal)
INFLIGHT = "inflight-rank{}.json"  # the in-process decode call in progress on a rank
SUSPECTS = "suspects-rank{}-{}.json"  # samples of a call that died with several: decoded one per call since


def is_crash(reason: str) -> bool:
    """Whether a decode failure is one the ledger keeps (a hang or a dead worker, not a plain decode error)."""
    return reason.startswith(LEDGER_REASONS)


class CrashLedger:
    """The ledger of run folder `run_dir` as seen by `rank`; see the module docstring."""

    def __init__(self, run_dir: str | Path, rank: int):
        self.folder = Path(run_dir) / FOLDER
        self.path = self.folder / f"rank{rank}.jsonl"
        self.rank = rank
        self.inflight_path = self.folder / INFLIGHT.format(rank)
        self.entries: dict[str, dict] = {}
        self.suspects: set[str] = set()
        exists = self.folder.is_dir()
        # journals first, then suspects, then ledgers: a rank converting its own journal (ledger line
        # appended, or the file renamed to suspects) before deleting it is seen either way
        for f in sorted(self.folder.glob(INFLIGHT.format("*"))) if exists else []:
            self._read_journal(f)
        for f in sorted(self.folder.glob(SUSPECTS.format("*", "*"))) if exists else []:
            self.suspects.update(key for key, _ in _read_json(f).get("samples", []))  # the renamed journal
        for f in sorted(self.folder.glob("rank*.jsonl")) if exists else []:
            for line in f.read_text().splitlines():
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill mid-write: that sample is met and recorded again
                    self.entries.setdefault(row["key"], row)
        self._convert_own_journal()
        # a process that exits normally did not die in a decode call (a call a daemon thread was still
        # in when the run stopped or finished is no crash): its journal goes; a SIGSEGV or SIGKILL keeps it
        atexit.register(self.inflight_path.unlink, missing_ok=True)

    def _read_journal(self, path: Path) -> None:
        call = _read_json(path)
        samples = call.get("samples", [])
        if len(samples) == 1:
            key, shard = samples[0]
            self.entries.setdefault(key, {"key": key, "shard": shard, "reason": _died_reason(call),
                                          "epoch": call.get("epoch", -1), "position": call.get("position", -1)})
        else:
            self.suspects.update(key for key, _ in samples)

    def _convert_own_journal(self) -> None:
        """This rank's journal of a previous run's call that never returned becomes a ledger line (one
        sample) or a suspects file (several), so this rank's next call cannot overwrite it."""
        call = _read_json(self.inflight_path) if self.inflight_path.is_file() else None
        if call is None:
            return
        samples = call.get("samples", [])
        if len(samples) == 1:
            key = samples[0][0]
            self.entries.pop(key, None)
            self.record(key, samples[0][1], _died_reason(call), call.get("epoch", -1), call.get("position", -1))
            self.inflight_path.unlink(missing_ok=True)
        else:
            os.replace(self.inflight_path, self.folder / SUSPECTS.format(self.rank, uuid.uuid4().hex[:8]))

    def inflight_write(self, samples: list[tuple[str, str]], decoder: str, epoch: int, position: int) -> None:
        """Write the journal of an in-process decode call of `samples` [(key, shard)] (fsync'd, atomically)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.inflight_path, json.dumps({"samples": [list(s) for s in samples], "decoder": decoder,
                                                     "epoch": int(epoch), "position": int(position)}))

    @contextmanager
    def inflight(self, samples: list[tuple[str, str]], decoder: str, epoch: int, position: int) -> Iterator[None]:
        """Journal an in-process decode call of `samples` while it runs (see the module docstring)."""
        self.inflight_write(samples, decoder, epoch, position)
        yield
        self.inflight_path.unlink(missing_ok=True)

    def is_suspect(self, key: str) -> bool:
        """Whether `key` was in an in-process decode call that never returned (decode it alone)."""
        return key in self.suspects

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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # gone (converted meanwhile by its rank) or cut: nothing to learn from it
    return data if isinstance(data, dict) else {}


def _died_reason(call: dict) -> str:
    return (f"the process died decoding it in-process ({call.get('decoder', 'an in-process decoder')}): "
            "a crash or a hang the run was killed for")
