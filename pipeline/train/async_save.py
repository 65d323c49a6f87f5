"""Asynchronous checkpoint writes: the rank's state copied to host memory, written in a background thread.

With `checkpoint.async_save=true` a save blocks training only while DeepSpeed builds its state dicts
and every tensor in them is copied to host memory (`snapshot`); serialising, hashing, writing and
fsyncing the files happen in a background thread while the next steps train. The commit stays the
synchronous save's: `meta.json` (the manifest) and then `latest` are written by rank 0 only after
every rank's files are on disk and fsync'd, so a crash during the background write leaves the
previous checkpoint as `latest` (the half-written folder has no meta.json and is never resumed from).

The background threads talk through files, never through collectives (a collective from a second
thread would interleave with the training loop's): each rank writes, when its files are durable,
`checkpoints/.pending-<tag>/rank{R}.json` with the size and sha256 of each file it wrote (or the
one line saying why it could not). Rank 0's thread waits for all of them (a shared run folder is
already required: every rank writes its part of each checkpoint there), then commits and prunes, or
removes the partial folder. The training loop meets the outcome at the next save or at the end of
the run (`AsyncSave.finish`, a collective on every rank): a failed write is then one
`CheckpointWriteError` on every rank, as a synchronous one is at once. A stop (SIGTERM, the last
step) waits for the save in flight before its own final save, so a preempted run leaves both.

Owns: `snapshot`, the deferred recorder, the background job and its markers.
Must not touch: the checkpoint layout, its manifest format or the commit order (checkpoint.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
from pathlib import Path

import torch
from hiervl import faults
from hiervl.atomic_write import fsync_path, write_atomic
from hiervl.log import get_logger
from hiervl.train.checkpoint_hash import WriteRecorder

log = get_logger(__name__)

PENDING_PREFIX = ".pending-"  # checkpoints/.pending-<tag>/rank{R}.json: a rank's files are durable
POLL_S = 0.05


def pending_dir(ckpt_dir: Path, tag: str) -> Path:
    return Path(ckpt_dir) / f"{PENDING_PREFIX}{tag}"


def snapshot(obj, _storages: dict | None = None):
    """A copy of `obj` whose tensors live in host memory and share nothing with the originals.

    Dicts, lists and tuples are rebuilt; every tensor is copied to the CPU storage by storage, so
    tensors that were views of one storage (ZeRO's flat partitions) are views of one copy, as
    torch.save would write them. Other values are kept as they are: DeepSpeed's and our state dicts
    hold numbers, strings and config objects that training does not mutate, and every container is
    new, so a later in-place update of a parameter or of a dict cannot reach the copy being written."""
    storages = {} if _storages is None else _storages
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = (obj.device, storage.data_ptr(), storage.nbytes())
        copy = storages.get(key)
        if copy is None:
            copy = storages[key] = storage.cpu() if obj.device.type != "cpu" else storage.clone()
        out = torch.empty(0, dtype=obj.dtype).set_(copy, obj.storage_offset(), obj.size(), obj.stride())
        if isinstance(obj, torch.nn.Parameter):
            out = torch.nn.Parameter(out, requires_grad=obj.requires_grad)
        return out
    if isinstance(obj, dict):
        out = obj.__class__() if type(obj) is not dict else {}
        for k, v in obj.items():
            out[k] = snapshot(v, storages)
        return out
    if isinstance(obj, list):
        return [snapshot(v, storages) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(snapshot(v, storages) for v in obj)
    return obj


class DeferredRecorder(WriteRecorder):
    """A WriteRecorder whose `save` copies the object to host memory and writes it later (`write_all`).

    `deepspeed(engine)` (inherited) routes DeepSpeed's checkpoint writes here, so its state dicts are
    snapshot while the engine's tensors are exactly the step's; the bytes and their hashes are made by
    `write_all` in the background thread, through WriteRecorder.save."""

    def __init__(self, root: str | Path):
        super().__init__(root)
        self.deferred: list[tuple[object, Path, bool]] = []

    def save(self, obj, path: str | Path, zipfile: bool = True) -> None:
        self.deferred.append((snapshot(obj), Path(path), zipfile))

    def write_all(self) -> None:
        for obj, path, zipfile in self.deferred:
            WriteRecorder.save(self, obj, path, zipfile=zipfile)
        self.deferred.clear()


class AsyncSave:
    """One background checkpoint write of this rank, and (on rank 0) its commit.

    `commit(files)`: rank 0's commit (manifest, meta.json, latest, prune) given every rank's recorded
    files; `classify(exc)`: the one line for a write error, or None for a bug (re-raised by `finish`)."""

    def __init__(self, tag: str, step: int, tag_dir: Path, ckpt_dir: Path, rank: int, world: int,
                 recorder: DeferredRecorder, commit, classify, wait_s: float):
        self.tag, self.step, self.tag_dir, self.ckpt_dir = tag, step, tag_dir, ckpt_dir
        self.rank, self.world, self.recorder = rank, world, recorder
        self._commit, self._classify, self._wait_s = commit, classify, wait_s
        self.problem: str | None = None  # this rank's outcome (rank 0: the commit's too)
        self.error: BaseException | None = None  # an unexpected exception, re-raised by finish
        self.write_seconds: float | None = None
        self.started = time.time()
        # a daemon: a run that dies (a lost peer, a kill) does not wait for it; its folder stays uncommitted
        self._thread = threading.Thread(target=self._run, name=f"checkpoint-{tag}", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()

    # ------------------------------------------------------------ the background thread

    def _run(self) -> None:
        pending = pending_dir(self.ckpt_dir, self.tag)
        mine = {"problem": None, "files": {}}
        try:
            if faults.injected("disk-full-during-checkpoint", self.step):  # a full disk met by this thread
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.tag_dir / f"rank{self.rank}.pt"))
            self.recorder.write_all()
            for rel in self.recorder.files:  # durable before the marker says so
                fsync_path(self.tag_dir / rel)
            if faults.injected("slow-checkpoint-write"):  # a slow disk (tests): the write outlasts a step
                _wait_for_logged_step(self.ckpt_dir.parent / "metrics.jsonl", self.step + 1,
                                      float(os.environ.get("HIERVL_FAULT_SLOW_S", "120")))
            if faults.injected("kill-during-checkpoint", self.step):
                os._exit(9)  # die with the files written, before the marker and the commit
            mine["files"] = self.recorder.files
        except BaseException as exc:  # noqa: BLE001 - reported through the marker and finish()
            mine["problem"] = self._classify(exc)
            if mine["problem"] is None:
                self.error = exc
                mine["problem"] = f"rank {self.rank} failed writing checkpoint {self.tag_dir}: {exc!r}"
        try:
            write_atomic(pending / f"rank{self.rank}.json", json.dumps(mine))
        except BaseException as exc:  # noqa: BLE001
            self.problem = self._classify(exc) or f"rank {self.rank} could not mark checkpoint {self.tag} written: {exc!r}"
            return
        self.problem = mine["problem"]
        if self.rank == 0:
            self._commit_when_all_wrote(pending)
        self.write_seconds = round(time.time() - self.started, 3)

    def _commit_when_all_wrote(self, pending: Path) -> None:
        deadline = time.time() + self._wait_s
        markers = [pending / f"rank{r}.json" for r in range(self.world)]
        while not all(m.is_file() for m in markers):
            if time.time() > deadline:
                missing = [r for r, m in enumerate(markers) if not m.is_file()]
                self.problem = (f"ranks {missing} did not finish writing checkpoint {self.tag_dir} within "
                                f"{self._wait_s:.0f}s (train.dist_timeout_s)")
                break
            time.sleep(POLL_S)
        if self.problem is None:
            outcomes = [json.loads(m.read_text()) for m in markers]
            self.problem = next((o["problem"] for o in outcomes if o["problem"]), None)
        if self.problem is None:
            known = {k: v for o in outcomes for k, v in o["files"].items()}
            try:
                self._commit(known)
            except BaseException as exc:  # noqa: BLE001
                self.problem = self._classify(exc)
                if self.problem is None:
                    self.error = exc
                    self.problem = f"committing checkpoint {self.tag_dir} failed: {exc!r}"
        if self.problem is not None:
            shutil.rmtree(self.tag_dir, ignore_errors=True)  # never leave a partial one taking the space
        shutil.rmtree(pending, ignore_errors=True)


def _wait_for_logged_step(metrics: Path, step: int, limit_s: float) -> None:
    """The `slow-checkpoint-write` fault: hold the write until rank 0 logged `step` in metrics.jsonl
    (train.log_every=1), at most `limit_s`: a disk slower than a training step, on any machine."""
    deadline = time.time() + limit_s
    while time.time() < deadline:
        try:
            lines = metrics.read_text().splitlines()
        except OSError:
            lines = []
        if any(json.loads(line).get("step", 0) >= step for line in lines if line.strip().endswith("}")):
            return
        time.sleep(POLL_S)

