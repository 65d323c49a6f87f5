"""PyAV decoding in worker *processes*: the loader's CPU decoders, one per core, beside DALI.

Threads share one interpreter, so PyAV in threads does not scale with cores (bench/RESULTS.md
"Issue #14"); processes do. `DecodePool(workers, root, prep)` starts `workers` processes (start
method `forkserver`, else `spawn`: safe with torch and DALI threads in the parent, never `fork`).
Each task names a sample by (shard, offset, size) plus its frame indices, crop and flip; the
worker reads the bytes itself (nothing large goes down a pipe): it opens its own store for the
dataset root (`open_store(data.path, storage)`, pipeline/storage.py: one `pread` on a local tar,
a retried ranged GET on s3:// / gs:// / http(s)://, the shard cache of `storage.cache_dir` via
pipeline/data/byte_source.py), never a store pickled from the parent; then it decodes with
`decode_pyav`, resizes and crops once in uint8 (`prep.resize_crop`: `prep` is the loader's
`Preprocessing`, pipeline/data/preprocess.py) and writes the clip
[T, 3, S, S] uint8 (a quarter of float32's bytes) into its slot of a shared-memory ring (allocated once, `slots` clips; the result message carries
only the slot number: no per-clip allocation, file descriptor or pickled pixels). The loader
normalises each result straight into its batch slot (`prep.normalize`, the one copy), then releases
the ring slot. So the loader's,
which worker decoded a sample, or when, never changes the batch: the sample order, positions
and resume contract are the sampler's alone.

Failures: a sample that fails to read or decode comes back as a reason (the loader flags the
slot invalid and logs it, as in-process). A worker that *dies* (segfault in libav, OOM kill,
SIGTERM/SIGKILL) raises `DecodeWorkerError` in the loader naming the worker, its exit signal and
the sample it was on: never a hang. With `crash_ledger=True` (training: `data.decode_timeout_s`,
pipeline/data/crash_ledger.py) the pool goes on instead: the sample a dead worker was on comes back
failed with a reason starting "decode worker died", one on which a worker spent more than
`timeout_s` comes back "decode timed out" after that worker is SIGKILLed, and a fresh worker takes
the dead one's place; the loader then writes the sample into the run's crash ledger. Shutdown: `close()` (the loader's `close`, a finaliser and
interpreter exit) stops and joins the workers; workers ignore SIGINT (Ctrl-C goes to the whole
process group; the parent decides), and exit by themselves within a second when the parent is
gone (e.g. killed with SIGKILL), so no orphan keeps decoding.

Owns: the worker processes, their task and result queues, the pool's throughput estimate.
Must not touch: sample order, positions or batch assembly (loader.py).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from hiervl.data.preprocess import Preprocessing
from hiervl.errors import UserError

_CANCELLED = "cancelled"


class DecodeWorkerError(RuntimeError):
    """A decode worker process died; the loader cannot go on without the samples it held."""


MAX_AUTO_WORKERS = 8


def resolve_decode_workers(value: int | str, device: str, world_size: int, cores: int | None = None,
                           local_ranks: int | None = None) -> int:
    """`data.decode_workers` as a number. auto: the cores this process may run on, less one per rank on
    this node, shared among those ranks; at least 1 on a CPU machine (decoding in a worker process costs
    ~2x less CPU per clip than in the trainer's threads, and none of its GIL), at least 0 on a GPU
    machine (DALI mixed decodes there), at most MAX_AUTO_WORKERS. `local_ranks` defaults to the
    launcher's LOCAL_WORLD_SIZE / LOCAL_SIZE, else the world size."""
    if value != "auto":
        return int(value)
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local_ranks is None:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world_size)
    local_ranks = max(1, min(local_ranks, world_size))
    spare = (cores - local_ranks) // local_ranks
    return min(MAX_AUTO_WORKERS, max(1 if device == "cpu" else 0, spare))


