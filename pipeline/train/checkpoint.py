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

Owns: checkpoint layout, save with the `latest` commit, resume planning, universal conversion,
loading for inference.
Must not touch: the training loop.
"""

from __future__ import annotations

import errno
import hashlib
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
from hiervl import distributed as dist
from hiervl import faults, safe_load
from hiervl.atomic_write import write_atomic
from hiervl.config import ConfigError, from_dict
from hiervl.errors import UserError
from hiervl.log import get_logger
from hiervl.model.hierarchical import build_model
from hiervl.train.checkpoint_hash import WriteRecorder

log = get_logger(__name__)
META = "meta.json"


HASH_CHUNK = 8 << 20  # bytes read at a time when hashing a checkpoint file
LOW_SPACE = 64 << 20  # a write error with less than this free on the filesystem is a full disk


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, permission): raised alike on every rank, so
    only rank 0 reports it (`same_on_every_rank`)."""

    same_on_every_rank = True


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def read_meta(ckpt_dir: Path, tag: str) -> dict | None:
    path = ckpt_dir / tag / META
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_manifest(tag_dir: Path, known: dict | None = None) -> dict:
    """{path relative to tag_dir: {"size", "sha256"}} for every file of a checkpoint but meta.json.

    `known`: entries hashed while they were written (checkpoint_hash.py); only the other files are
    read to hash them (and a known entry whose file now has another size is re-read)."""
    known = known or {}
    out = {}
    for p in sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != META):
        name, size = p.relative_to(tag_dir).as_posix(), p.stat().st_size
        entry = known.get(name)
        out[name] = entry if entry is not None and entry["size"] == size else {"size": size, "sha256": _sha256(p)}
    return out


def verify(ckpt_dir: Path, tag: str, meta: dict | None = None) -> str | None:
    """None when every file in the checkpoint's manifest has its recorded size and sha256, else
    what is wrong with the first file that does not (a checkpoint written before manifests passes)."""
    meta = read_meta(ckpt_dir, tag) if meta is None else meta
    if meta is None:
        return f"{ckpt_dir / tag / META} is missing or unreadable"
    files = meta.get("files")
    if not isinstance(files, dict):
        return None  # written before checkpoints carried a manifest: nothing to check against
    tag_dir = ckpt_dir / tag
    for name, want in sorted(files.items()):  # sizes first: a truncated file is found without reading
        if not (isinstance(want, dict) and isinstance(want.get("size"), int) and isinstance(want.get("sha256"), str)):
            return f"{tag_dir / META} has a malformed manifest entry for {name!r}"
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path} has {size} bytes, its manifest says {want['size']}" + (" (truncated)" if size < want["size"] else "")
    for name, want in sorted(files.items()):
        if _sha256(tag_dir / name) != want["sha256"]:
            return f"{tag_dir / name} does not match its sha256 in {META} (corrupted)"
    return None


