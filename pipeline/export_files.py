"""Reading an export directory (what `hiervl export` writes: pipeline/export.py): its file names,
`is_export`, and `load_export` -> (QueryTowers, cfg).

    DIR/hiervl-export.json   format marker + version, preset, levels, preprocessing, source checkpoint
    DIR/config.yaml          the run's resolved config
    DIR/model.safetensors    the query towers and their level heads, float32
    DIR/vision/config.json   the frame ViT's architecture; DIR/text/: the text encoder's and its tokenizer

It sits on run_dir's floor (below eval/, train/, export.py and the API) so that the one reader of
"which model does this path name", run_dir.load_model_for_inference, takes an export wherever a
checkpoint is taken (eval, search, search index, hiervl.load). Loading needs neither DeepSpeed nor
the checkpoint: the towers are built from the two architecture configs, then every tensor comes
from model.safetensors (strict), never from a pickle.

Owns: the export's file names and reading them.
Must not touch: writing an export (pipeline/export.py), checkpoints (pipeline/run_dir.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from hiervl.config import ConfigError, from_dict, yaml_load
from hiervl.errors import UserError

EXPORT_FILE = "hiervl-export.json"
FORMAT, VERSION = "hiervl-export", 1
WEIGHTS, CONFIG, VISION_DIR, TEXT_DIR = "model.safetensors", "config.yaml", "vision", "text"


def is_export(path: str | Path) -> bool:
    """`path` is an export directory (it holds hiervl-export.json), not a run or a checkpoint."""
    return (Path(path) / EXPORT_FILE).is_file()


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
    import torch
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