def start_method() -> str:
    """forkserver where the platform has it (Linux, macOS), else spawn; never fork (threads, CUDA)."""
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


# ---------------------------------------------------------------------------- worker side


def _parent_alive(parent_pid: int, parent_ppid_seen: int) -> bool:
    if os.getppid() != parent_ppid_seen:  # our own parent (the main or the fork server) went away
        return False
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


STORE_ENV = ("AWS_", "GOOGLE_")  # the variables the stores read credentials and endpoints from


def store_env() -> dict:
    """This process's store variables, for the workers: a forkserver child inherits the environment
    of the fork server (from whenever it started), not the loader's at the time of the pool."""
    return {k: v for k, v in os.environ.items() if k.startswith(STORE_ENV)}


def open_source(root: str, storage: dict | None, env: dict | None = None):
    """This process's reader of the dataset's bytes (its own store: clients and descriptors are not
    shared across processes). `storage`: the StorageConfig fields as a dict, or None; `env`: the
    loader's `store_env()` (kept in memory only, as the loader's own environment is)."""
    from hiervl.data.byte_source import SampleByteSource
    from hiervl.storage import configure, open_store

    if env is not None:
        for k in [k for k in os.environ if k.startswith(STORE_ENV) and k not in env]:
            del os.environ[k]
        os.environ.update(env)
    if storage is not None:
        configure(storage)
    return SampleByteSource(open_store(root, storage), [], np.zeros(0, np.int64), np.zeros(0, np.int64), storage)


def _injected_fault(key: str) -> None:
    """Tests only (pipeline/faults.py): the worker decoding the sample whose key contains
    $HIERVL_FAULT_MATCH blocks forever in a kernel read (`decode-hang`) or dies of SIGSEGV (`decode-crash`)."""
    from hiervl import faults

    match = os.environ.get("HIERVL_FAULT_MATCH")
    if not match or match not in key:
        return
    if faults.injected("decode-hang"):
        read_end, _write_end = os.pipe()
        os.read(read_end, 1)  # nobody ever writes
    if faults.injected("decode-crash"):
        os.kill(os.getpid(), signal.SIGSEGV)


def decode_one(source, task: tuple, prep: Preprocessing):
    """One task -> (uint8 clip [T, 3, S, S] or None, reason or None). Same messages as the in-process
    path. `source`: what `open_source` returns."""
    from hiervl.data.decode import decode_pyav

    _tid, shard, offset, size, frames, crop, flip = task[:7]
    _injected_fault(task[7] if len(task) > 7 else "")
    try:
        data = source.read_at(shard, int(offset), int(size))
    except (OSError, MemoryError) as exc:
        return None, f"read failed: {exc or type(exc).__name__}"
    try:
        clip = decode_pyav(data, frames)
        prep.check_frames(clip)
    except Exception as exc:  # noqa: BLE001 - a corrupt video must not stop the run
        return None, f"PyAV failed: {type(exc).__name__}: {exc}"
    try:
        return prep.resize_crop(clip, crop, flip), None
    except Exception as exc:  # noqa: BLE001
        return None, f"transform failed: {type(exc).__name__}: {exc}"


SHM = "/dev/shm"


