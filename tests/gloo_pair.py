"""Two gloo ranks that live for the whole test session and run one job after another (a helper
module, not collected; conftest.py's `gloo_pair` fixture holds the one instance).

    results = pair.run(job, *args)   # [rank 0's return value, rank 1's]; job(rank, world, *args)

Why: four modules compare 2 ranks against 1 (test_distributed, test_model_distributed,
test_grad_cache, test_evaluate); a fresh `mp.spawn` for each costs two interpreter starts, the torch /
transformers / hiervl imports and a process-group rendezvous, on a loaded 2-core machine tens of
seconds each. Here the two processes start once; each job runs on both ranks inside the same process
group (`hiervl.distributed.init(backend="gloo")`, RANK / WORLD_SIZE / MASTER_* set as a launcher
would). `job` must be a module-level function (the workers import it by name, as `mp.spawn` does).
A job that raises on either rank fails `run` with that rank's traceback, and the pair is closed
(the other rank may be stuck in a collective); the next `run` starts a fresh pair.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback

WORLD = 2
TIMEOUT_S = 900  # one job, on a loaded machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, tasks, results) -> None:
    import torch
    from hiervl import distributed as D

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    D.init(backend="gloo")
    try:
        while (task := tasks.get()) is not None:
            job, args = task
            try:
                results.put((rank, True, job(rank, WORLD, *args)))
            except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
                results.put((rank, False, traceback.format_exc()))
    finally:
        D.destroy()


class GlooPair:
    """Two spawned gloo ranks (started at the first `run`), see the module docstring."""

    def __init__(self):
        self._procs: list = []

    def _start(self) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(WORLD)]
        self._results = ctx.Queue()
        port = _free_port()
        # not daemonic: a job may start processes of its own (the eval loader's decode workers)
        self._procs = [ctx.Process(target=_worker, args=(r, port, self._tasks[r], self._results), name=f"gloo-rank{r}")
                       for r in range(WORLD)]
        for p in self._procs:
            p.start()

    def run(self, job, *args) -> list:
        """job(rank, world, *args) on both ranks; their return values in rank order."""
        if not self._procs:
            self._start()
        for t in self._tasks:
            t.put((job, args))
        got: dict[int, object] = {}
        try:
            while len(got) < WORLD:
                rank, ok, value = self._results.get(timeout=TIMEOUT_S)
                if not ok:
                    raise RuntimeError(f"{job.__name__} failed on gloo rank {rank}:\n{value}")
                got[rank] = value
        except (RuntimeError, queue.Empty):
            self.close(kill=True)
            raise
        return [got[r] for r in range(WORLD)]

    def close(self, kill: bool = False) -> None:
        for p, t in zip(self._procs, getattr(self, "_tasks", [])):
            if kill:
                p.kill()
            else:
                t.put(None)
        for p in self._procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []
