"""The run folder: its file names, finding a checkpoint in it, and reading a model out of one.

A training run (`train.out_dir`) holds

    config.yaml              the resolved config, absolute paths (written once, by `hiervl train` /
                             `hiervl submit`, before any rank starts: the ranks read it; rank 0 writes
                             it only where that is missing or a resume held the checkpoint's
                             train.global_batch that `submit` could not see: train/global_batch.py)
    deepspeed_config.json    the DeepSpeed config the ranks ran with
    metrics.jsonl            one record per log step (train/monitor.py); tensorboard/, logs/, samples/
    eval.jsonl, best.json    periodic evaluation: one line per evaluation, the best step (R@sum)
    status.json              how the run ended: finished / preempted / failed, step, checkpoint
    eval-<split>/            `hiervl eval`'s default output (eval.json, eval.md, a search index)
    checkpoints/stepNNNNNNNN/          DeepSpeed's files, rank{R}.pt, and meta.json (the completion
                                       mark with the sha256 manifest, train/checkpoint.py writes it)
    checkpoints/stepNNNNNNNN_universal/
    checkpoints/latest       the tag of the newest complete checkpoint
    .hiervl-train.lock       held by the `hiervl train` / `hiervl submit local|deepspeed` running here
    .hiervl-slurm-job        the SLURM job `hiervl submit slurm` last submitted into this folder

"Which checkpoint does this path name" has one answer, `resolve_checkpoint`: a checkpoint folder
(it holds meta.json) is that checkpoint, checked against its manifest; a run folder or its
checkpoints/ folder is the newest complete, intact checkpoint there (`find_latest`: `latest` if
it verifies, else the newest before it, with one warning naming the damaged file). Every reader
(resume, inference, fingerprint, export, preflight) asks it. "Which model does this path name"
has one answer too, `load_model_for_inference`: an export directory (`hiervl export`, it holds
hiervl-export.json) is that model, anything else is `resolve_checkpoint`'s checkpoint; `eval`,
`search`, `search index`, `hiervl.load` and `export` read their model through it, and say what
they accept with the same words (`MODEL_PATHS`). An export has no optimizer state: training cannot
resume from one (refused in one line).

Paths a run records (data.path, train.out_dir, index.json "data") are stored absolute
(`absolute_paths`) so they work from any directory; `find_recorded` reads a relative path that an
older run recorded, from the folder that recorded it.

Owns: run-folder file names, checkpoint lookup and integrity checks, loading a checkpoint for
inference, recorded paths.
Must not touch: writing checkpoints (train/checkpoint.py) or the training loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from hiervl.errors import UserError
from hiervl.export_files import EXPORT_FILE, is_export
from hiervl.log import get_logger
from hiervl.storage import as_local_path, is_remote

log = get_logger(__name__)

# ---------------------------------------------------------------------------- file names
CONFIG = "config.yaml"
DS_CONFIG = "deepspeed_config.json"
METRICS = "metrics.jsonl"
EVAL_LOG = "eval.jsonl"
BEST = "best.json"
STATUS = "status.json"
LOGS, SAMPLES, TENSORBOARD = "logs", "samples", "tensorboard"
CHECKPOINTS = "checkpoints"
LATEST = "latest"  # in checkpoints/: the tag of the newest complete checkpoint
META = "meta.json"  # in a checkpoint folder: the completion mark and its manifest
UNIVERSAL_SUFFIX = "_universal"
SLURM_JOB = ".hiervl-slurm-job"  # the id of the SLURM job training into this folder (launch/slurm.py)
HASH_CHUNK = 8 << 20  # bytes read at a time when hashing a checkpoint file

# what a model path may be, in every help text and error (eval, search, search index, export, hiervl.load)
CHECKPOINT_PATHS = ("a training run folder (train.out_dir), its checkpoints/ folder or one checkpoints/stepNNNNNNNN folder "
                    "(or the s3:// / gs:// checkpoint.dir of a run, or one stepNNNNNNNN under it)")
MODEL_PATHS = f"{CHECKPOINT_PATHS}, or an export directory (hiervl export RUN --out DIR)"


def eval_dir(run: str | Path, split: str) -> Path:
    """Where `hiervl eval --checkpoint RUN` writes by default: inside a run folder, but beside an export
    (`<export>-eval-<split>`): an export is an artifact to hand on, and eval never writes into it."""
    run = Path(run)
    if is_export(run):
        export = run.resolve()
        return export.with_name(f"{export.name}-eval-{split}")
    return run / f"eval-{split}"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


# ---------------------------------------------------------------------------- integrity


def read_meta(ckpt_dir: Path, tag: str) -> dict | None:
    path = Path(ckpt_dir) / tag / META
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

    `known`: entries hashed while they were written (train/checkpoint_hash.py); only the other files are
    read to hash them (and a known entry whose file now has another size is re-read)."""
    known = known or {}
    out = {}
    for p in sorted(p for p in Path(tag_dir).rglob("*") if p.is_file() and p.name != META):
        name, size = p.relative_to(tag_dir).as_posix(), p.stat().st_size
        entry = known.get(name)
        out[name] = entry if entry is not None and entry["size"] == size else {"size": size, "sha256": _sha256(p)}
    return out


