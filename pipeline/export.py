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

Owns: writing the export (its file names and reading it: pipeline/export_files.py, a floor lower so
that every model reader, run_dir.load_model_for_inference, takes an export).
Must not touch: checkpoints (pipeline/run_dir.py reads those), training, or the API (which reads exports).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from hiervl.config import to_yaml
from hiervl.errors import UserError
from hiervl.export_files import (  # noqa: F401 - the format's names, re-exported for writers and tests
    CONFIG,
    EXPORT_FILE,
    FORMAT,
    TEXT_DIR,
    VERSION,
    VISION_DIR,
    WEIGHTS,
    is_export,
    load_export,
    read_export_info,
)

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
