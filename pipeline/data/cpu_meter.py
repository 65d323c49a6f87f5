"""The loader's own CPU time: what decoding costs the training process, which data-wait does not show.

On a CPU machine the loader does not make the model *wait* so much as take CPU (and the GIL) from it:
a run can read 2-4% data-wait while an ideal loader trains 1.6x faster (bench/RESULTS.md "Issue #27").
So the loader counts the CPU seconds it spends itself:

- its Python threads (the producer thread that plans and assembles batches, the PyAV decode threads),
  each measured with `time.thread_time()` around its own work (threads come and go per epoch/batch);
- DALI's native worker threads, by their Linux thread ids (found when the DALI pipeline is built);
- its decode worker processes, from /proc/<pid>/stat.

`LoaderCpuMeter.seconds()` is the total so far; `process_tree_seconds(pids)` the CPU of this process
(all threads) plus those processes: the denominator of the loader's CPU share. Linux /proc gives the
thread and process figures; elsewhere they count 0 (the thread_time part still works).

Owns: CPU accounting of the loader's threads and processes.
Must not touch: decoding or batch order.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_cpu(path: str) -> float | None:
    """utime + stime seconds from a /proc .../stat file, or None when it is gone."""
    try:
        fields = Path(path).read_text().rsplit(") ", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return None


def pid_cpu_seconds(pids) -> float:
    """User + system CPU seconds of these processes so far (0 for any gone or unreadable)."""
    return sum(_stat_cpu(f"/proc/{pid}/stat") or 0.0 for pid in pids)


def process_tree_seconds(pids=()) -> float:
    """CPU seconds of this process (every thread) plus the processes `pids`."""
    return time.process_time() + pid_cpu_seconds(pids)


def thread_ids() -> set[int]:
    """Native ids of this process's threads now (empty where /proc is missing)."""
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


class LoaderCpuMeter:
    """CPU seconds spent by one loader: its threads (measured in-thread), native threads by id, worker pids."""

    def __init__(self):
        self._lock = threading.Lock()
        self._thread_s = 0.0
        self._native: dict[int, float] = {}  # native thread id -> last CPU seconds read (kept once it exits)
        self._pids: list[int] = []

    def add(self, seconds: float) -> None:
        """Add CPU seconds a loader thread measured on itself (`time.thread_time()` deltas)."""
        with self._lock:
            self._thread_s += seconds

    def timed(self):
        """A context manager adding this thread's CPU time inside the block."""
        return _Timed(self)

    def watch_threads(self, tids) -> None:
        """Count these native threads (e.g. DALI's workers) from now on."""
        with self._lock:
            for t in tids:
                self._native.setdefault(int(t), 0.0)

    def watch_processes(self, pids) -> None:
        with self._lock:
            self._pids = [int(p) for p in pids if p]

    def seconds(self) -> float:
        """Total CPU seconds so far."""
        with self._lock:
            for tid in self._native:
                now = _stat_cpu(f"/proc/self/task/{tid}/stat")
                if now is not None:
                    self._native[tid] = now
            return self._thread_s + sum(self._native.values()) + pid_cpu_seconds(self._pids)

    @property
    def pids(self) -> list[int]:
        return list(self._pids)


class _Timed:
    def __init__(self, meter: LoaderCpuMeter):
        self.meter = meter

    def __enter__(self):
        self.t0 = time.thread_time()
        return self

    def __exit__(self, *exc):
        self.meter.add(time.thread_time() - self.t0)
        return False
