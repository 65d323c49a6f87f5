"""A self-contained model directory: what `hiervl export RUN --out DIR` writes and `hiervl.load` reads.

    DIR/hiervl-export.json   format marker + version, preset, levels, fusion weights, preprocessing
                             (a copy of config.yaml's data settings, for tools that do not read
                             hiervl configs), the checkpoint it came from, parameter count
    DIR/config.yaml          the run's resolved config (the model and preprocessing the weights expect)
    DIR/model.safetensors    the query towers and their level heads (`video.*`, `text.*`), float32:
                             no momentum copies, no queues, no optimizer state
    DIR/vision/config.json   the frame ViT's architecture (CLIPVisionConfig)
    DIR/text/                the text encoder's architecture (config.json) and its tokenizer files

Loading needs neither DeepSpeed nor the checkpoint nor the original CLIP / text checkpoint
directories: the towers are built from the two architecture configs with random weights, then
every tensor comes from model.safetensors (strict: a missing or extra tensor is refused).
The directory appears whole: it is written under a temporary name and renamed last.

Owns: the export format, writing and reading it.
Must not touch: checkpoints (pipeline/run_dir.py reads those), training, or the API (which reads exports).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from hiervl.config import ConfigError, from_dict, to_yaml, yaml_load
from hiervl.errors import UserError
from hiervl.run_dir import EXPORT_MARK as EXPORT_FILE
from hiervl.run_dir import is_export

FORMAT, VERSION = "hiervl-export", 1
WEIGHTS, CONFIG, VISION_DIR, TEXT_DIR = "model.safetensors", "config.yaml", "vision", "text"
TOWER_PREFIXES = ("video.", "text.")  # the query towers + heads; HierarchicalModel's video_key.* etc. stay out


def tower_state(model) -> dict[str, torch.Tensor]:
    """The query towers' and level heads' tensors of a QueryTowers / HierarchicalModel, float32 on the CPU."""
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone().contiguous()
            for k, v in model.state_dict().items() if k.startswith(TOWER_PREFIXES)}


def write_export(model, cfg, out: str | Path, source: dict | None = None, overwrite: bool = False) -> Path:
    """Write `model`'s query towers (a HierarchicalModel or QueryTowers built from `cfg`) to `out`."""
    from hiervl.data.preprocess import Preprocessing
    from hiervl.model.text_model import load_tokenizer
    from safetensors.torch import save_file

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise UserError(f"--out {out} exists and is not empty; choose a new directory or pass --force")
        if not is_export(out):
            raise UserError(f"--out {out} holds something other than a hiervl export; --force only replaces exports")
    state = tower_state(model)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a diverged run: an export of NaN/inf weights would embed everything as NaN
        raise UserError(f"the checkpoint's weights are not finite (NaN or inf in {len(bad)} tensors, e.g. {bad[0]}); "
                        "nothing exported: export an earlier checkpoint (RUN/checkpoints/stepNNNNNNNN)")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / VISION_DIR).mkdir(parents=True)
    try:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", FORMAT: str(VERSION)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / WEIGHTS, 0o666 & ~umask)  # safetensors writes 0600; readable like the rest of the export
        (tmp / CONFIG).write_text(to_yaml(cfg))
        model.video.encoder.vit.config.save_pretrained(str(tmp / VISION_DIR))  # the ViT as built (channels, sizes)
        model.text.encoder.model.config.save_pretrained(str(tmp / TEXT_DIR))  # as built: cut layers, dropout
        load_tokenizer(cfg.model.text.path).save_pretrained(str(tmp / TEXT_DIR))
        info = {"format": FORMAT, "version": VERSION, "preset": cfg.model.preset, "levels": list(model.levels),
                "fusion_weights": dict(model.fusion_weights), "embed_dim": cfg.model.embed_dim,
                "preprocessing": Preprocessing.from_config(cfg).to_dict(),
                "parameters": int(sum(v.numel() for v in state.values())), "source": source or {},
                "files": {"weights": WEIGHTS, "config": CONFIG, "vision_config": f"{VISION_DIR}/config.json",
                          "text": f"{TEXT_DIR}/"}}
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")  # last: marks the export complete
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_export_info(path: str | Path) -> dict:
    path = Path(path)
    try:
        info = json.loads((path / EXPORT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path / EXPORT_FILE} is unreadable ({exc}); export the run again") from None
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise UserError(f"{path} is a {info.get('format')!r} version {info.get('version')!r} export; this hiervl "
                        f"reads {FORMAT} version {VERSION}: export the run again with this version")
    for name in (WEIGHTS, CONFIG, f"{VISION_DIR}/config.json", f"{TEXT_DIR}/config.json"):
        if not (path / name).is_file():
            raise UserError(f"export {path} is incomplete: {name} is missing; export the run again")
    return info


def export_config(path: Path):
    """The export's config, pointed at its own text directory (architecture only, no pretrained weights)."""
    import yaml

    try:
        tree = yaml_load((path / CONFIG).read_text()) or {}  # plain YAML only: a `!!python/...` tag is refused
    except yaml.YAMLError as exc:
        raise UserError(f"{path / CONFIG} is not a plain YAML config ({str(exc).splitlines()[0]}); export the run "
                        "again") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path / CONFIG} is not a config (a mapping of sections); export the run again")
    model = tree.setdefault("model", {})
    model["clip_path"] = None  # the towers' sources are this directory, not the training machine's CLIP
    model.setdefault("text", {}).update(path=str((path / TEXT_DIR).resolve()), pretrained=False)
    tree.setdefault("train", {})["activation_checkpointing"] = False
    try:
        return from_dict(tree)
    except ConfigError as exc:
        raise UserError(f"{path / CONFIG} is not a config this hiervl reads ({exc}); export the run again") from None


def load_export(path: str | Path):
    """(QueryTowers in eval mode, cfg) from an export directory. Imports no DeepSpeed."""
    from hiervl.data.preprocess import Preprocessing
    from hiervl.model.hierarchical import QueryTowers
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig

    path = Path(path).expanduser()
    info = read_export_info(path)
    cfg = export_config(path)
    expected = Preprocessing.from_config(cfg).to_dict()
    if info.get("preprocessing") != expected:
        raise UserError(f"{path / EXPORT_FILE}'s preprocessing {info.get('preprocessing')} disagrees with "
                        f"{path / CONFIG} ({expected}): one was edited; export the run again")
    vision = CLIPVisionConfig.from_pretrained(str(path / VISION_DIR), local_files_only=True)
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the caller's RNG as it was
        towers = QueryTowers(cfg, vision_config=vision)
    try:
        state = load_file(str(path / WEIGHTS))  # safetensors: a header and raw tensors, never a pickle
    except Exception as exc:  # noqa: BLE001 - SafetensorError, or an OSError reading it
        raise UserError(f"{path / WEIGHTS} is not a safetensors file ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160]}); export the run again") from None
    missing, unexpected = towers.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"export {path}: {WEIGHTS} does not match its config (missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}); export the run again")
    return towers.eval(), cfg
