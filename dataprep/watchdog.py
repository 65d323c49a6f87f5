"""`prep.decode_timeout_s`: each sample is processed in a child process that is killed when it runs too long.

FFmpeg can hang or spin on a corrupt file (DALI#2563, mmaction2#838, openmpf#1678), and a hang inside
one C call cannot be interrupted from Python in the same process. So with a time limit, a shard task
hands its samples one at a time to a child process (`python -c ...serve()`, started once per shard and
reused while it behaves; a plain subprocess, since shard tasks may run in daemonic processes):

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

import os
import pickle
import select
import signal
import struct
import subprocess
import sys

from hiervl.dataprep.transcode import SampleRefused, process_sample

_CHILD = "from hiervl.dataprep.watchdog import serve; serve()"


def _send(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(struct.pack("<Q", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _recv(fd: int):
    def exactly(n: int) -> bytes:
        chunks = []
        while n:
            chunk = os.read(fd, min(n, 1 << 20))
            if not chunk:
                raise EOFError("the other side closed the pipe")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    return pickle.loads(exactly(struct.unpack("<Q", exactly(8))[0]))


def serve() -> None:
    """The child: (sample, out_cfg) frames on stdin -> (kind, payload) frames on the original stdout,
    until stdin closes. Library output goes to stderr, so it cannot corrupt a frame."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the child stops
    out_fd = os.dup(1)
    os.dup2(2, 1)
    while True:
        try:
            sample, out_cfg = _recv(0)
        except EOFError:
            return
        try:
            answer = ("ok", process_sample(sample, out_cfg))
        except SampleRefused as exc:
            answer = ("refused", (exc.stage, exc.reason))
        except Exception as exc:  # noqa: BLE001 - reported as the sample's internal error by the parent
            answer = ("error", f"{type(exc).__name__}: {exc}")
        _send(out_fd, answer)


class SampleWatchdog:
    """process_sample in a killable child with a per-sample time limit (see the module docstring)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = float(timeout_s)
        self._proc: subprocess.Popen | None = None

    def _start(self) -> None:
        # a plain subprocess, not multiprocessing: shard tasks may run in daemonic processes
        # (dataprep/distribute.py), which multiprocessing forbids to have children
        self._proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      close_fds=True)

    def _kill(self) -> int | None:
        """Stop the child now; returns its exit code (negative: the signal)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        code = proc.wait(timeout=30)
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        return code

    def process(self, sample: dict, out_cfg: dict) -> tuple[bytes, str, dict]:
        """process_sample(sample, out_cfg) within the time limit; SampleRefused when over it or crashed."""
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        try:
            _send(self._proc.stdin.fileno(), (sample, out_cfg))
            ready = bool(select.select([self._proc.stdout.fileno()], [], [], self.timeout_s)[0])
            answer = _recv(self._proc.stdout.fileno()) if ready else None
        except (EOFError, OSError, pickle.UnpicklingError):
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
