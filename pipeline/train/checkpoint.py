"""Checkpoints: DeepSpeed engine state plus our client state, committed atomically.

Layout under `<train.out_dir>/checkpoints/`:
  step00000100/                 DeepSpeed's files (model, optimizer, scheduler, engine state)
  step00000100/rank{R}.pt       per-rank state: RNG (Python, NumPy, torch) and the loader state
  step00000100/meta.json        written by rank 0 after EVERY rank finished: the completion mark,
                                with the manifest ("files": size and sha256 of every other file)
  step00000100_universal/       DeepSpeed universal checkpoint, made on a world-size change
  latest                        tag of the newest complete checkpoint (pipeline/atomic_write.py)

A checkpoint directory without `meta.json` is incomplete (a kill during the write) and is never
resumed from; `latest` moves only after the mark is written, so it always names a loadable one.
A complete checkpoint whose files no longer match its manifest (truncated, overwritten, deleted)
is damaged: resume and inference skip it with one warning naming the file and take the newest
intact one before it, so a requeued job never crash-loops on a bad newest checkpoint.
A write that fails (a full disk, no permission) is one `CheckpointWriteError` on every rank
("No space left on device while writing <dir>"): the partial directory is removed, `latest` and
the previous checkpoint are untouched.

The folder names and finding / verifying / reading a checkpoint belong to pipeline/run_dir.py
(eval, the API and export read checkpoints without importing train/); this module writes them.

Owns: save with the `latest` commit, the client-state keys and the queue copy in it, resume
planning, universal conversion, loading for resume.
Must not touch: the training loop, or reading checkpoints for inference (run_dir.py).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hiervl import compat, faults, safe_load
from hiervl import distributed as dist
from hiervl.atomic_write import write_atomic
from hiervl.config import ConfigError
from hiervl.errors import UserError
from hiervl.log import get_logger
from hiervl.run_dir import (
    LATEST,
    META,
    UNIVERSAL_SUFFIX,
    checkpoint_dir,
    complete_tags,
    file_manifest,
    find_latest,
    read_meta,
    resolve_checkpoint,
    tag_for,
)
from hiervl.train.checkpoint_hash import WriteRecorder

log = get_logger(__name__)

# The client state DeepSpeed saves beside the engine (rank 0's copy; the same on every rank)
STEP, EPOCH, SAMPLES_SEEN, MOMENTUM_UPDATES = "step", "epoch", "samples_seen", "momentum_updates"
LOADER, QUEUES, BAD_TOTAL, BEST, CONFIG = "loader", "queue", "bad_total", "best", "config"
WORLD_SIZE = "world_size"
MOMENTUM = "momentum"  # fp32 shadows of bf16 momentum-encoder weights
# this rank's own file, rank{R}.pt: its RNG states and loader state
RNG = "rng"

LOW_SPACE = 64 << 20  # a write error with less than this free on the filesystem is a full disk


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, permission): raised alike on every rank, so
    only rank 0 reports it (`same_on_every_rank`)."""

    same_on_every_rank = True


def queue_state(model) -> dict:
    """Every MomentumQueue's buffers (keys, video ids, pointer), by module name.

    They are also in the module's state_dict; the copy in the client state is what survives a
    universal-checkpoint conversion (the queue is replicated, so rank 0's copy is the whole state).
    """
    from hiervl.model.queue import MomentumQueue

    return {name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
            for name, m in model.named_modules() if isinstance(m, MomentumQueue)}


def load_queue_state(model, state: dict) -> None:
    from hiervl.model.queue import MomentumQueue

    queues = {name: m for name, m in model.named_modules() if isinstance(m, MomentumQueue)}
    state = compat.queue_state_names(state, queues)  # older checkpoints name them `queues.*`
    if set(queues) != set(state):
        raise RuntimeError(f"checkpoint queues {sorted(state)} do not match the model's {sorted(queues)}")
    for name, module in queues.items():
        ref = next(iter(module.state_dict().values()), None)
        device = ref.device if ref is not None else "cpu"
        module.load_state_dict({k: v.to(device) for k, v in state[name].items()})


