"""Rank-aware logging: rank 0 prints, every rank can also log to its own file.

`get_logger(__name__)` everywhere; `setup_logging(rank, log_dir, all_ranks)` once per process.
Messages on ranks other than 0 go only to their file (when `log_dir` is given), so a 64-rank
job prints one stream, and every rank's story is still on disk (`rank{R}.log`).

Owns: the `hiervl` logger tree and per-rank files.
Must not touch: what is logged.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hiervl.redact import redact

_FORMAT = "%(asctime)s [%(levelname)s] [rank %(rank)s] %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    """Adds the rank to each record, and hides credentials in URLs (pipeline/redact.py) in its text."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        message = record.getMessage()
        hidden = redact(message)
        if hidden != message:
            record.msg, record.args = hidden, None
        return True


def setup_logging(rank: int = 0, log_dir: str | Path | None = None, all_ranks: bool = False,
                  level: int = logging.INFO) -> logging.Logger:
    """Configure the `hiervl` logger for this process.

    rank 0 (or every rank when `all_ranks`) writes to stderr; with `log_dir`, every rank also
    writes `log_dir/rank{rank}.log`.
    """
    root = logging.getLogger("hiervl")
    root.setLevel(level)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter(_FORMAT, datefmt="%H:%M:%S")
    if rank == 0 or all_ranks:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(fmt)
        stream.addFilter(_RankFilter(rank))
        root.addHandler(stream)
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(log_dir) / f"rank{rank}.log")
        fh.setFormatter(fmt)
        fh.addFilter(_RankFilter(rank))
        root.addHandler(fh)
    return root


def get_logger(name: str) -> logging.Logger:
    """A child of the `hiervl` logger (`hiervl.pipeline.data`, ...)."""
    short = name if name.startswith("hiervl") else f"hiervl.{name}"
    logger = logging.getLogger(short)
    return logger


# Rank 0 defaults until setup_logging is called, so library use prints something sensible.
if not logging.getLogger("hiervl").handlers:
    setup_logging(0)