def check_shared_memory(need: int, slots: int, path: str = SHM) -> None:
    """Refuse (one line) a ring larger than `path`'s free space. A shared-memory tensor is a sparse file
    there: allocating it succeeds whatever the size, and the shortfall is a SIGBUS in a decode worker
    at the first clip that does not fit (a container's default /dev/shm is 64 MB; base.yaml's ring is
    320 uint8 clips x 1.8 MB = 0.58 GB per rank)."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:  # no /dev/shm (not Linux): torch's own allocation decides
        return
    if need > free:
        raise UserError(f"data.decode_workers needs {need / 2**20:.0f} MiB of shared memory for its ring ({slots} clips) "
                        f"but {path} has {free / 2**20:.0f} MiB free; give the machine a larger {path} (docker "
                        f"--shm-size={max(1, -(-2 * need // 2**30))}g), lower data.prefetch or data.batch_size, or set "
                        "data.decode_workers=0")


def _worker_main(wid: int, root: str, prep: Preprocessing, ring: torch.Tensor, tasks, results, current, floor,
                 parent_pid: int, storage: dict | None = None, env: dict | None = None, started=None) -> None:
    """A worker's loop: tasks (tid, slot, shard, offset, size, frames, crop, flip, key) -> (tid, ok, reason,
    seconds); a clip is written to ring[slot]. `started[wid]`: when (time.monotonic) the current task began."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent closes us
    torch.set_num_threads(1)  # one core per worker: the pool is the parallelism
    ppid = os.getppid()
    source = open_source(root, storage, env)
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if not _parent_alive(parent_pid, ppid):
                return
            continue
        if task is None:
            return
        tid, slot = task[0], task[1]
        if tid < floor.value:  # the loader stopped iterating; this batch is no longer wanted
            results.put((tid, False, _CANCELLED, 0.0))  # the parent frees the slot on this notice
            continue
        if started is not None:
            started[wid] = time.monotonic()
        current[wid] = tid
        t0 = time.perf_counter()
        clip, reason = decode_one(source, (tid, *task[2:]), prep)
        if clip is not None:
            ring[slot].copy_(clip)
        results.put((tid, clip is not None, reason, time.perf_counter() - t0))
        current[wid] = -1


# ---------------------------------------------------------------------------- parent side