def rng_state() -> dict:
    """This rank's RNG states. On CUDA only this rank's own device (the current one): saving every
    visible GPU's state on every rank enters each device, and cannot be restored where fewer are visible."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        cuda = compat.own_cuda_rng_state(cuda, torch.cuda.current_device())  # older: every device's, a list
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)  # the current device: this rank's own


def place_optimizer_steps(optimizer) -> int:
    """Put every `state['step']` where torch's optimizer expects it; returns how many were moved.

    DeepSpeed's universal load sets `state[p]['step']` to the tensor it read with map_location='cpu'.
    A fused (or capturable) torch AdamW reads the step through a device pointer with no device check,
    so a CPU step on a CUDA run is an illegal memory access; torch's own load_state_dict moves it to the
    parameter's device as float32 ("special device hosting for step"), which this repeats. Other
    optimizers keep the step as a CPU float32 tensor. `optimizer` may be DeepSpeed's wrapper."""
    inner = getattr(optimizer, "optimizer", optimizer)
    moved = 0
    for group in getattr(inner, "param_groups", []):
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            state = inner.state.get(p)
            if not state or "step" not in state:
                continue
            step = state["step"]
            device = p.device if on_device else torch.device("cpu")
            if not torch.is_tensor(step):
                state["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)
                moved += 1
            elif step.device != device or step.dtype != torch.float32:
                state["step"] = step.to(device=device, dtype=torch.float32)
                moved += 1
    return moved


def _write_json_atomic(path: Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=2) if not isinstance(data, str) else data)


def _write_error(exc: BaseException, path: Path, ckpt_dir: Path) -> str | None:
    """The one line for a failed checkpoint write, or None when `exc` is not a write failure (a bug).

    An OSError says what went wrong itself (ENOSPC, EDQUOT, EACCES...). torch.save's C++ writer
    does not: it raises RuntimeError("unexpected pos ...", from "basic_ios::clear: iostream
    error"), so a torch write error is a full disk when the filesystem has under LOW_SPACE left.
    """
    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    oserr = next((e for e in chain if isinstance(e, OSError) and e.errno is not None), None)
    torch_write = any(isinstance(e, RuntimeError) and any(s in str(e) for s in
                                                          ("inline_container", "PytorchStreamWriter", "iostream error"))
                      for e in chain)
    if oserr is None and not torch_write:
        return None
    try:
        free = shutil.disk_usage(ckpt_dir).free
    except OSError:
        free = None
    latest = ckpt_dir / LATEST
    kept = (f"; {latest} still names {latest.read_text().strip()}, which is intact" if latest.is_file()
            else "; no earlier checkpoint exists")
    full = (oserr is not None and oserr.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        oserr is None and free is not None and free < LOW_SPACE)
    if full:
        left = f" ({free / 2**20:.1f} MiB free there)" if free is not None else ""
        return (f"No space left on device while writing checkpoint {path}{left}: free space on that disk or set "
                f"train.out_dir to one with room{kept}")
    if oserr is not None:
        return f"{oserr.strerror} while writing checkpoint {path} ({oserr.filename or path}): fix that or set train.out_dir{kept}"
    return None  # a torch write error with space left: not ours to explain, keep the traceback


