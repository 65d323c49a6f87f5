"""Where the shard tasks run: a local process pool or Ray, behind one worker signature.

video2dataset's seam: the driver hands `distribute` a plain, picklable, module-level `worker`
and a list of argument tuples; `worker(*task)` runs once per task, in a process of its own on this
machine (`kind="local"`, at most `workers` at a time) or as a Ray task (`kind="ray"`), and the results
come back as they finish. The worker is the same function either way, so the shards are the same
bytes either way (tests/test_prep_distribute.py checks it).

Why two: a local Ray cluster costs seconds to start (5-10 s on an idle 2-core machine, 30-45 s
under load, and its hard-coded 30-s raylet wait can fail outright), more than the work of a small
prep; a process pool starts in well under a second. Ray is there for clusters (`--ray-address`)
and for big jobs. `prep.distributor=auto` (`choose`) takes Ray when an address is given or from
`AUTO_RAY_MIN_SAMPLES` samples to process on; the local pool otherwise. With `ray`, a Ray this
process already holds (tests, a notebook) is used as it is. A Ray start that fails is retried once, then reported in one line naming the fix.

Owns: choosing and running the backend (pool or Ray start, retries, shutdown).
Must not touch: what a task does (worker.py) or the plan (plan.py, driver.py).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import connection

from hiervl.errors import UserError
from hiervl.log import get_logger

log = get_logger(__name__)

KINDS = ("auto", "local", "ray")
# `auto` takes Ray at this many samples to process and above. Measured (bench/prep_distributor.py,
# bench/RESULTS.md "Issue #27: prep without Ray"), 24 videos, 2 workers, load 12.6: the pool's wall
# 3.1 s vs Ray's 17.7 s, Ray adding 14.4 s of start-up to 54 ms of work per video; Ray's start is
# under 10% of the wall from ~2600 videos on at that load, ~700 with the 4-5 s start of an idle
# machine. Past that Ray costs little and brings its scheduling and a cluster to grow into.
AUTO_RAY_MIN_SAMPLES = 1000
MAX_RETRIES = 2  # a task whose worker process died is run again this many times (Ray's max_retries)


def choose(kind: str, num_samples: int, ray_address: str | None = None) -> str:
    """The backend for `kind` ("auto" | "local" | "ray") and `num_samples` samples to process:
    "local" or "ray". `--ray-address` with `prep.distributor=local` is refused."""
    if kind not in KINDS:
        raise UserError(f"prep.distributor={kind!r}: use one of {', '.join(KINDS)}")
    if kind == "local":
        if ray_address:
            raise UserError(f"--ray-address {ray_address} with prep.distributor=local: drop one (the local pool "
                            f"runs on this machine only)")
        return "local"
    if kind == "ray" or ray_address:
        return "ray"
    return "ray" if num_samples >= AUTO_RAY_MIN_SAMPLES else "local"


def distribute(tasks: Sequence[tuple], worker: Callable, kind: str = "local", workers: int = 2,
               ray_address: str | None = None, object_store_mb: int = 256) -> list:
    """`[worker(*task) for task in tasks]`, run on `kind` ("local" | "ray") with `workers` processes
    (a local Ray cluster's CPUs); results in task order."""
    with open_distributor(kind, workers, ray_address, object_store_mb) as d:
        done = dict(d.run(worker, tasks))
    return [done[i] for i in range(len(tasks))]


def open_distributor(kind: str, workers: int, ray_address: str | None = None, object_store_mb: int = 256):
    """A started backend (a context manager) whose `run(worker, tasks)` yields (task index, result)
    as tasks finish. `kind`: "local" or "ray" (see `choose`)."""
    if kind == "local":
        return LocalPool(workers)
    if kind == "ray":
        return RayTasks(workers, ray_address, object_store_mb)
    raise ValueError(f"distributor kind {kind!r}: 'local' or 'ray' (choose() resolves 'auto')")


class LocalPool:
    """Up to `workers` processes on this machine, one per task, forked from a forkserver that has
    imported the worker's module once (no fork of the driver's threads, no per-task import of PyAV:
    a task's process costs milliseconds). One process per task tells exactly which task a dead
    process (OOM kill, a crash in a codec) was running: that task runs again, up to MAX_RETRIES
    times, as on Ray. An exception raised by the worker is raised here as it is, the worker's
    traceback as a note."""

    kind = "local"

    def __init__(self, workers: int):
        self.workers = max(1, workers)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run(self, worker: Callable, tasks: Sequence[tuple]) -> Iterator[tuple[int, object]]:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([worker.__module__])  # effective when the forkserver starts (once per process)
        queue, tries, running = deque(range(len(tasks))), [0] * len(tasks), {}  # running: reader -> (task, process)
        try:
            while queue or running:
                while queue and len(running) < self.workers:
                    i = queue.popleft()
                    reader, writer = ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=_child, args=(writer, worker, tasks[i], dict(os.environ), os.getcwd()),
                                       daemon=True)
                    proc.start()
                    writer.close()  # the child's copy stays open: EOF here means the child is gone
                    running[reader] = (i, proc)
                for reader in connection.wait(list(running)):
                    i, proc = running.pop(reader)
                    try:
                        ok, payload = reader.recv()
                    except EOFError:  # it died before answering
                        ok, payload = None, None
                    reader.close()
                    proc.join()
                    if ok is None:
                        tries[i] += 1
                        if tries[i] > MAX_RETRIES:
                            raise RuntimeError(f"task {i} ({_describe(tasks[i])}): its worker process died "
                                               f"{tries[i]} times, last with exit code {proc.exitcode} (out of "
                                               f"memory? see the kernel log)")
                        log.warning("task %d (%s): its worker process died (exit code %s); running it again",
                                    i, _describe(tasks[i]), proc.exitcode)
                        queue.append(i)
                    elif not ok:
                        raise payload
                    else:
                        yield i, payload
        finally:  # an error, or the caller stopping early: no task keeps running
            for reader, (_, proc) in running.items():
                proc.kill()
                proc.join()
                reader.close()


