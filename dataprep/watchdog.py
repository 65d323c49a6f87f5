"""`prep.decode_timeout_s`: each sample is processed in a child process that is killed when it runs too long.

FFmpeg can hang or spin on a corrupt file (DALI#2563, mmaction2#838, openmpf#1678), and a hang inside
one C call cannot be interrupted from Python in the same process. So with a time limit, a shard task
hands its samples one at a time to a child process (spawned once per shard, reused while it behaves):

    with SampleWatchdog(timeout_s) as dog:
        blob, ext, meta = dog.process(sample, out_cfg)   # or SampleRefused

- the child answers in time: its result (or its SampleRefused) is the sample's, exactly as in-process;
- it does not: it is SIGKILLed and the sample refused at stage `decode` with
  "timed out after Ns (prep.decode_timeout_s)"; the next sample gets a fresh child;
- it dies (a segfault in the decoder): refused with "decoder process died (signal N)".
The shard's bytes do not depend on the watchdog (the same `process_sample` runs), so a rerun gives the
same shard whether or not a time limit is set, as long as no sample hits it.
Cost: one process start per shard (~1 s of imports) and a pickle of each sample's output.

Owns: the child process, the time limit and the refusal reasons. Must not touch: what a sample becomes.
"""

from __future__ import annotations

import multiprocessing as mp
import signal

from hiervl.dataprep.transcode import SampleRefused, process_sample


def _child(conn) -> None:
    """Process samples until the parent closes the pipe; answer (kind, payload) per sample."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the child stops
    while True:
        try:
            sample, out_cfg = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", process_sample(sample, out_cfg)))
        except SampleRefused as exc:
            conn.send(("refused", (exc.stage, exc.reason)))
        except Exception as exc:  # noqa: BLE001 - reported as the sample's internal error by the parent
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class SampleWatchdog:
    """process_sample in a killable child with a per-sample time limit (see the module docstring)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = float(timeout_s)
        self._ctx = mp.get_context("spawn")  # no fork inside a Ray worker's threads
        self._proc = None
        self._conn = None

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_child, args=(child,), daemon=True, name="hiervl-prep-decode")
        self._proc.start()
        child.close()
        self._conn = parent

    def _kill(self) -> int | None:
        """Stop the child now; returns its exit code (negative: the signal)."""
        proc, self._proc = self._proc, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if proc is None:
            return None
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=30)
        return proc.exitcode

    def process(self, sample: dict, out_cfg: dict) -> tuple[bytes, str, dict]:
        """process_sample(sample, out_cfg) within the time limit; SampleRefused when over it or crashed."""
        if self._proc is None or not self._proc.is_alive():
            self._start()
        try:
            self._conn.send((sample, out_cfg))
            ready = self._conn.poll(self.timeout_s)
            answer = self._conn.recv() if ready else None
        except (EOFError, OSError, BrokenPipeError):
            ready, answer = True, None
        if answer is None:
            code = self._kill()
            if not ready:
                raise SampleRefused("decode", f"timed out after {self.timeout_s:g}s (prep.decode_timeout_s): the "
                                              "decoder hung or spun on this file; the file is skipped")
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise SampleRefused("decode", f"decoder process died ({how}) on this file; the file is skipped")
        kind, payload = answer
        if kind == "ok":
            return payload
        if kind == "refused":
            raise SampleRefused(*payload)
        raise RuntimeError(payload)

    def close(self) -> None:
        self._kill()

    def __enter__(self) -> SampleWatchdog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
