"""The training and evaluation loader over a prepared dataset (manifest.parquet + tars).

    loader = VideoTextLoader(cfg, split="train", train=True, rank=r, world_size=w)
    loader.set_epoch(e)
    for batch in loader: ...        # one dict per step, see `VideoTextLoader`
    state = loader.state_dict()     # after a step; resume with loader.load_state_dict(state)

How it works: the epoch's order is a pure function of (seed, epoch) (pipeline/data/sampler.py);
each rank takes its slots of each global batch. Video bytes are read by random access at the
manifest's offsets (`os.pread` on the tar, no sequential scan; on an object store concurrent ranged
GETs with read-ahead and retries: pipeline/data/byte_source.py, pipeline/storage.py), decoded by DALI or PyAV
(pipeline/data/decode.py) in a background thread that keeps `data.prefetch` batches ready.
With `data.decode_workers` > 0, PyAV runs in that many worker processes (decode_pool.py) that
already decode the next `data.prefetch` batches' samples while this one is assembled; with DALI
too (`data.decoder=auto`), DALI and the workers split each batch by what each delivers
(schedule.py). Either way a sample's slot, and so the order and positions, are the sampler's.
On a GPU the CPU-decoded clips of a batch reach the GPU in one pinned, asynchronous copy.

Position: the number of global samples consumed in the epoch. After this rank has yielded k
batches of an epoch started at position p0, `position = min(p0 + k * B * W, N)`; every batch
carries it (`batch["position"]`, the same on every rank) and `state_dict()` returns it (the
position of the last batch *yielded*, not of batches merely prefetched). A loader restored
from that state, with any world size, yields `order[position:]` and nothing else. When an
epoch is exhausted, iterating yields nothing more: call `set_epoch(e + 1)`.

Failures: a sample whose bytes cannot be read or decoded keeps its slot, flagged
`valid=False` with a zero video (its key stays in `keys`), is logged with key and reason and
counted in `loader.stats`. Padding slots (`data.remainder=pad`) are `valid=False` with key ""
and video_id -1. So every rank yields the same number of batches of the same shape.

Owns: `DatasetIndex` and the resumable `VideoTextLoader` (positions, prefetch, failures).
Must not touch: the manifest's schema (manifest.py) or the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import signal
import threading
import time
import weakref
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from hiervl import compat, faults
from hiervl.data.byte_source import SampleByteSource
from hiervl.data.cpu_meter import LoaderCpuMeter, process_tree_seconds, thread_ids
from hiervl.data.crash_ledger import is_crash
from hiervl.data.decode import DaliVideoDecoder, choose_backend, dali_available, decode_pyav
from hiervl.data.decode_pool import DecodePool, resolve_decode_workers
from hiervl.data.manifest import MANIFEST_FILE, OPTIONAL_COLUMNS, READ_COLUMNS, read_dataset_info, read_manifest
from hiervl.data.preprocess import Preprocessing
from hiervl.data.sampler import (
    PAD,
    choose_caption,
    epoch_order,
    group_codes,
    num_batches,
    rank_plan,
    sample_rng,
    stable_hash,
)
from hiervl.data.schedule import DecoderSplit
from hiervl.distributed import resolve_device
from hiervl.errors import UserError
from hiervl.log import get_logger
from hiervl.storage import is_remote, join, open_store

log = get_logger(__name__)
_LOGGED_PATHS: set[str] = set()  # decode paths already announced in this process
STATE_VERSION = 1


def is_plain_name(name) -> bool:
    """A file name inside one folder: no separator, not '.', '..' or empty, no NUL (a manifest's shard
    column is joined to the dataset folder and to the shard cache: it must not leave them)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