class DecodePool:
    """`workers` PyAV decode processes over the shards under `root`; see the module docstring.

    One producer thread drives it: `submit` tasks, then `wait` for the ones a batch needs
    (results of others are kept for later), `cancel_pending` when the iteration stops early.
    `clips_per_s` estimates what the pool delivers when all workers are busy (the hybrid split).
    """

    def __init__(self, workers: int, root: str | Path, prep: Preprocessing, slots: int, method: str | None = None,
                 storage: dict | None = None, crash_ledger: bool = False, timeout_s: float = 0.0):
        """`root`: the dataset folder or URL; `storage`: the StorageConfig fields as a plain dict (each
        worker opens its own store from them). `crash_ledger`: a dead worker's sample fails and a new
        worker replaces it (instead of DecodeWorkerError); `timeout_s` > 0 (with crash_ledger): a worker
        on one sample for longer is killed and the sample fails (see the module docstring)."""
        if workers < 1 or slots < 1:
            raise ValueError(f"workers={workers} and slots={slots} must be >= 1")
        self.workers, self.root, self.prep, self.slots = workers, str(root), prep, slots
        self.storage = dict(storage) if storage is not None else None
        self.method = method or start_method()
        self._procs: list = []
        self._next_tid = 0
        self._keys: dict[int, str] = {}  # tid -> sample key (to name it if its worker dies)
        self._slot_of: dict[int, int] = {}  # tid -> ring slot, from submit until release
        self._free: list[int] = list(range(slots))[::-1]
        self._outstanding: set[int] = set()  # tids submitted whose result has not come back
        self._done: dict[int, tuple] = {}
        self._sec_per_clip: float | None = None  # EWMA of one worker's seconds per clip
        self._closed = False
        self._lock = threading.Lock()
        self.crash_ledger, self.timeout_s = crash_ledger, float(timeout_s)
        self.restarts = 0  # workers replaced after a death or a time-out

    # -------------------------------------------------------------- life cycle

    def start(self) -> None:
        if self._procs:
            return
        ctx = mp.get_context(self.method)
        if self.method == "forkserver":
            # the fork server imports these once; each worker then starts in milliseconds
            ctx.set_forkserver_preload(["torch", "av", "hiervl.data.decode", "hiervl.data.decode_pool"])
        shape = (self.slots, self.prep.num_frames, 3, self.prep.size, self.prep.size)
        check_shared_memory(int(np.prod(shape)), self.slots)  # uint8: one byte a value
        try:
            self._ring = torch.empty(shape, dtype=torch.uint8).share_memory_()  # [slots, T, 3, S, S] uint8
        except (RuntimeError, OSError) as exc:
            mib = int(np.prod(shape)) / 2**20
            raise UserError(f"cannot allocate {mib:.0f} MiB of shared memory for data.decode_workers ({exc}); "
                            "give the machine a larger /dev/shm (docker --shm-size) or lower data.prefetch / "
                            "data.batch_size, or set data.decode_workers=0") from None
        # Results travel through a SimpleQueue: a worker's put() is written to the pipe before it returns.
        # A Queue's put() only hands the item to a feeder thread, so a worker that crashes on its next
        # sample could take a finished result down with it, and the batch would wait for it forever.
        self._tasks, self._results = ctx.Queue(), ctx.SimpleQueue()
        self._current = ctx.Array("q", [-1] * self.workers, lock=False)  # tid each worker is on, -1 idle
        self._floor = ctx.Value("q", 0, lock=False)  # tasks below this tid are dropped
        self._started = ctx.Array("d", [0.0] * self.workers, lock=False)  # when each worker's task began
        self._ctx = ctx
        for wid in range(self.workers):
            self._procs.append(self._spawn(wid))

    def _spawn(self, wid: int):
        p = self._ctx.Process(target=_worker_main, name=f"hiervl-decode-{wid}", daemon=True,
                              args=(wid, self.root, self.prep, self._ring, self._tasks, self._results, self._current,
                                    self._floor, os.getpid(), self.storage, store_env(), self._started))
        p.start()
        return p

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def close(self, timeout: float = 5.0) -> None:
        """Stop and join every worker (idempotent)."""
        with self._lock:
            if self._closed or not self._procs:
                self._closed = True
                return
            self._closed = True
        self._floor.value = self._next_tid
        for _ in self._procs:
            try:
                self._tasks.put(None)
            except (OSError, ValueError):
                break
        deadline = time.monotonic() + timeout
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.terminate()
                p.join(1.0)
            if p.is_alive():
                p.kill()
                p.join(1.0)
        self._tasks.cancel_join_thread()  # items left in a queue must not block interpreter exit
        self._tasks.close()
        self._results.close()
        self._done.clear()
        self._ring = None

    # -------------------------------------------------------------- tasks

    def submit(self, key: str, shard: str, offset: int, size: int, frames: np.ndarray, crop: tuple, flip: bool) -> int:
        """Queue one sample; returns its task id. Its ring slot stays taken until `release`."""
        if self._closed:
            raise RuntimeError("the decode pool is closed")
        if not self._free:
            raise RuntimeError(f"all {self.slots} ring slots are taken: results must be released before more "
                               "samples are submitted")
        self.start()
        tid = self._next_tid
        self._next_tid += 1
        slot = self._free.pop()
        self._keys[tid], self._slot_of[tid] = key, slot
        self._outstanding.add(tid)
        self._tasks.put((tid, slot, shard, int(offset), int(size), np.asarray(frames, dtype=np.int32), tuple(crop),
                         bool(flip), key))
        return tid

    def wait(self, tids: list[int], stop: threading.Event | None = None) -> dict[int, tuple] | None:
        """tid -> (clip or None, reason or None) for every tid; None if `stop` was set first.

        A clip is a view of its ring slot [T, 3, S, S]: copy it out, then `release(tids)`.
        Raises DecodeWorkerError if a worker died (checked every 0.2 s while waiting).
        """
        want = set(tids)
        while not want.issubset(self._done):
            if stop is not None and stop.is_set():
                return None
            self._receive()
        return {t: self._done.pop(t) for t in tids}

    def release(self, tids) -> None:
        """Give the ring slots of these (waited-for) tasks back."""
        for t in tids:
            self._keys.pop(t, None)
            slot = self._slot_of.pop(t, None)
            if slot is not None:
                self._free.append(slot)

    def _receive(self) -> None:
        """Take one result off the queue (or check the workers' health after 0.2 s without one)."""
        try:
            if not self._results._reader.poll(0.2):  # SimpleQueue.get has no timeout
                self._check_workers()
                return
            tid, ok, reason, seconds = self._results.get()
        except (EOFError, OSError):
            # a worker that died while sending leaves a broken message: name the dead worker
            # (its exit code may take a moment to show)
            for _ in range(20):
                self._check_workers()
                time.sleep(0.1)
            raise
        self._outstanding.discard(tid)
        if tid < self._floor.value:  # a cancelled batch's result (or skip notice): its slot is free again
            self.release([tid])
            return
        self._done[tid] = (self._ring[self._slot_of[tid]] if ok else None, reason)
        s = float(seconds)
        self._sec_per_clip = s if self._sec_per_clip is None else 0.8 * self._sec_per_clip + 0.2 * s

    def cancel_pending(self) -> None:
        """Drop every task submitted so far and wait until no worker still writes a slot of theirs.

        Queued tasks come back at once as skip notices; a task being decoded finishes first (one
        clip's time). Afterwards every ring slot is free.
        """
        if not self._procs or self._closed:
            return
        self._floor.value = self._next_tid
        self._done.clear()
        while self._outstanding:
            self._receive()
        self._slot_of.clear()  # nothing submitted so far is wanted any more, nor held by a batch
        self._keys.clear()
        self._free = list(range(self.slots))[::-1]

    def clips_per_s(self) -> float | None:
        """What the pool delivers with every worker busy: workers / (seconds per clip), or None before any."""
        return None if self._sec_per_clip is None else self.workers / max(self._sec_per_clip, 1e-6)

    def _fail_and_replace(self, wid: int, reason: str) -> None:
        """crash_ledger mode: the task worker `wid` was on fails with `reason`; a new worker takes its place."""
        tid = self._current[wid]
        self._current[wid] = -1
        if tid >= 0 and tid in self._outstanding:
            self._outstanding.discard(tid)
            if tid < self._floor.value:
                self.release([tid])
            else:
                self._done[tid] = (None, reason)
        self._procs[wid].join(1.0)
        self._procs[wid] = self._spawn(wid)
        self.restarts += 1

    def _check_workers(self) -> None:
        for wid, p in enumerate(self._procs):
            if (self.crash_ledger and self.timeout_s > 0 and p.exitcode is None and self._current[wid] >= 0
                    and time.monotonic() - self._started[wid] > self.timeout_s):
                p.kill()  # hung or spinning in libav: only a kill gets it back
                p.join(5.0)
                self._fail_and_replace(wid, f"decode timed out after {self.timeout_s:g}s (data.decode_timeout_s); "
                                            "the worker was killed")
                continue
            if p.exitcode is None:
                continue
            code = p.exitcode
            if self.crash_ledger:
                how = signal.Signals(-code).name if code < 0 else f"exit code {code}"
                self._fail_and_replace(wid, f"decode worker died ({how}) on this sample")
                continue
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            tid = self._current[wid]
            on = f" while decoding sample {self._keys[tid]!r}" if tid >= 0 and tid in self._keys else ""
            hint = (" (its traceback is above; a script that starts a loader with data.decode_workers > 0 needs "
                    "the `if __name__ == \"__main__\":` guard, as for any spawned process)") if code > 0 else ""
            self.close(timeout=1.0)
            raise DecodeWorkerError(
                f"decode worker {wid} (pid {p.pid}) {how}{on}{hint}; the loader stopped. If a sample crashes libav, "
                "remove it from the manifest; if the machine killed it for memory, lower data.decode_workers "
                "or data.prefetch")
