"""The sample byte source: a sample's encoded video bytes, from a local folder or an object store.

    source = SampleByteSource(store, shards, offsets, sizes, cfg.storage)
    source.schedule(batches)       # the epoch's upcoming batches (lists of sample indices), in order
    source.read_many(ids)          # {i: bytes or OSError} for one batch; starts the reads ahead

Local data: one `os.pread` per sample at the manifest offset, inline (no threads, as before).
Remote data (s3://, gs://, http(s)://): ranged reads at the same offsets on a thread pool of
`storage.read_threads`, `storage.readahead` batches ahead of the batch being decoded, each read
retried with backoff by pipeline/storage.py. Read-ahead only changes *when* bytes arrive: which
sample lands in which slot is still the loader's plan (order, position, W-invariance untouched).
With `storage.cache_dir`, a shard is downloaded whole on its first use (to a temporary name, then
renamed) and read locally after that: later epochs cost no requests, and the cached tars are the
local files DALI's own readers (fn.readers.webdataset) need.

Owns: reading sample bytes (concurrency, read-ahead, the shard cache).
Must not touch: the order of samples, decoding, the manifest.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from hiervl.atomic_write import atomic_output
from hiervl.storage import Store

CHUNK = 8 * 1024 * 1024  # cache downloads in ranged reads of this size (each retried on its own)
MAX_SAMPLE_BYTES = 2 << 30  # one sample's video: prep writes short clips; more is a damaged manifest row


class SampleByteSource:
    """Sample i's bytes are `store[shards[i]][offsets[i] : offsets[i] + sizes[i]]`."""

    def __init__(self, store: Store, shards: list[str], offsets: np.ndarray, sizes: np.ndarray, storage=None):
        self.store, self.shards, self.offsets, self.sizes = store, shards, offsets, sizes
        get = (lambda k, d: getattr(storage, k, d)) if storage is not None and not isinstance(storage, dict) \
            else (lambda k, d: (storage or {}).get(k, d))
        self.readahead = int(get("readahead", 2))
        self.threads = int(get("read_threads", 8))
        cache = get("cache_dir", None)
        self.cache = (Path(cache) / hashlib.sha256(store.url.encode()).hexdigest()[:16]
                      if cache and store.remote else None)
        self._pool: ThreadPoolExecutor | None = None  # remote stores only, made on first use (again after close)
        self._futures: dict[int, Future] = {}
        self._ahead: deque[list[int]] = deque()
        self._submitted = self._consumed = 0
        self._lock = threading.Lock()
        self._shard_locks: dict[str, threading.Lock] = {}
        self._cached: dict[str, Path] = {}
        self.stats = {"bytes": 0, "reads": 0, "cache_downloads": 0}

    # ------------------------------------------------------------------ one sample

    def read(self, i: int) -> bytes:
        """Sample i's bytes (blocking); OSError when they cannot be read whole."""
        return self.read_at(self.shards[i], int(self.offsets[i]), int(self.sizes[i]))

    def read_at(self, shard: str, offset: int, size: int) -> bytes:
        """`size` bytes of `shard` at `offset` (the shard cache, else one pread / ranged read); OSError
        when they cannot be read whole. Also what a decode worker process reads through
        (pipeline/data/decode_pool.py: each worker opens its own store and source)."""
        if offset < 0 or size <= 0 or size > MAX_SAMPLE_BYTES:  # a damaged manifest row: never allocate it
            raise OSError(f"manifest row asks for {size} bytes of {shard} at offset {offset}, not a sample's range "
                          f"(0 < size <= {MAX_SAMPLE_BYTES >> 20} MiB, offset >= 0): a damaged manifest; prepare the "
                          "dataset again")
        local = self._cached_shard(shard) if self.cache is not None else None
        if local is not None:
            with open(local, "rb") as f:
                data = os.pread(f.fileno(), size, offset)
        else:
            data = self.store.read_range(shard, offset, size)
        if len(data) != size:
            raise OSError(f"short read from {shard} ({len(data)} of {size} bytes): truncated shard")
        self.stats["bytes"] += size
        self.stats["reads"] += 1
        return data

    def _cached_shard(self, shard: str) -> Path:
        """The shard's local copy in the cache, downloaded whole on first use."""
        path = self._cached.get(shard)
        if path is not None:
            return path
        with self._lock:
            lock = self._shard_locks.setdefault(shard, threading.Lock())
        with lock:
            path = self.cache / shard
            want = self.store.size(shard)
            if want is None:
                raise FileNotFoundError(f"{self.store.url}/{shard}: missing")
            if not (path.is_file() and path.stat().st_size == want):
                with atomic_output(path) as tmp:
                    with open(tmp, "wb") as f:
                        for lo in range(0, want, CHUNK):
                            f.write(self.store.read_range(shard, lo, min(CHUNK, want - lo)))
                self.stats["cache_downloads"] += 1
            self._cached[shard] = path
        return path

    # ------------------------------------------------------------------ batches, read ahead

    def _ensure_pool(self) -> bool:
        """True (and a pool) when reads go through threads: remote stores."""
        if self.store.remote and self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="sample-read")
        return self._pool is not None

    def schedule(self, batches: list[list[int]]) -> None:
        """The upcoming batches of this iteration, in order (replaces any earlier schedule)."""
        if not self._ensure_pool():
            return
        with self._lock:
            for f in self._futures.values():
                f.cancel()
            self._futures.clear()
            self._ahead = deque([list(b) for b in batches])
            self._submitted = self._consumed = 0
            self._top_up()

    def _top_up(self) -> None:
        """Keep `readahead` scheduled batches submitted beyond the ones consumed (lock held)."""
        while self._ahead and self._submitted - self._consumed < self.readahead:
            for i in self._ahead.popleft():
                if i not in self._futures:
                    self._futures[i] = self._pool.submit(self.read, i)
            self._submitted += 1

    def read_many(self, ids: list[int]) -> dict[int, bytes | OSError]:
        """One batch's samples: {i: bytes} or {i: OSError} for those that could not be read."""
        if not self._ensure_pool():
            out: dict[int, bytes | OSError] = {}
            for i in ids:
                try:
                    out[i] = self.read(i)
                except OSError as exc:
                    out[i] = exc
            return out
        with self._lock:
            mine = {}
            for i in ids:
                f = self._futures.pop(i, None)
                mine[i] = f if f is not None and not f.cancelled() else self._pool.submit(self.read, i)
            self._consumed += 1
            self._top_up()
        out = {}
        for i, f in mine.items():
            try:
                out[i] = f.result()
            except OSError as exc:
                out[i] = exc
        return out

    def close(self) -> None:
        if self._pool is not None:
            with self._lock:
                for f in self._futures.values():
                    f.cancel()
                self._futures.clear()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        close = getattr(self.store, "close", None)
        if close is not None:
            close()