class DatasetIndex:
    """The manifest rows of one split, sorted by (shard, index_in_shard): the sample index space.

    `groups[i]`: sample i's `group` (str; related samples share it, e.g. synthetic siblings or the
    clips of one source video) or None; all None for a dataset prepared before the column.
    `group_ids` [N] int64: the same as codes, -1 = none (what `data.order=grouped` uses).
    """

    def __init__(self, root: str | Path, split: str, storage=None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        # root may be a local folder or a URL (s3://, gs://, http(s)://);
        # every read goes through the store, the sample bytes through `self.source` (byte_source.py)
        self.root = root if is_remote(root) else Path(root)
        self.store = open_store(root, storage)
        manifest = join(str(root), MANIFEST_FILE)
        if not self.store.exists(MANIFEST_FILE):
            raise UserError(f"{manifest} does not exist; set data.path to a directory made by "
                            "`hiervl prep --out DIR` (it holds manifest.parquet and the tars)")
        read_dataset_info(root, self.store)  # refuses a dataset of another schema version, naming the fix
        manifest_bytes = pa.BufferReader(self.store.read(MANIFEST_FILE))
        # `group` (hard-negative group, dataprep/sources.py) is optional: manifests prepared before it have none
        table = read_manifest(manifest_bytes, READ_COLUMNS, manifest, optional=OPTIONAL_COLUMNS).to_pandas()
        table = table[table["split"] == split].sort_values(["shard", "index_in_shard"], kind="stable")
        if len(table) == 0:
            manifest_bytes.seek(0)
            splits = sorted(set(pq.read_table(manifest_bytes, columns=["split"]).column(0).to_pylist()))
            raise UserError(f"{manifest} has no samples of split '{split}' (it has: {', '.join(splits) or 'none'}); "
                            "set data.split / eval.split to one of those")
        self.split = split
        self.keys = table["key"].tolist()
        self.video_id_strings = table["video_id"].tolist()
        self.video_ids = np.array([stable_hash(v) for v in self.video_id_strings], dtype=np.int64)
        self.shards = table["shard"].tolist()
        for shard in sorted(set(self.shards)):  # names from a file someone else wrote: joined to paths below
            if not is_plain_name(shard):
                raise UserError(f"{manifest}: shard {shard!r} is not a plain file name in the dataset folder (a path, "
                                "'..' or empty); refusing a manifest that points outside its dataset: prepare it again")
        self.shard_ids = np.unique(np.array(self.shards), return_inverse=True)[1]
        self.offsets = table["video_offset"].to_numpy(np.int64)
        self.sizes = table["video_size"].to_numpy(np.int64)
        self.captions = [list(c) if c is not None else [] for c in table["captions"]]
        self.num_frames = table["num_frames"].fillna(1).to_numpy(np.int64)
        self.codecs = [str(c).lower() for c in table["codec"]]
        # per sample: its group name, or None (no group; a dataset prepared without the column: all None)
        self.groups: list[str | None] = ([g if isinstance(g, str) and g else None for g in table["group"]]
                                         if "group" in table.columns else [None] * len(self.keys))
        self.group_ids = group_codes(self.groups)  # int64 [N], -1 = no group (sampler.grouped_order)
        # int64 [N] process- and dataset-independent group ids for the batch (queue.mask_same_group), -1 = none
        self.group_hashes = np.array([-1 if g is None else stable_hash(g) for g in self.groups], dtype=np.int64)
        self.group_fingerprint = stable_hash("\n".join(g or "" for g in self.groups))
        self.fingerprint = stable_hash("\n".join(self.keys))
        self.source = SampleByteSource(self.store, self.shards, self.offsets, self.sizes, storage)

    def __len__(self) -> int:
        return len(self.keys)

    def read_video(self, i: int) -> bytes:
        """The encoded video bytes of sample i (random access at the manifest offset: a pread or a ranged GET)."""
        return self.source.read(i)

    def read_videos(self, ids: list[int]) -> dict[int, bytes | OSError]:
        """One batch's bytes, {i: bytes or OSError}; remote reads run concurrently, read ahead (byte_source.py)."""
        return self.source.read_many(ids)

    def close(self) -> None:
        self.source.close()


class VideoTextLoader:
    """Batches of (video, caption) for one rank of `world_size`; see the module docstring.

    Each batch (B = data.batch_size, T = data.num_frames, L = data.max_words):
      video [B, T, 3, size, size] in `dtype` (the trainer's compute dtype; float32 by default), normalised,
        on the GPU when data.device is gpu
      input_ids, attention_mask [B, L] int64 (one caption per sample; the first one in eval mode)
      keys list[str], video_ids [B] int64, group_ids [B] int64 (the manifest's `group` hashed, -1 = none
        or padding), valid [B] bool, epoch int, position int
    Eval mode (`train=False`, see `iter_eval`) adds every caption of each video:
      captions list[list[str]], caption_input_ids / caption_attention_mask [Nc, L] int64,
      caption_index [Nc] int64 (the batch slot each caption belongs to).
    """

    def __init__(self, cfg, split: str | None = None, train: bool = True, rank: int = 0, world_size: int = 1,
                 batch_size: int | None = None, dtype: torch.dtype = torch.float32, ledger=None, *, tokenizer):
        """`ledger`: the run's CrashLedger (pipeline/data/crash_ledger.py; training only): ledgered samples
        are not decoded, and a sample that kills or outlasts (data.decode_timeout_s) a decode worker is
        recorded in it instead of stopping the loader."""

        self.cfg = cfg.data
        self.train = train
        self.rank, self.world_size = rank, world_size
        self.batch_size = batch_size or self.cfg.batch_size
        self.split = split or self.cfg.split
        self.index = DatasetIndex(self.cfg.path, self.split, getattr(cfg, "storage", None))
        self.tokenizer = tokenizer  # the model's (model/text_model.load_tokenizer), passed in: data/ has no model
        self.prep = Preprocessing.from_config(self.cfg)  # frame plan, clip transform, tokenising
        self.seed = self.cfg.seed
        self.order_mode = self.cfg.order if train else "sequential"
        self.block_window, self.group_chunk = self.cfg.block_window, self.cfg.group_chunk  # order parameters
        if self.order_mode == "grouped":
            if (self.index.group_ids < 0).all():
                log.warning("data.order=grouped but split '%s' of %s has no `group`s: every sample is its own group "
                            "(add a group column to the prep input manifest)", self.split, self.cfg.path)
            elif (self.batch_size * world_size) % self.group_chunk:
                log.warning("data.order=grouped: the global batch %d x %d is not a multiple of data.group_chunk=%d, "
                            "so more groups straddle two batches; choose a group_chunk that divides it",
                            self.batch_size, world_size, self.group_chunk)
        self.remainder = self.cfg.remainder if train else "pad"  # eval sees every video
        # batches per optimizer step when train.global_batch holds the step's size: the epoch is cut into
        # whole steps (sampler.num_batches), so every split of the same global batch sees the same steps
        train_cfg = getattr(cfg, "train", None)
        self.accum = train_cfg.grad_accum if train and train_cfg is not None and train_cfg.global_batch else 1
        self.device = "gpu" if resolve_device(self.cfg.device, setting="data.device").type == "cuda" else "cpu"
        self.device_id = torch.cuda.current_device() if self.device == "gpu" else None
        self.dtype = dtype  # of the video tensor: the trainer's compute dtype (it owns precision)
        self.ledger = ledger
        self.has_dali = dali_available()
        self.epoch = 0
        self.position = 0
        self._dali: DaliVideoDecoder | None = None
        self.cpu = LoaderCpuMeter()  # this loader's own CPU seconds: threads, DALI's threads, decode workers
        self.stats = {"decoded": 0, "skipped": 0, "padded": 0, "skipped_keys": [], "skipped_reasons": {},
                      "decode_path": Counter(), "pool_decoded": 0}
        # PyAV in worker processes (decode_pool.py), started at the first batch; closed by close(),
        # when the loader is collected, or at interpreter exit
        self._pool: DecodePool | None = None
        self.decode_workers = resolve_decode_workers(self.cfg.decode_workers, self.device, world_size)
        if self.decode_workers > 0:
            # ring slots: the samples of the batches in flight (data.prefetch ahead + the one being assembled)
            storage = getattr(cfg, "storage", None)  # storage hook: each worker opens its own store
            self._pool = DecodePool(self.decode_workers, self.index.root, self.prep,
                                    slots=(self.cfg.prefetch + 1) * self.batch_size,
                                    storage=dataclasses.asdict(storage) if dataclasses.is_dataclass(storage) else storage,
                                    crash_ledger=ledger is not None, timeout_s=self.cfg.decode_timeout_s)
            weakref.finalize(self, self._pool.close)
        # DALI and the pool at once (decoder=auto with workers): the adaptive split of schedule.py
        # DALI and the workers split each batch: decoder=auto on a GPU (DALI mixed + PyAV processes), or
        # decoder=dali with workers; on a CPU machine decoder=auto gives every sample to the workers (choose_backend)
        self.hybrid = self._pool is not None and self.has_dali and (
            (self.cfg.decoder == "auto" and self.device == "gpu") or self.cfg.decoder == "dali")
        self._split = DecoderSplit()
        if len(self) == 0:
            raise UserError(f"split '{self.split}' has {len(self.index)} samples, fewer than one global batch "
                            f"({self.batch_size} x {world_size} ranks); lower data.batch_size or set data.remainder=pad")

    # ------------------------------------------------------------------ order and position

    def __len__(self) -> int:
        """Batches per full epoch for this rank (identical on all ranks)."""
        return num_batches(len(self.index), self.batch_size, self.world_size, self.remainder, self.accum)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from position 0 (call before iterating each new epoch)."""
        self.epoch, self.position = int(epoch), 0

    def order(self, epoch: int | None = None) -> np.ndarray:
        """The epoch's sample order (indices into `self.index`), int64 [N]."""
        epoch = self.epoch if epoch is None else epoch
        if self.order_mode == "sequential":
            return np.arange(len(self.index), dtype=np.int64)
        return epoch_order(len(self.index), self.seed, epoch, self.order_mode, self.index.shard_ids, self.block_window,
                           self.index.group_ids, self.group_chunk)

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "seed": self.seed, "epoch": self.epoch, "position": self.position,
                "world_size": self.world_size, "batch_size": self.batch_size, "order": self.order_mode,
                "block_window": self.block_window, "group_chunk": self.group_chunk, "split": self.split,
                "num_samples": len(self.index), "fingerprint": self.index.fingerprint,
                "group_fingerprint": self.index.group_fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (written at any world size / batch size)."""
        if state.get("version") != STATE_VERSION:
            raise UserError(f"loader state version {state.get('version')!r} is not supported (expected {STATE_VERSION}); "
                            "resume with the hiervl version that wrote the checkpoint")
        if state["num_samples"] != len(self.index) or state.get("fingerprint") != self.index.fingerprint:
            raise UserError(f"the checkpoint's loader state is for another dataset ({state['num_samples']} samples in "
                            f"split '{state.get('split')}'; data.path has {len(self.index)} in '{self.split}'); "
                            "point data.path at the dataset the run was started with")
        if state["order"] == "grouped" and state.get("group_fingerprint") != self.index.group_fingerprint:
            raise UserError("the checkpoint's loader state is for other `group`s than data.path's manifest has, and "
                            "data.order=grouped depends on them; point data.path at the dataset the run was started with")
        state = compat.loader_state(state, self.block_window, self.group_chunk)  # older states lack the order parameters
        used = {"block": "block_window", "grouped": "group_chunk"}.get(state["order"])  # the mode's parameter
        for name, mine in (("seed", self.seed), ("order", self.order_mode), ("block_window", self.block_window),
                           ("group_chunk", self.group_chunk)):
            if state[name] != mine and name in ("seed", "order", used):
                log.warning("loader state has %s=%r, config has %r: keeping the state's so the epoch stays exactly-once",
                            name, state[name], mine)
        self.seed, self.order_mode = state["seed"], state["order"]
        self.block_window, self.group_chunk = int(state["block_window"]), int(state["group_chunk"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if state["world_size"] != self.world_size:
            log.info("resuming epoch %d at position %d, written by %d ranks, now %d", self.epoch, self.position,
                     state["world_size"], self.world_size)

    # ------------------------------------------------------------------ iteration

    def __iter__(self):
        plan = rank_plan(self.order(), self.position, self.batch_size, self.rank, self.world_size, self.remainder,
                         self.accum)
        epoch = self.epoch
        jobs = list(zip(plan.batches, plan.positions))
        self.index.source.schedule([sorted({int(i) for i in idx if i != PAD}) for idx in plan.batches])  # read-ahead
        if self.cfg.prefetch == 0:
            batches = self._batches(jobs, epoch, None)
            try:
                for batch in batches:
                    self.position = batch["position"]
                    yield batch
            finally:
                batches.close()
            return
        q: queue.Queue = queue.Queue(maxsize=self.cfg.prefetch)
        stop = threading.Event()
        end = object()

        def put(item) -> None:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def produce() -> None:
            batches = self._batches(jobs, epoch, stop)
            try:
                for batch in batches:
                    if stop.is_set():
                        return
                    put(batch)
                put(end)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                put(exc)
            finally:
                batches.close()

        worker = threading.Thread(target=produce, name=f"loader-rank{self.rank}", daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.position = item["position"]
                yield item
        finally:
            stop.set()
            worker.join(timeout=60)

    def _batches(self, jobs: list, epoch: int, stop: threading.Event | None):
        """This rank's batches for `jobs` [(indices, position)], in order.

        With the process pool, the samples of the next `data.prefetch` batches are already
        queued to the workers while this one is finished (DALI's share, assembly), so the
        workers never wait for a batch boundary. Stopping early drops what was queued.
        """
        ahead = self.cfg.prefetch + 1 if self._pool is not None else 1
        pending: deque = deque()
        todo = iter(jobs)
        try:
            while True:
                while len(pending) < ahead:
                    job = next(todo, None)
                    if job is None:
                        break
                    with self.cpu.timed():
                        pending.append(self._start_batch(job[0], job[1], epoch))
                if not pending:
                    return
                with self.cpu.timed():
                    batch = self._finish_batch(pending.popleft(), stop)
                if batch is None:  # stopped while waiting for the pool
                    return
                yield batch
        finally:
            if self._pool is not None:
                self._pool.cancel_pending()

    # ------------------------------------------------------------------ one batch

    def _sample_plan(self, i: int, epoch: int) -> tuple[np.ndarray, tuple[float, float], bool]:
        """Frame indices, crop position and flip of sample i: a pure function of (seed, epoch, key)."""
        rng = sample_rng(self.seed, epoch, self.index.keys[i]) if self.train else None
        return self.prep.plan(self.index.num_frames[i], rng, flip=self.cfg.flip)

    def _log_path(self, backend: str, codec: str) -> None:
        where = " in worker processes" if backend == "pyav" and self._pool is not None else ""
        tag = f"{backend}:{codec}{where}"
        if tag not in _LOGGED_PATHS:
            _LOGGED_PATHS.add(tag)
            how = {"dali": f"DALI fn.decoders.video ({'mixed, GPU' if self.device == 'gpu' else 'cpu backend'})",
                   "pyav": "PyAV" + ("" if self.has_dali else " (nvidia-dali not installed)")}[backend]
            extra = (f" and PyAV in {self.decode_workers} worker processes (adaptive split)"
                     if backend == "dali" and self.hybrid else "")
            log.info("decoding %s videos with %s%s%s", codec, how, where, extra)

    def _start_batch(self, idx: np.ndarray, position: int, epoch: int) -> dict:
        """Plan one batch and queue its pool share to the worker processes (returns at once)."""
        real = sorted({int(i) for i in idx if i != PAD})
        ledgered = {}  # samples that hung or crashed a decoder before: never decoded again
        if self.ledger is not None:
            ledgered = {i: r for i in real if (r := self.ledger.reason(self.index.keys[i])) is not None}
            real = [i for i in real if i not in ledgered]
        plans = {i: self._sample_plan(i, epoch) for i in real}
        backend = {i: choose_backend(self.cfg.decoder, self.index.codecs[i], self.device, self.has_dali,
                                     self.decode_workers) for i in real}
        for i in real:
            self._log_path(backend[i], self.index.codecs[i])
        tids: dict[int, int] = {}
        if self._pool is not None:
            to_pool = [i for i in real if backend[i] == "pyav"]
            dali = [i for i in real if backend[i] == "dali"]
            if self.hybrid and dali:
                k = self._split.pool_share(len(dali), self._pool.clips_per_s())
                for i in dali[len(dali) - k:]:
                    backend[i] = "pyav"
                to_pool += dali[len(dali) - k:]
            ix = self.index
            for i in to_pool:
                tids[i] = self._pool.submit(ix.keys[i], ix.shards[i], ix.offsets[i], ix.sizes[i], *plans[i])
            if tids and not self.cpu.pids:
                self.cpu.watch_processes(self._pool.pids)  # the workers start at the first submit
        return {"idx": idx, "position": position, "epoch": epoch, "real": real, "plans": plans, "backend": backend,
                "tids": tids, "ledgered": ledgered}

    def _decode_dali(self, slots: list[int], blobs: dict, plans: dict, epoch: int, position: int) -> list:
        """DALI's results for `slots` (a clip or an Exception each). With the crash ledger each call is
        journaled while it runs, and a suspect (in a call that never returned) gets a call of its own."""
        if self.ledger is None:
            return self._dali.decode([blobs[i] for i in slots], [plans[i][0] for i in slots])
        keys = self.index.keys
        alone = [i for i in slots if self.ledger.is_suspect(keys[i])]
        calls = [[i] for i in alone] + ([rest] if (rest := [i for i in slots if i not in alone]) else [])
        results = {}
        for call in calls:
            with self._journal(call, f"DALI {self.device}", epoch, position):
                results.update(zip(call, self._dali.decode([blobs[i] for i in call], [plans[i][0] for i in call])))
        return [results[i] for i in slots]

    def _decode_local(self, slots: list[int], plans: dict, backend: dict, epoch: int = 0,
                      position: int = -1) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
        """Decode and transform `slots` in this process (DALI, PyAV in threads); slot -> [T, 3, S, S], slot -> reason."""
        out: dict[int, torch.Tensor] = {}
        errors: dict[int, str] = {}
        blobs: dict[int, bytes] = {}
        for i, data in self.index.read_videos(slots).items():  # storage hook: byte_source.py
            if isinstance(data, OSError):
                errors[i] = f"read failed: {data}"
            else:
                blobs[i] = data
        frames: dict[int, object] = {}
        dali_slots = [i for i in blobs if backend[i] == "dali"]
        if dali_slots:
            first = self._dali is None
            if first:
                self._dali = DaliVideoDecoder(self.batch_size, self.cfg.num_threads, self.device, self.device_id)
                before = thread_ids()
            decoded = self._decode_dali(dali_slots, blobs, plans, epoch, position)
            if first:
                self.cpu.watch_threads(thread_ids() - before)  # DALI's native worker threads
            for i, res in zip(dali_slots, decoded):
                if isinstance(res, Exception):
                    errors[i] = f"DALI decode failed: {res}"
                else:
                    frames[i] = res
        dtype = self.dtype

        def work(i: int):
            with self.cpu.timed():
                return _work(i)

        def _work(i: int):
            try:
                clip = frames[i] if i in frames else decode_pyav(blobs[i], plans[i][0])
                if isinstance(clip, torch.Tensor) and clip.is_cuda:  # DALI mixed: the float transform on the GPU
                    return i, self.prep.clip(clip, plans[i][1], plans[i][2], dtype), None
                # CPU frames: resized once in uint8 here, normalised straight into the batch slot
                return i, self.prep.resize_crop(clip, plans[i][1], plans[i][2]), None
            except Exception as exc:  # noqa: BLE001 - a corrupt video must not stop the run
                return i, None, f"{'PyAV' if i not in frames else 'transform'} failed: {type(exc).__name__}: {exc}"

        todo = [i for i in blobs if i not in errors]
        # PyAV in this process (no worker processes): journaled like DALI's calls, suspects decoded alone
        pyav = [i for i in todo if i not in frames]
        alone = [i for i in pyav if self.ledger is not None and self.ledger.is_suspect(self.index.keys[i])]
        calls = [([i], [i]) for i in alone] + ([([i for i in todo if i not in alone], [i for i in pyav if i not in alone])]
                                               if len(todo) > len(alone) else [])
        for call, journaled in calls:
            with self._journal(journaled, "PyAV in the trainer's process", epoch, position), \
                    ThreadPoolExecutor(max_workers=self.cfg.num_threads) as pool:
                for i, clip, err in pool.map(work, call):
                    if err is None:
                        out[i] = clip
                        self.stats["decode_path"][backend[i]] += 1
                    else:
                        errors[i] = err
        return out, errors

    def _journal(self, slots: list[int], decoder: str, epoch: int, position: int):
        """The crash ledger's journal of an in-process decode call of `slots` (nothing without a ledger);
        the `inprocess-decode-crash` fault (tests) kills this process in a call holding HIERVL_FAULT_MATCH."""
        if self.ledger is None or not slots:
            return contextlib.nullcontext()
        keys = [self.index.keys[i] for i in slots]
        match = os.environ.get("HIERVL_FAULT_MATCH")
        if faults.injected("inprocess-decode-crash") and match and any(match in k for k in keys):
            self.ledger.inflight_write(list(zip(keys, (self.index.shards[i] for i in slots))), decoder, epoch, position)
            os.kill(os.getpid(), signal.SIGSEGV)  # the decoder dies of this sample, in this process
        return self.ledger.inflight(list(zip(keys, (self.index.shards[i] for i in slots))), decoder, epoch, position)

    def _finish_batch(self, work: dict, stop: threading.Event | None) -> dict | None:
        """Decode this batch's local share, collect the pool's, assemble; None if `stop` came first."""
        cfg, idx, epoch, tids = self.cfg, work["idx"], work["epoch"], work["tids"]
        b, t = len(idx), cfg.num_frames
        local = [i for i in work["real"] if i not in tids]
        t0 = time.perf_counter()
        clips, errors = self._decode_local(local, work["plans"], work["backend"], epoch, work["position"])
        for i, reason in work.get("ledgered", {}).items():
            errors[i] = f"in the crash ledger, not decoded ({reason})"
        if self.hybrid and local:
            self._split.record_dali(len(local), time.perf_counter() - t0)  # local = DALI's share in hybrid mode
        if tids:
            results = self._pool.wait(list(tids.values()), stop)
            if results is None:
                return None
            for i, tid in tids.items():
                clip, reason = results[tid]
                if clip is None:
                    errors[i] = reason
                    if self.ledger is not None and is_crash(reason or ""):  # durable before the batch is used
                        self.ledger.record(self.index.keys[i], self.index.shards[i], reason, epoch, work["position"])
                else:
                    clips[i] = clip
                    self.stats["decode_path"]["pyav"] += 1
                    self.stats["pool_decoded"] += 1
        dev = f"cuda:{self.device_id}" if self.device == "gpu" else "cpu"
        # [B, T, 3, S, S]; every slot is written below (a clip, or zeros for padding and failures): no
        # zero-fill of the whole batch first, which costs the main process CPU the decoders could use
        video = torch.empty(b, t, 3, cfg.size, cfg.size, dtype=self.dtype, device=dev)
        host_slots, host_clips = [], []  # CPU clips bound for the GPU: one pinned, asynchronous copy per batch
        valid = torch.zeros(b, dtype=torch.bool)
        keys, vids, gids, texts, all_caps = [], [], [], [], []
        for slot, i in enumerate(int(x) for x in idx):
            if i == PAD:
                video[slot].zero_()
                keys.append("")
                vids.append(-1)
                gids.append(-1)
                texts.append("")
                all_caps.append([])
                self.stats["padded"] += 1
                continue
            key = self.index.keys[i]
            keys.append(key)
            vids.append(int(self.index.video_ids[i]))
            gids.append(int(self.index.group_hashes[i]))
            caps = self.index.captions[i]
            all_caps.append(list(caps))
            texts.append(choose_caption(caps, self.seed, epoch, key) if self.train else (caps[0] if caps else ""))
            if i in clips:
                clip = clips[i]  # [T, 3, S, S]: uint8 from the CPU decoders, normalised on the GPU (DALI mixed)
                if dev != "cpu" and not clip.is_cuda:
                    host_slots.append(slot)
                    host_clips.append(clip)
                elif clip.dtype == torch.uint8:
                    self.prep.normalize(clip, self.dtype, out=video[slot])  # the one copy
                else:
                    video[slot] = clip
                valid[slot] = True
                self.stats["decoded"] += 1
            else:
                video[slot].zero_()
                self._record_skip(key, errors.get(i, "unknown"))
        if host_slots:
            staged = torch.empty((len(host_clips), *host_clips[0].shape), dtype=torch.uint8, pin_memory=True)
            torch.stack(host_clips, out=staged)  # [n, T, 3, S, S] uint8 in page-locked memory (a quarter of float32)
            where = torch.tensor(host_slots, dtype=torch.int64).pin_memory().to(dev, non_blocking=True)
            video.index_copy_(0, where, self.prep.normalize(staged.to(dev, non_blocking=True), self.dtype))
        if tids:
            self._pool.release(tids.values())  # every pool clip has been copied out of its ring slot
        tok = self.prep.tokenize(self.tokenizer, texts)  # [B, L] each
        batch = {"video": video, "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
                 "keys": keys, "video_ids": torch.tensor(vids, dtype=torch.int64),
                 "group_ids": torch.tensor(gids, dtype=torch.int64), "valid": valid,
                 "epoch": epoch, "position": work["position"]}
        if not self.train:
            flat = [c for caps in all_caps for c in caps]
            index = [slot for slot, caps in enumerate(all_caps) for _ in caps]
            ctok = self.prep.tokenize(self.tokenizer, flat)  # [Nc, L] each
            batch.update(captions=all_caps, caption_input_ids=ctok["input_ids"],
                         caption_attention_mask=ctok["attention_mask"],
                         caption_index=torch.tensor(index, dtype=torch.int64))
        if self.device == "gpu":
            for name in ("input_ids", "attention_mask", "video_ids", "group_ids", "valid"):
                batch[name] = batch[name].pin_memory().to(dev, non_blocking=True)
        return batch

    def cpu_seconds(self) -> tuple[float, float]:
        """(this loader's CPU seconds so far, CPU seconds of this process and its decode workers so far):
        their deltas over a window give the loader's CPU share (the trainer logs `loader_cpu_share`)."""
        return self.cpu.seconds(), process_tree_seconds(self.cpu.pids)

    def _record_skip(self, key: str, reason: str) -> None:
        self.stats["skipped"] += 1
        if len(self.stats["skipped_keys"]) < 1000:
            self.stats["skipped_keys"].append(key)
            self.stats["skipped_reasons"][key] = reason
        log.warning("skipping sample %s (rank %d): %s", key, self.rank, reason)

    def close(self) -> None:
        """Close the shard files and stop the decode workers."""
        if self._pool is not None:
            self._pool.close()
        self.index.close()


def iter_eval(cfg, split: str | None = None, rank: int = 0, world_size: int = 1, batch_size: int | None = None, *,
              tokenizer):
    """Every sample of `split` (default cfg.eval.split) exactly once across ranks, in manifest order.

    Centre frames and centre crop, no flip, all captions per video (see VideoTextLoader). The
    last global batch is padded (valid=False), so every rank yields the same number of batches.
    """
    loader = VideoTextLoader(cfg, split=split or cfg.eval.split, train=False, rank=rank, world_size=world_size,
                             batch_size=batch_size or cfg.eval.batch_size, tokenizer=tokenizer)
    try:
        yield from loader
    finally:
        loader.close()