def save(engine, out_dir: str | Path, step: int, client_state: dict, rank_state: dict, meta: dict,
         keep: int, protect: tuple = (), background: bool = False, wait_s: float = 1800.0, remote=None):
    """Save on every rank; returns the tag, or with `background` the AsyncSave writing it. `latest`
    moves only after all ranks finished and rank 0 wrote the manifest (meta.json, sizes and sha256 of
    every file). With `remote` (a checkpoint_remote.RemoteCheckpoints: checkpoint.dir=s3://...) the same
    contract in the object store (written in the foreground).

    Three phases, each ending in a collective in this function, so a write error on one rank
    never leaves the others waiting: rank 0 prepares the directory; every rank writes (a rank
    whose DeepSpeed save raised still joins DeepSpeed's closing barrier); rank 0 hashes and commits.
    A failure in any phase removes the partial directory and raises CheckpointWriteError on every rank.

    With `background` (checkpoint.async_save) the second phase only copies this rank's state to host
    memory; the files are written, fsync'd and committed by a background thread (train/async_save.py)
    whose outcome `finish` collects on every rank. `wait_s`: how long rank 0's thread waits for the
    other ranks' files before it gives the checkpoint up.
    """
    if remote is not None:
        from hiervl.train.checkpoint_remote import save_remote

        return save_remote(engine, remote, out_dir, step, client_state, rank_state, meta, keep, protect)
    from hiervl.train.async_save import AsyncSave, DeferredRecorder, pending_dir

    ckpt_dir = checkpoint_dir(out_dir)
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag

    def fail_on_every_rank(problem: str | None) -> None:
        if problem is None:
            return
        if dist.is_main():
            shutil.rmtree(tag_dir, ignore_errors=True)  # never leave a partial one taking the space
        dist.barrier()
        raise CheckpointWriteError(problem)

    problem = None
    if dist.is_main():
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            # A folder of this step is stale: half-written by a killed run, or damaged and skipped at
            # resume. Its files (another world size's rank and optimizer files) must not outlive it,
            # nor its universal conversion, nor the marks of a killed run's background write.
            if tag_dir.exists():
                shutil.rmtree(tag_dir)
            shutil.rmtree(ckpt_dir / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)
            shutil.rmtree(pending_dir(ckpt_dir, tag), ignore_errors=True)
            tag_dir.mkdir()
        except Exception as exc:  # noqa: BLE001 - classified below; anything else re-raised
            problem = _write_error(exc, tag_dir, ckpt_dir)
            if problem is None:
                raise
    fail_on_every_rank(dist.broadcast_object(problem))

    t0 = time.time()
    problem, deepspeed_done = None, False
    # each file's sha256, computed as it is written (no re-read); deferred: copied now, written later
    written = DeferredRecorder(tag_dir) if background else WriteRecorder(tag_dir)
    rank_file = tag_dir / f"rank{dist.get_rank()}.pt"
    try:
        with written.deepspeed(engine):
            engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        deepspeed_done = True
        if faults.injected("disk-full-during-checkpoint", step) and not background:  # background: in its thread
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(rank_file))
        written.save(rank_state, rank_file)
    except Exception as exc:  # noqa: BLE001
        problem = _write_error(exc, tag_dir, ckpt_dir)
        if problem is None:
            raise
        if not deepspeed_done:
            dist.barrier()  # DeepSpeed's save ends in a barrier the other ranks are waiting in

    def commit(known: dict) -> None:  # rank 0, once every rank's files are written
        files = file_manifest(tag_dir, known=known)
        _write_json_atomic(tag_dir / META, {**meta, "tag": tag, "step": step, "saved_at": time.time(),
                                            "save_seconds": round(time.time() - t0, 3), "files": files,
                                            "async": background})
        _write_json_atomic(ckpt_dir / LATEST, tag)
        prune(ckpt_dir, keep, protect=protect + (tag,))

    if background:
        # every rank has its copy in host memory (or said why not); from here training may change the engine
        fail_on_every_rank(next((p for p in dist.all_gather_object(problem) if p), None))
        return AsyncSave(tag, step, tag_dir, ckpt_dir, dist.get_rank(), dist.get_world_size(), written, commit,
                         classify=lambda exc: _write_error(exc, tag_dir, ckpt_dir), wait_s=wait_s)

    if faults.injected("kill-during-checkpoint", step):
        os._exit(9)  # die after writing files, before the commit
    gathered = dist.all_gather_object((problem, written.files))  # every rank has written its part (or said why not)
    fail_on_every_rank(next((p for p, _ in gathered if p), None))

    problem = None
    if dist.is_main():
        try:
            commit({k: v for _, files in gathered for k, v in files.items()})
        except Exception as exc:  # noqa: BLE001
            problem = _write_error(exc, tag_dir, ckpt_dir)
            if problem is None:
                raise
    fail_on_every_rank(dist.broadcast_object(problem))
    return tag


def finish(job) -> str | None:
    """Wait for a background save (`save(background=True)`) on every rank; returns its tag once
    committed. A collective: every rank calls it at the same point (the next save, the end of the run).
    A write or commit that failed on any rank is one CheckpointWriteError on every rank (a bug's
    exception is re-raised on the rank where it happened)."""
    if job is None:
        return None
    job.join()
    problems = dist.all_gather_object(job.problem)  # rank 0's includes the commit
    if job.error is not None:
        raise job.error
    problem = next((p for p in problems if p), None)
    if problem is not None:
        raise CheckpointWriteError(problem)
    return job.tag


def prune(ckpt_dir: Path, keep: int, protect: tuple = ()) -> None:
    """Keep the newest `keep` complete checkpoints (and protected ones, e.g. the best); drop the rest."""
    for tag in complete_tags(ckpt_dir)[:-keep]:
        if tag in protect:
            continue
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        shutil.rmtree(ckpt_dir / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)


# ------------------------------------------------------------------------------ resume