def verify(ckpt_dir: Path, tag: str, meta: dict | None = None) -> str | None:
    """None when every file in the checkpoint's manifest has its recorded size and sha256, else
    what is wrong with the first file that does not (a checkpoint written before manifests passes)."""
    ckpt_dir = Path(ckpt_dir)
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


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a readable meta.json, oldest first."""
    return sorted(p.name for p in Path(ckpt_dir).glob("step*") if p.is_dir() and not p.name.endswith(UNIVERSAL_SUFFIX)
                  and read_meta(ckpt_dir, p.name) is not None)


def find_latest(ckpt_dir: str | Path, check: bool = True) -> str | None:
    """Tag of the newest complete, intact checkpoint: `latest` if it is one, else the newest before it.

    With `check`, each candidate's files are verified against its manifest; a damaged one is skipped
    with one warning naming the bad file. When checkpoints exist but every one is damaged, a
    UserError says so (starting over silently would throw the run away).
    """
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / LATEST
    named = latest.read_text().strip() if latest.is_file() else None
    complete = complete_tags(ckpt_dir)
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


# ---------------------------------------------------------------------------- which checkpoint


def resolve_checkpoint(path: str | Path, check: bool = True, setting: str = "--checkpoint",
                       error: type[UserError] = UserError, hint: str | None = None) -> tuple[Path, str]:
    """(checkpoints folder, tag) of the checkpoint `path` names: a checkpoint folder (it holds
    meta.json) is that one, verified; a run folder or its checkpoints/ folder is the newest complete,
    intact one there. `check=False` reads meta.json only (no hashing: a quick parent-side check).

    Raises `error` naming `setting` when there is none: no such folder, no complete checkpoint,
    or a named checkpoint that is damaged.
    """
    path = Path(path)
    hint = hint or f"point {setting} at {CHECKPOINT_PATHS}"
    if is_export(path):
        raise error(f"{setting}={path} is an export (inference weights, no optimizer or training state); "
                    f"point {setting} at {CHECKPOINT_PATHS}")
    if (path / META).is_file():
        problem = verify(path.parent, path.name) if check else None
        if problem is not None:
            raise error(f"{setting}={path}: that checkpoint is damaged ({problem}); point {setting} at another one, "
                        "or at its run folder to take the newest intact one")
        return path.parent, path.name
    if not path.is_dir():
        raise error(f"{setting}={path}: no such checkpoint directory; {hint}")
    ckpt_dir = checkpoint_dir(path) if checkpoint_dir(path).is_dir() else path
    tag = find_latest(ckpt_dir, check=check)
    if tag is None:
        raise error(f"{setting}={path}: no complete checkpoint there (no stepNNNNNNNN/{META}); {hint}")
    return ckpt_dir, tag


def checkpoint_step(path) -> int | None:
    """The step of the checkpoint `path` names (as `resolve_checkpoint`; an export's: the step it was
    exported from), for display; None if unknown."""
    try:
        if is_export(path):
            step = json.loads((Path(path) / EXPORT_FILE).read_text())["source"].get("step")
            return int(step) if step is not None else None
        ckpt_dir, tag = resolve_checkpoint(path, check=False)
        return int((read_meta(ckpt_dir, tag) or {})["step"])
    except (UserError, OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------- inference


def load_model_for_inference(path: str | Path, map_location: str = "cpu", setting: str = "--checkpoint"):
    """(model, cfg) in eval mode from any of `MODEL_PATHS`: an export directory (QueryTowers, read by
    pipeline/export.py: no DeepSpeed, no checkpoint), else the checkpoint `resolve_checkpoint` names
    (HierarchicalModel). Both answer encode_text / encode_video / similarity / levels alike, and
    embed alike (the export holds the checkpoint's query towers in float32, as read here).

    `setting` names the path in errors (`--checkpoint`, `RUN`, `hiervl.load path`). A checkpoint's
    resolved config is stored in it, with the full module weights (ZeRO 0-2 keep them in
    `mp_rank_00_model_states.pt`; ZeRO 3 is consolidated with DeepSpeed's zero_to_fp32).
    """
    path = Path(path).expanduser()
    if is_export(path):
        from hiervl.export_files import load_export

        return load_export(path)
    import torch
    from hiervl import safe_load
    from hiervl.config import from_dict
    from hiervl.model.hierarchical import build_model

    ckpt_dir, tag = resolve_checkpoint(path, setting=setting, hint=f"point {setting} at {MODEL_PATHS}")
    tag_dir = ckpt_dir / tag
    meta = json.loads((tag_dir / META).read_text())
    cfg = from_dict(meta["config"])
    cfg.model.text.pretrained = False  # weights come from the checkpoint; skip loading them twice
    model = build_model(cfg)
    states = tag_dir / "mp_rank_00_model_states.pt"
    if meta["zero_stage"] == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with safe_load.deepspeed_loads_safely():
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        buffers = safe_load.load(states, map_location=map_location).get("module") or {}
        sd = {**{k: v for k, v in buffers.items() if k not in sd}, **sd}
    else:
        sd = safe_load.load(states, map_location=map_location)["module"]
    sd = {k: v.float() if torch.is_floating_point(v) else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    queue_buffers = {id(b) for b in model.queues.buffers()}  # may be absent: a queue starts empty
    queues = {name for name, b in model.named_buffers() if id(b) in queue_buffers}
    if unexpected or [m for m in missing if m not in queues]:
        raise UserError(f"checkpoint {tag_dir} does not match the model it describes "
                        f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.eval()
    return model, cfg


# ---------------------------------------------------------------------------- recorded paths


def absolute(path: str | None) -> str | None:
    """`path` made absolute (from the current directory) unless it is None, a URL or already absolute."""
    if path is None or is_remote(path):
        return path
    path = as_local_path(path)
    return path if Path(path).is_absolute() else str(Path(path).resolve())


def absolute_paths(cfg):
    """A copy of `cfg` whose local paths are absolute: data.path, train.out_dir,
    train.deepspeed_config, a train.resume path, model.vision.clip_path and a model.text.path."""
    t, m = cfg.train, cfg.model
    resume = t.resume if t.resume in ("auto", "never") else absolute(t.resume)
    text_path = m.text.path if m.text.path == "default" else absolute(m.text.path)
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, path=absolute(cfg.data.path)),
        train=dataclasses.replace(t, out_dir=absolute(t.out_dir), deepspeed_config=absolute(t.deepspeed_config),
                                  resume=resume),
        model=dataclasses.replace(m, vision=dataclasses.replace(m.vision, clip_path=absolute(m.vision.clip_path)),
                                  text=dataclasses.replace(m.text, path=text_path)))


def find_recorded(path: str | None, recorded_in: str | Path) -> str | None:
    """A path read from a run folder (a checkpoint's data.path, index.json "data"): as written when it
    is absolute, a URL or exists from here; else the first ancestor of `recorded_in` under which it
    exists; else as written (the reader then names it in its error)."""
    if path is None or is_remote(path):
        return path
    path = as_local_path(path)
    if Path(path).is_absolute() or Path(path).exists():
        return path
    for parent in Path(recorded_in).resolve().parents:
        if (parent / path).exists():
            return str(parent / path)
    return path
