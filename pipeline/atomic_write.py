"""Atomic, durable file writes: the one way this project writes a file that readers must see whole.

Owns: `temp_path` (a hidden, unique name beside the target, so globs like `*.tar` skip it and a
cleaner can find leftovers by their `.tmp` ending), `write_atomic` (write, flush, fsync, rename into
place) and `atomic_output` (the same for a file another library writes: parquet, a video encoder).
After a crash the target is either the old file or the new one, never a part of one.
Must not touch: what is written; formats belong to their owners (manifest, checkpoint, shards).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_path(final: str | Path, suffix: str = ".tmp") -> Path:
    """A unique hidden name beside `final`: `.{name}.{pid}.{random}{suffix}`."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")


def fsync_path(path: Path) -> None:
    """Flush one file's bytes to disk (open read-only, fsync, close)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(final: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path to write `final` through; on success fsync it and rename it into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final, suffix)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(final: str | Path, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `final` atomically and durably."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_output(final) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