def _complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a readable meta.json, oldest first."""
    return sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir() and not p.name.endswith("_universal")
                  and read_meta(ckpt_dir, p.name) is not None)


def find_latest(ckpt_dir: str | Path, check: bool = True) -> str | None:
    """Tag of the newest complete, intact checkpoint: `latest` if it is one, else the newest before it.

    With `check`, each candidate's files are verified against its manifest; a damaged one is skipped
    with one warning naming the bad file. When checkpoints exist but every one is damaged, a
    UserError says so (starting over silently would throw the run away).
    """
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    named = latest.read_text().strip() if latest.is_file() else None
    complete = _complete_tags(ckpt_dir)
    if named is not None and named not in complete:
        log.warning("checkpoint %s named by %s is incomplete; looking for an older complete one", named, latest)
    candidates = ([named] if named in complete else []) + [t for t in reversed(complete) if t != named]
    damaged = []
    for tag in candidates:
        problem = verify(ckpt_dir, tag) if check else None
        if problem is None:
            for bad_tag, bad in damaged:
                log.warning("checkpoint %s is damaged: %s; resuming from %s instead", ckpt_dir / bad_tag, bad, tag)
            return tag
        damaged.append((tag, problem))
    if damaged:
        raise UserError(f"every checkpoint under {ckpt_dir} is damaged (newest, {damaged[0][0]}: {damaged[0][1]}); "
                        "move the folder away to start over, or point train.resume at an intact checkpoint")
    return None


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
        if isinstance(cuda, (list, tuple)):  # written before: every visible device's state; take our own
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
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
    latest = ckpt_dir / "latest"
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
         keep: int, protect: tuple = ()) -> str:
    """Save on every rank; returns the tag. `latest` moves only after all ranks finished and rank 0
    wrote the manifest (meta.json, sizes and sha256 of every file).

    Three phases, each ending in a collective in this function, so a write error on one rank
    never leaves the others waiting: rank 0 prepares the directory; every rank writes (a rank
    whose DeepSpeed save raised still joins DeepSpeed's closing barrier); rank 0 hashes and commits.
    A failure in any phase removes the partial directory and raises CheckpointWriteError on every rank.
    """
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
            # nor its universal conversion.
            if tag_dir.exists():
                shutil.rmtree(tag_dir)
            shutil.rmtree(ckpt_dir / f"{tag}_universal", ignore_errors=True)
            tag_dir.mkdir()
        except Exception as exc:  # noqa: BLE001 - classified below; anything else re-raised
            problem = _write_error(exc, tag_dir, ckpt_dir)
            if problem is None:
                raise
    fail_on_every_rank(dist.broadcast_object(problem))

    t0 = time.time()
    problem, deepspeed_done = None, False
    written = WriteRecorder(tag_dir)  # each file's sha256, computed as it is written (no re-read)
    try:
        with written.deepspeed(engine):
            engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        deepspeed_done = True
        rank_file = tag_dir / f"rank{dist.get_rank()}.pt"
        if faults.injected("disk-full-during-checkpoint", step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(rank_file))
        written.save(rank_state, rank_file)
    except Exception as exc:  # noqa: BLE001
        problem = _write_error(exc, tag_dir, ckpt_dir)
        if problem is None:
            raise
        if not deepspeed_done:
            dist.barrier()  # DeepSpeed's save ends in a barrier the other ranks are waiting in
    if faults.injected("kill-during-checkpoint", step):
        os._exit(9)  # die after writing files, before the commit
    gathered = dist.all_gather_object((problem, written.files))  # every rank has written its part (or said why not)
    fail_on_every_rank(next((p for p, _ in gathered if p), None))

    problem = None
    if dist.is_main():
        try:
            files = file_manifest(tag_dir, known={k: v for _, files in gathered for k, v in files.items()})
            _write_json_atomic(tag_dir / META, {**meta, "tag": tag, "step": step, "saved_at": time.time(),
                                                "save_seconds": round(time.time() - t0, 3), "files": files})
            _write_json_atomic(ckpt_dir / "latest", tag)
        except Exception as exc:  # noqa: BLE001
            problem = _write_error(exc, tag_dir, ckpt_dir)
            if problem is None:
                raise
        else:
            prune(ckpt_dir, keep, protect=protect + (tag,))
    fail_on_every_rank(dist.broadcast_object(problem))
    return tag


def prune(ckpt_dir: Path, keep: int, protect: tuple = ()) -> None:
    """Keep the newest `keep` complete checkpoints (and protected ones, e.g. the best); drop the rest."""
    for tag in _complete_tags(ckpt_dir)[:-keep]:
        if tag in protect:
            continue
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        shutil.rmtree(ckpt_dir / f"{tag}_universal", ignore_errors=True)


# ------------------------------------------------------------------------------ resume


def plan_resume(resume: str, out_dir: str | Path, world_size: int, zero_stage: int) -> dict | None:
    """Decide what to load before the engine is built (the DeepSpeed config depends on it).

    Returns None (fresh start) or {"dir", "tag", "load_tag", "universal", "meta"}.
    """
    if resume == "never":
        return None
    if resume == "auto":
        ckpt_dir = checkpoint_dir(out_dir)
        tag = find_latest(ckpt_dir) if ckpt_dir.is_dir() else None
        if tag is None:
            return None
    else:
        path = Path(resume)
        if (path / META).is_file():
            ckpt_dir, tag = path.parent, path.name
            problem = verify(ckpt_dir, tag)
            if problem is not None:
                raise UserError(f"train.resume={resume}: that checkpoint is damaged ({problem}); point train.resume "
                                "at another one, or at its run folder to take the newest intact one")
        elif path.is_dir():
            ckpt_dir, tag = (path / "checkpoints" if (path / "checkpoints").is_dir() else path), None
            tag = find_latest(ckpt_dir)
        else:
            raise ConfigError(f"train.resume={resume}: no such checkpoint directory; use auto, never or a path")
        if tag is None:
            raise ConfigError(f"train.resume={resume}: no complete checkpoint found there")
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
    return {"dir": str(ckpt_dir), "tag": tag, "load_tag": f"{tag}_universal" if universal else tag,
            "universal": universal, "meta": meta}


def plan_resume_on_main(resume: str, out_dir: str | Path, world_size: int, zero_stage: int) -> dict | None:
    """`plan_resume` on rank 0 only (it hashes the candidates and logs what it skipped, once), its
    plan, or its UserError, sent to every rank."""
    result = None
    if dist.is_main():
        try:
            result = plan_resume(resume, out_dir, world_size, zero_stage)
        except UserError as exc:
            result = exc
    result = dist.broadcast_object(result)
    if isinstance(result, UserError):
        result.same_on_every_rank = True  # rank 0 reports it
        raise result
    return result


def ensure_universal(plan: dict) -> None:
    """Convert the planned checkpoint to DeepSpeed's universal format (rank 0), once."""
    if not plan or not plan["universal"]:
        return
    src = Path(plan["dir"]) / plan["tag"]
    dst = Path(plan["dir"]) / plan["load_tag"]
    if dist.is_main() and not (dst / "done").is_file():
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


# ------------------------------------------------------------------------- inference


def load_model_for_inference(path: str | Path, map_location: str = "cpu"):
    """(model, cfg) from a run directory, its checkpoints/ folder or one checkpoint tag directory.

    Reads the resolved config stored in the checkpoint and the full module weights (ZeRO 0-2 keep
    them in `mp_rank_00_model_states.pt`; ZeRO 3 is consolidated with DeepSpeed's zero_to_fp32).
    """

    path = Path(path)
    if (path / META).is_file():
        tag_dir = path
        problem = verify(path.parent, path.name)
        if problem is not None:
            raise UserError(f"checkpoint {path} is damaged ({problem}); point --checkpoint at its run folder "
                            "to take the newest intact checkpoint")
    else:
        ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        tag = find_latest(ckpt_dir) if ckpt_dir.is_dir() else None
        if tag is None:
            raise UserError(f"no complete checkpoint under {path}; point --checkpoint at a training out_dir "
                            "(train.out_dir) or one of its checkpoints/stepNNNNNNNN folders")
        tag_dir = ckpt_dir / tag
    meta = json.loads((tag_dir / META).read_text())
    cfg = from_dict(meta["config"])
    cfg.model.text.pretrained = False  # weights come from the checkpoint; skip loading them twice
    model = build_model(cfg)
    states = tag_dir / "mp_rank_00_model_states.pt"
    if meta["zero_stage"] == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with safe_load.deepspeed_loads_safely():
            sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        buffers = safe_load.load(states, map_location=map_location).get("module") or {}
        sd = {**{k: v for k, v in buffers.items() if k not in sd}, **sd}
    else:
        sd = safe_load.load(states, map_location=map_location)["module"]
    sd = {k: v.float() if torch.is_floating_point(v) else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if "queue" not in m]:
        raise UserError(f"checkpoint {tag_dir} does not match the model it describes "
                        f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.eval()
    return model, cfg
