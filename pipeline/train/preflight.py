"""Checks of a training run that need the filesystem, made before DeepSpeed starts any rank.

`hiervl train` calls `check_training_run` in the parent process, so more ranks than visible GPUs, a
wrong `train.resume`, a `train.out_dir` that is a file or not writable, a `data.path` that is not a prepared dataset (or
has too few samples of `data.split` for one global batch), a missing `eval.split` and a DeepSpeed
JSON that disagrees with the config are one line and exit 2 within seconds, not a traceback per
rank half a minute later. (Checks within the config alone run at load: `Config.__post_init__`.)
`hiervl submit` does not call it: a cluster's paths need not exist where the job is submitted.

Owns: the parent's checks of a training run.
Must not touch: what the ranks do (pipeline/train/trainer.py), the checkpoint format (checkpoint.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from hiervl.config import Config, ConfigError
from hiervl.run_dir import CONFIG, META, resolve_checkpoint
from hiervl.storage import is_remote
from hiervl.train.deepspeed_config import build_deepspeed_config


def check_resume(resume: str) -> None:
    """train.resume is auto, never, a checkpoint folder (stepNNNNNNNN with meta.json) or a run
    folder / checkpoints folder holding a complete one."""
    if resume in ("auto", "never"):
        return
    path = Path(resume)
    hint = "use auto (the newest checkpoint in train.out_dir), never, or the path of a run or checkpoint folder"
    if not path.is_dir():
        guess = " (did you mean auto?)" if resume.lower() in ("latest", "last", "newest", "true", "yes") else ""
        raise ConfigError(f"train.resume={resume}: no such checkpoint directory{guess}; {hint}")
    resolve_checkpoint(path, check=False, setting="train.resume", error=ConfigError, hint=hint)  # no hashing here


# model.* keys that shape the weights (and queue.* the buffers): a checkpoint written with other values
# cannot be loaded into this run's model; paths and loss knobs may differ
ARCHITECTURE_KEYS = ("model.preset", "model.embed_dim", "model.temporal_layers", "model.feature_layer",
                     "model.num_clips", "model.num_phrases", "model.max_frames", "model.learnable_temperature",
                     "model.vision.patch_size", "model.vision.width", "model.vision.layers", "model.vision.heads",
                     "model.vision.frame_diff", "model.vision.frame_token", "model.vision.layout_dim",
                     "model.vision.space_time", "model.vision.space_time_layers", "model.text.num_layers",
                     "queue.objective", "queue.enabled", "queue.size")


_ABSENT = object()


def _dotted(tree: dict, key: str):
    for part in key.split("."):
        tree = tree.get(part, _ABSENT) if isinstance(tree, dict) else _ABSENT
    return tree


def resume_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint folder `train.resume` will load (newest complete one; files not hashed here), or None."""
    resume = cfg.train.resume
    if resume == "never":
        return None
    try:
        ckpt_dir, tag = resolve_checkpoint(Path(cfg.train.out_dir) if resume == "auto" else resume, check=False)
    except Exception:  # noqa: BLE001 - none yet (a fresh run), or a damaged folder the ranks' plan reports in full
        return None
    return ckpt_dir / tag


def resumed_config(tag_dir: Path | None) -> dict | None:
    """The config a checkpoint folder was written with (its meta.json's), or None (no folder, unreadable)."""
    import json

    if tag_dir is None:
        return None
    try:
        return json.loads((tag_dir / META).read_text()).get("config") or {}
    except (OSError, ValueError, AttributeError):
        return None


def check_resume_checkpoint(cfg: Config) -> None:
    """The checkpoint a run would resume holds only tensors (no pickled code: pipeline/safe_load.py)
    and was written for this run's model (same preset and shapes): else one line, before any rank
    starts and before config.yaml is written."""
    from hiervl import safe_load
    from hiervl.config import to_dict

    tag_dir = resume_checkpoint(cfg)
    saved = resumed_config(tag_dir)
    if saved is None:
        return  # nothing to resume, or an unreadable meta.json the ranks' plan skips
    mine = to_dict(cfg)
    differ = [f"{k}={_dotted(saved, k)!r} there, {_dotted(mine, k)!r} here" for k in ARCHITECTURE_KEYS
              if _dotted(saved, k) is not _ABSENT and _dotted(saved, k) != _dotted(mine, k)]
    if differ:
        raise ConfigError(f"train.resume={cfg.train.resume}: checkpoint {tag_dir} was written for another model "
                          f"({'; '.join(differ[:4])}); resume it with its own config ({tag_dir.parent.parent / CONFIG}), "
                          "or set train.out_dir to a new folder / train.resume=never to start over")
    safe_load.check_files(tag_dir, skip_unreadable=True)  # damaged: the ranks' plan falls back to an intact one


