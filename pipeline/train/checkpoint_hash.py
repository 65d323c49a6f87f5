"""Checkpoint file hashes computed while the files are written, not by reading them back.

A checkpoint's manifest (meta.json "files": size and sha256 of every file) used to be made by rank 0
re-reading every file just written: 31% of a save's time on the demo (bench/RESULTS.md "Issue #27").
Here the bytes are hashed on their way to the file instead:

    recorder = WriteRecorder(tag_dir)
    with recorder.deepspeed(engine):            # DeepSpeed's torch.save calls go through it
        engine.save_checkpoint(...)
    recorder.save(rank_state, tag_dir / "rank0.pt")
    recorder.files                              # {path relative to tag_dir: {"size", "sha256"}}

Each rank records what it wrote; rank 0 merges the records and hashes by reading only the files
nobody recorded (e.g. DeepSpeed's copied zero_to_fp32.py, or a checkpoint engine we do not wrap).
The digest is of exactly the bytes written, so `checkpoint.verify` reading them later agrees.

Owns: the hashing writer and DeepSpeed's checkpoint-engine wrapper.
Must not touch: the checkpoint layout or its commit (checkpoint.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch


class HashingFile:
    """A write-only file object that hashes (sha256) and counts every byte before writing it."""

    def __init__(self, fh):
        self._fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.size += view.nbytes
        return self._fh.write(view)

    def flush(self) -> None:
        self._fh.flush()


class WriteRecorder:
    """Saves torch objects under `root` with their size and sha256 recorded as they are written."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.files: dict[str, dict] = {}

    def save(self, obj, path: str | Path, zipfile: bool = True) -> None:
        """torch.save(obj, path) with the bytes hashed on the way."""
        path = Path(path)
        with open(path, "wb") as fh:
            hf = HashingFile(fh)
            torch.save(obj, hf, _use_new_zipfile_serialization=zipfile)
            fh.flush()
        if os.path.getsize(path) != hf.size:  # never record a digest of other bytes than the file's
            raise OSError(f"{path}: wrote {hf.size} bytes, the file has {os.path.getsize(path)}")
        self.files[path.resolve().relative_to(self.root.resolve()).as_posix()] = {"size": hf.size,
                                                                                 "sha256": hf.sha.hexdigest()}

    @contextlib.contextmanager
    def deepspeed(self, engine):
        """Route `engine`'s checkpoint writes through `save` while the block runs (DeepSpeed's
        TorchCheckpointEngine only; any other engine writes as it does, and its files are hashed by
        reading them afterwards)."""
        inner = getattr(engine, "checkpoint_engine", None)
        if inner is None or type(inner).__name__ != "TorchCheckpointEngine":
            yield
            return
        engine.checkpoint_engine = _HashingEngine(inner, self)
        try:
            yield
        finally:
            engine.checkpoint_engine = inner


class _HashingEngine:
    """DeepSpeed's TorchCheckpointEngine with `save` hashing as it writes; the rest delegated."""

    def __init__(self, inner, recorder: WriteRecorder):
        self._inner, self._recorder = inner, recorder

    def save(self, state_dict, path: str) -> None:
        self._recorder.save(state_dict, path, zipfile=bool(getattr(self._inner, "zipfile_serialization", True)))

    def __getattr__(self, name):
        return getattr(self._inner, name)
