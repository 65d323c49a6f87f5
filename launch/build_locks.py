"""Stale build locks: a C++ op build that was killed leaves its lock, and the next run waits forever.

torch.utils.cpp_extension (which DeepSpeed's JIT op builds use) guards each extension's build
folder with an empty file `<extensions root>/[pyXY_cuZZ/]<name>/lock`, created with O_EXCL and
held open by the building process; every other process waits, silently and without limit, until
the file disappears. A build killed mid-way (SIGKILL, an OOM kill, a node lost) leaves the file,
so every later run on that machine hangs at start-up before step 1, printing nothing.

The file records no owner, but its owner keeps it open: a lock that no process on this host has
open is stale. `clear_stale_build_locks` removes those (one warning each, naming the file) before
any rank starts (launch/deepspeed_launch.py run_local, run_node). A lock held open by a live
process is left alone (that build is running; its ranks wait for it). A build on another host
sharing the folder cannot be seen from here; a per-machine TORCH_EXTENSIONS_DIR avoids that.

Owns: finding and removing stale extension build locks.
Must not touch: the builds themselves (DeepSpeed and torch own them).
"""

from __future__ import annotations

import os
from pathlib import Path

from hiervl.log import get_logger

log = get_logger(__name__)
LOCK_NAME = "lock"  # torch.utils.cpp_extension: FileBaton(os.path.join(build_directory, 'lock'))


def extensions_root(env: dict | None = None) -> Path:
    """Where torch builds extensions for a process with environment `env`: TORCH_EXTENSIONS_DIR, else
    torch's default root (builds go in its pyXY_<accelerator>/ sub-folder)."""
    env = os.environ if env is None else env
    if env.get("TORCH_EXTENSIONS_DIR"):
        return Path(env["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def build_locks(root: Path) -> list[Path]:
    """Lock files of the extension build folders under `root` (root/<name>/lock, root/pyXY_cuZZ/<name>/lock)."""
    if not root.is_dir():
        return []
    return sorted(p for pattern in (f"*/{LOCK_NAME}", f"*/*/{LOCK_NAME}") for p in root.glob(pattern) if p.is_file())


def open_by(paths: list[Path]) -> dict[Path, int]:
    """{path: pid} for each of `paths` that a process on this host has open (Linux /proc)."""
    want = {}
    for p in paths:
        try:
            want[os.path.realpath(p)] = p
        except OSError:
            continue
    found: dict[Path, int] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:  # gone, or another user's process
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target in want:
                found[want[target]] = int(proc.name)
    return found


def clear_stale_build_locks(env: dict | None = None) -> list[Path]:
    """Remove the build locks under the extensions root that no process on this host holds open;
    returns the removed paths (each also named in one warning)."""
    try:
        locks = build_locks(extensions_root(env))
    except Exception as exc:  # noqa: BLE001 - never stop a launch over this check
        log.debug("cannot look for stale build locks: %s", exc)
        return []
    if not locks:
        return []
    held = open_by(locks)
    removed = []
    for lock in locks:
        if lock in held:
            log.info("extension build in progress (pid %d holds %s): the ranks wait for it", held[lock], lock)
            continue
        try:
            lock.unlink()
        except FileNotFoundError:
            continue  # released between our two looks
        except OSError as exc:
            log.warning("%s is a stale build lock (its build was interrupted) but cannot be removed (%s); "
                        "delete it by hand, or every run waits for it forever", lock, exc)
            continue
        log.warning("removed the stale build lock %s (no process holds it: its build was interrupted); "
                    "the op is rebuilt by the first rank that needs it", lock)
        removed.append(lock)
    return removed