def _split_counts(root: Path) -> dict[str, int]:
    from hiervl.data.manifest import MANIFEST_FILE, read_manifest

    counts: dict[str, int] = {}
    for split in read_manifest(root / MANIFEST_FILE, ["split"]).column(0).to_pylist():
        counts[split] = counts.get(split, 0) + 1
    return counts


def check_dataset(cfg: Config, world_size: int) -> None:
    """data.path is a prepared dataset with at least one global batch of data.split (and eval.split
    when training evaluates); an object-store URL is left to the loader."""
    from hiervl.data.manifest import MANIFEST_FILE, read_dataset_info
    from hiervl.data.sampler import num_batches

    d = cfg.data
    if is_remote(d.path):
        return
    root = Path(d.path)
    make = "make one with `hiervl prep --input MANIFEST --out DIR` and set data.path=DIR"
    if not root.is_dir():
        what = "is a file, not a dataset folder" if root.exists() else "does not exist"
        raise ConfigError(f"data.path={d.path} {what}; {make}")
    if not (root / MANIFEST_FILE).is_file():
        raise ConfigError(f"data.path={d.path} is not a prepared dataset (no {MANIFEST_FILE}, dataset.json); {make}")
    read_dataset_info(root)  # a dataset of another schema version is refused, naming the fix
    counts = _split_counts(root)
    have = ", ".join(f"{s} ({n})" for s, n in sorted(counts.items())) or "none"
    n = counts.get(d.split, 0)
    if n == 0:
        raise ConfigError(f"data.path={d.path} has no samples of data.split={d.split} (it has: {have})")
    if num_batches(n, d.batch_size, world_size, d.remainder, cfg.train.grad_accum if cfg.train.global_batch else 1) == 0:
        raise ConfigError(f"data.split={d.split} of {d.path} has {n} samples, fewer than one global batch "
                          f"(data.batch_size={d.batch_size} x {world_size} ranks); lower data.batch_size "
                          "or set data.remainder=pad")
    if cfg.eval.every_steps and counts.get(cfg.eval.split, 0) == 0:
        raise ConfigError(f"eval.every_steps={cfg.eval.every_steps} evaluates eval.split={cfg.eval.split}, which "
                          f"{d.path} does not have (it has: {have}); set eval.split or eval.every_steps=0")


def check_out_dir(out_dir: str) -> None:
    """train.out_dir is a folder, or can be made as one, that this user may write."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"train.out_dir={out_dir} is a file; give a folder for the run (it is created if missing)")
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"train.out_dir={out_dir}: {existing} is a file, so the folder cannot be made; give another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"train.out_dir={out_dir}: {existing} is not writable by this user; give a folder you can write")


def check_gpus(ranks: int) -> None:
    """On a GPU machine, train.ranks local ranks need as many visible GPUs (one each): else DeepSpeed's
    launcher fails inside the ranks (base.yaml's 8 on a 1-GPU box)."""
    import torch

    if torch.cuda.is_available() and ranks > torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"train.ranks={ranks} but this machine has {n} visible GPU{'s' if n != 1 else ''} "
                          f"(one rank per GPU); set train.ranks={n} or make more GPUs visible (CUDA_VISIBLE_DEVICES)")


def check_training_run(cfg: Config, world_size: int, held_from: str | None = None) -> None:
    """Everything a training run of `world_size` ranks can be refused for before a rank starts.
    `held_from`: the checkpoint whose train.global_batch a resume keeps (named in the refusal)."""
    from hiervl.train.global_batch import for_world

    cfg = for_world(cfg, world_size, held_from)  # train.global_batch that the ranks cannot split is refused here
    check_gpus(cfg.train.ranks)
    check_out_dir(cfg.train.out_dir)
    check_resume(cfg.train.resume)
    check_resume_checkpoint(cfg)
    check_dataset(cfg, world_size)
    build_deepspeed_config(cfg, world_size)  # a user DeepSpeed JSON that disagrees with the config