def plan_resume(resume: str, out_dir: str | Path, world_size: int, zero_stage: int, remote=None) -> dict | None:
    """Decide what to load before the engine is built (the DeepSpeed config depends on it).

    Returns None (fresh start) or {"dir", "tag", "load_tag", "universal", "meta"} (+ "remote": the URL,
    when `remote` is set: the checkpoint was downloaded into this node's cache, see checkpoint_remote.py).
    """
    if resume == "never":
        return None
    remote_url = None
    if resume == "auto" and remote is not None:
        from hiervl.train.checkpoint_remote import cache_dir, plan_remote

        found = plan_remote(remote, out_dir)
        if found is None:
            return None
        ckpt_dir, tag, remote_url = cache_dir(out_dir), found["tag"], found["remote"]
    elif resume == "auto":
        ckpt_dir = checkpoint_dir(out_dir)
        tag = find_latest(ckpt_dir) if ckpt_dir.is_dir() else None
        if tag is None:
            return None
    else:
        ckpt_dir, tag = resolve_checkpoint(resume, setting="train.resume", error=ConfigError,
                                           hint="use auto, never or a path")
    meta = read_meta(ckpt_dir, tag)
    saved_ws, saved_stage = meta["world_size"], meta["zero_stage"]
    same_family = (saved_stage == 3) == (zero_stage == 3)
    if not same_family:
        raise ConfigError(
            f"checkpoint {ckpt_dir / tag} was written with ZeRO stage {saved_stage}; resuming it with stage "
            f"{zero_stage} is not supported by DeepSpeed (universal checkpoints convert within ZeRO 0-2 or within 3). "
            f"Resume with train.zero_stage={saved_stage}" + (" (or 0, 1, 2)" if saved_stage != 3 else ""))
    # Plain DeepSpeed loading works when the partitioning is unchanged: the same world size and stage,
    # or stage 0 (nothing partitioned). Anything else goes through a universal checkpoint.
    universal = (saved_ws != world_size or saved_stage != zero_stage) and not (saved_stage == 0 and zero_stage == 0)
    plan = {"dir": str(ckpt_dir), "tag": tag, "load_tag": f"{tag}{UNIVERSAL_SUFFIX}" if universal else tag,
            "universal": universal, "meta": meta}
    return {**plan, "remote": remote_url} if remote_url else plan


def plan_resume_on_main(resume: str, out_dir: str | Path, world_size: int, zero_stage: int,
                        remote=None) -> dict | None:
    """`plan_resume` on rank 0 only (it hashes the candidates and logs what it skipped, once), its
    plan, or its UserError, sent to every rank."""
    result = None
    if dist.is_main():
        try:
            result = plan_resume(resume, out_dir, world_size, zero_stage, remote=remote)
        except UserError as exc:
            result = exc
    result = dist.broadcast_object(result)
    if isinstance(result, UserError):
        result.same_on_every_rank = True  # rank 0 reports it
        raise result
    return result


def ensure_universal(plan: dict, converter: bool | None = None) -> None:
    """Convert the planned checkpoint to DeepSpeed's universal format, once: by rank 0 (a shared run
    folder), or by every rank given `converter=True` (the first rank of each node, in its own cache)."""
    if not plan or not plan["universal"]:
        return
    src = Path(plan["dir"]) / plan["tag"]
    dst = Path(plan["dir"]) / plan["load_tag"]
    if (dist.is_main() if converter is None else converter) and not (dst / "done").is_file():
        safe_load.check_files(src)  # the converter loads them with weights_only=False in a subprocess
        shutil.rmtree(dst, ignore_errors=True)
        log.info("world size or ZeRO stage changed (%s ranks/stage %s -> now); converting %s to a universal checkpoint",
                 plan["meta"]["world_size"], plan["meta"]["zero_stage"], src)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
               "--output_folder", str(dst), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"universal checkpoint conversion of {src} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
        # our own per-rank files and meta travel along
        for f in src.glob("rank*.pt"):
            shutil.copy2(f, dst / f.name)
        (dst / "done").write_text("ok\n")
    dist.barrier()


def load(engine, plan: dict) -> tuple[dict, dict | None]:
    """Load engine state; returns (client_state, this rank's rank_state or None when ranks changed)."""
    with safe_load.deepspeed_loads_safely():  # DeepSpeed's own torch.load(weights_only=False) reads
        _, client = engine.load_checkpoint(plan["dir"], tag=plan["load_tag"], load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {plan['dir']}/{plan['load_tag']}")
    place_optimizer_steps(engine.optimizer)  # a universal load leaves them on the CPU (fused AdamW: on the device)
    rank_file = Path(plan["dir"]) / plan["tag"] / f"rank{dist.get_rank()}.pt"
    same_world = plan["meta"]["world_size"] == dist.get_world_size()
    rank_state = safe_load.load(rank_file) if same_world and rank_file.is_file() else None
    return client, rank_state
