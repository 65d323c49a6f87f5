"""Checkpoints: DeepSpeed engine state plus our client state, committed atomically.

Layout under `<train.out_dir>/checkpoints/`:
  step00000100/                 DeepSpeed's files (model, optimizer, scheduler, engine state)
  step00000100/rank{R}.pt       per-rank state: RNG (Python, NumPy, torch) and the loader state
  step00000100/meta.json        written by rank 0 after EVERY rank finished: the completion mark
  step00000100_universal/       DeepSpeed universal checkpoint, made on a world-size change
  latest                        tag of the newest complete checkpoint (pipeline/atomic_write.py)

A checkpoint directory without `meta.json` is incomplete (a kill during the write) and is never
resumed from; `latest` moves only after the mark is written, so it always names a loadable one.

Owns: checkpoint layout, save with the `latest` commit, resume planning, universal conversion,
loading for inference.
Must not touch: the training loop.
"""

from __future__ import annotations

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

from pipeline import distributed as dist
from pipeline import faults
from pipeline.atomic_write import write_atomic
from pipeline.config import ConfigError, from_dict
from pipeline.errors import UserError
from pipeline.log import get_logger
from pipeline.model.hierarchical import build_model

log = get_logger(__name__)
META = "meta.json"


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


def find_latest(ckpt_dir: str | Path) -> str | None:
    """Tag of the newest complete checkpoint: `latest` if it is complete, else the newest marked one."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if read_meta(ckpt_dir, tag) is not None:
            return tag
        log.warning("checkpoint %s named by %s is incomplete; looking for an older complete one", tag, latest)
    complete = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir() and not p.name.endswith("_universal")
                      and read_meta(ckpt_dir, p.name) is not None)
    return complete[-1] if complete else None


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_json_atomic(path: Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=2) if not isinstance(data, str) else data)


def save(engine, out_dir: str | Path, step: int, client_state: dict, rank_state: dict, meta: dict,
         keep: int, protect: tuple = ()) -> str:
    """Save on every rank; returns the tag. `latest` moves only after all ranks finished."""
    ckpt_dir = checkpoint_dir(out_dir)
    tag = tag_for(step)
    if dist.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        stale = ckpt_dir / tag
        if stale.exists() and read_meta(ckpt_dir, tag) is None:
            shutil.rmtree(stale)  # a half-written one from a killed run at the same step
    dist.barrier()
    t0 = time.time()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rank_state, ckpt_dir / tag / f"rank{dist.get_rank()}.pt")
    if faults.injected("kill-during-checkpoint", step):
        os._exit(9)  # die after writing files, before the commit
    dist.barrier()  # every rank has written its part
    if dist.is_main():
        _write_json_atomic(ckpt_dir / tag / META, {**meta, "tag": tag, "step": step, "saved_at": time.time(),
                                                     "save_seconds": round(time.time() - t0, 3)})
        _write_json_atomic(ckpt_dir / "latest", tag)
        prune(ckpt_dir, keep, protect=protect + (tag,))
    dist.barrier()
    return tag


def prune(ckpt_dir: Path, keep: int, protect: tuple = ()) -> None:
    """Keep the newest `keep` complete checkpoints (and protected ones, e.g. the best); drop the rest."""
    complete = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir() and not p.name.endswith("_universal")
                      and read_meta(ckpt_dir, p.name) is not None)
    for tag in complete[:-keep]:
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


def ensure_universal(plan: dict) -> None:
    """Convert the planned checkpoint to DeepSpeed's universal format (rank 0), once."""
    if not plan or not plan["universal"]:
        return
    src = Path(plan["dir"]) / plan["tag"]
    dst = Path(plan["dir"]) / plan["load_tag"]
    if dist.is_main() and not (dst / "done").is_file():
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
    _, client = engine.load_checkpoint(plan["dir"], tag=plan["load_tag"], load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {plan['dir']}/{plan['load_tag']}")
    rank_file = Path(plan["dir"]) / plan["tag"] / f"rank{dist.get_rank()}.pt"
    same_world = plan["meta"]["world_size"] == dist.get_world_size()
    rank_state = torch.load(rank_file, weights_only=False) if same_world and rank_file.is_file() else None
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

        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        buffers = torch.load(states, map_location=map_location, weights_only=False).get("module") or {}
        sd = {**{k: v for k, v in buffers.items() if k not in sd}, **sd}
    else:
        sd = torch.load(states, map_location=map_location, weights_only=False)["module"]
    sd = {k: v.float() if torch.is_floating_point(v) else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if "queue" not in m]:
        raise UserError(f"checkpoint {tag_dir} does not match the model it describes "
                        f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.eval()
    return model, cfg