def _child(writer, worker: Callable, task: tuple, environ: dict, cwd: str) -> None:
    """A LocalPool process: run the task, send (True, result) or (False, the exception). It takes
    the driver's environment and folder as they are now (the forkserver holds those of the moment
    it started: credentials set since, as a notebook or a test does, would be missing)."""
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    try:
        writer.send((True, worker(*task)))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the driver
        exc.add_note("in the worker process:\n" + "".join(traceback.format_exception(exc)).rstrip())
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:  # noqa: BLE001 - an exception that does not survive pickling: its text does
            exc = RuntimeError("".join(traceback.format_exception(exc)).rstrip())
        writer.send((False, exc))
    finally:
        writer.close()


class RayTasks:
    """One Ray task per task (num_cpus=1, max_retries=MAX_RETRIES), on a local cluster of `workers`
    CPUs started here, the cluster at `ray_address`, or the Ray this process already holds (used
    as it is, not shut down)."""

    kind = "ray"

    def __init__(self, workers: int, ray_address: str | None, object_store_mb: int):
        self.workers, self.address, self.object_store_mb = workers, ray_address, object_store_mb
        self.started = False

    def __enter__(self):
        import ray
        if ray.is_initialized():
            return self
        kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING"}
        if not self.address:
            kwargs.update(num_cpus=self.workers, object_store_memory=self.object_store_mb * 1024 * 1024)
        for attempt in (1, 2):
            try:
                ray.init(address=self.address, **kwargs)
                break
            except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception on its raylet timeout
                _shutdown_quietly(ray)
                reason = _first_line(exc)
                if attempt == 2:
                    where = f"join the cluster at {self.address}" if self.address else "start a local Ray cluster"
                    raise UserError(f"could not {where} twice ({reason}); on a busy machine run prep without "
                                    f"Ray: prep.distributor=local") from None
                log.warning("Ray did not start (%s); trying once more", reason)
                time.sleep(1.0)
        self.started = True
        return self

    def __exit__(self, *exc):
        if self.started:
            import ray
            ray.shutdown()
        return False

    def run(self, worker: Callable, tasks: Sequence[tuple]) -> Iterator[tuple[int, object]]:
        import ray
        remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(_call)
        pending = {remote.remote(worker, task): i for i, task in enumerate(tasks)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                yield pending.pop(ref), ray.get(ref)


def _call(worker: Callable, task: tuple):
    """A Ray task runs `worker(*task)` (ray.remote takes a function, not a partial of one)."""
    return worker(*task)


def _shutdown_quietly(ray) -> None:
    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001 - clean-up after a failed start: nothing more to report
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _describe(task: tuple) -> str:
    spec = task[0] if task else None
    return spec["name"] if isinstance(spec, dict) and "name" in spec else repr(task)[:80]
