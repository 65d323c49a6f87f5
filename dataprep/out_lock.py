"""The lock on a prep output folder: one `hiervl prep` at a time writes a given `--out`.

`PrepLock(out)` (a context manager) creates `out/.hiervl-prep.lock` holding who holds it (pid,
host, the process's start time, when, the command). The file is written whole under a temporary
name and hard-linked into place, so taking it is atomic and the file is never half-written. A
second run into the same folder refuses in one line naming the holder and what to do. A lock
left by a process that died (same host, the pid gone or reused by another process: the start
time differs) is stale and is taken over with a warning; one from another host cannot be
checked from here, so the message says how to remove it by hand. The lock is removed on exit,
only by its holder.

`pid_alive` is also what the driver's clean-up asks before deleting a temporary file: the pid
is in its name (pipeline/atomic_write.py `temp_path`), and a live writer's file is never removed.

Owns: the output folder's lock file and the liveness test of a pid on this host.
Must not touch: anything else in the folder (the driver owns that).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from hiervl.atomic_write import temp_path
from hiervl.errors import UserError
from hiervl.log import get_logger

log = get_logger(__name__)
LOCK_FILE = ".hiervl-prep.lock"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in parentheses may hold spaces


def _holder_alive(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    if not pid_alive(pid):
        return False
    started = holder.get("pid_start")
    return started is None or _start_time(pid) in (None, started)


class PrepLock:
    """Hold `out/.hiervl-prep.lock` for the duration of a `with` block (see the module docstring).
    `hiervl train` holds the same kind of lock on its train.out_dir (`train_lock`)."""

    def __init__(self, out: str | Path, lock_file: str = LOCK_FILE, what: str = "hiervl prep",
                 elsewhere: str = "write to another --out"):
        self.out = Path(out)
        self.path = self.out / lock_file
        self.what, self.elsewhere = what, elsewhere
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": _start_time(os.getpid()),
                   "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:500]}

    def _try_link(self) -> bool:
        tmp = temp_path(self.path)
        tmp.write_text(json.dumps(self.me) + "\n")
        try:
            os.link(tmp, self.path)  # atomic; fails when a lock exists
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self, path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        for _ in range(3):
            if self._try_link():
                return
            holder = self._read(self.path)
            if holder is None:
                if not self.path.exists():
                    continue  # released between our two looks
                raise UserError(f"{self.path} is unreadable; if no `{self.what}` is writing to {self.out}, "
                                f"delete that file and run again")
            who = f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"
            if holder.get("host") != self.me["host"]:
                raise UserError(f"{self.out} is locked by another `{self.what}` ({who}); wait for it, or, if none "
                                f"runs there any more, delete {self.path} and run again")
            if _holder_alive(holder):
                raise UserError(f"{self.out} is locked by another `{self.what}` ({who}); wait for it to finish "
                                f"or {self.elsewhere}")
            # stale: move it aside (only one taker wins the rename), check it is the one we judged, retry
            aside = temp_path(self.path, ".stale")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            taken = self._read(aside)
            if taken is not None and taken != holder and _holder_alive(taken):  # a new holder came between
                try:
                    os.link(aside, self.path)  # give it back
                except FileExistsError:
                    pass
                aside.unlink(missing_ok=True)
                raise UserError(f"{self.out} is locked by another `{self.what}` (pid {taken.get('pid')}); "
                                f"wait for it to finish or {self.elsewhere}")
            aside.unlink(missing_ok=True)
            log.warning("taking over the stale %s lock of %s (that process is gone)", self.what, who)
        raise UserError(f"{self.out}: could not take {self.path} (other runs keep taking it); run again")

    def release(self) -> None:
        if self._read(self.path) == self.me:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> PrepLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


TRAIN_LOCK_FILE = ".hiervl-train.lock"


def train_lock(out_dir: str | Path) -> PrepLock:
    """The lock of one `hiervl train` on its train.out_dir: a second run into the same folder would write
    metrics twice and delete the other's checkpoint folders; it is refused in one line instead."""
    return PrepLock(out_dir, TRAIN_LOCK_FILE, "hiervl train", "set another train.out_dir")
