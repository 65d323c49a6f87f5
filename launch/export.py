"""`hiervl export`: a training checkpoint -> a self-contained model directory (pipeline/export.py).

Owns: `hiervl export` arguments, the round-trip check and printing.
Must not touch: the export format (pipeline/export.py) or checkpoint reading (pipeline/run_dir.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "export a checkpoint as a self-contained model directory (safetensors, config, tokenizer)"
DESCRIPTION = """Write the query towers and level heads of a trained checkpoint (no momentum copies,
no queues, no optimizer state) as model.safetensors, with the resolved config, the frame ViT's and
the text encoder's architecture, the tokenizer and the preprocessing settings. The directory loads
with `hiervl.load(DIR)` without DeepSpeed, the checkpoint or the original CLIP / text checkpoints.

After writing, the export is loaded back and a caption and a clip are embedded by both it and the
checkpoint: the embeddings must be equal (--no-verify skips this).

Example:
  hiervl export runs/demo/train --out runs/demo/model
  python -c "import hiervl; m = hiervl.load('runs/demo/model'); print(m)"
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hiervl.run_dir import CHECKPOINT_PATHS

    parser.add_argument("run", metavar="RUN", help=f"the checkpoint to export: {CHECKPOINT_PATHS}")
    parser.add_argument("--out", required=True, metavar="DIR", help="the export directory to write (new or empty)")
    parser.add_argument("--force", action="store_true", help="replace an existing export at --out")
    parser.add_argument("--no-verify", action="store_true", help="skip loading the export back and comparing")


def checkpoint_source(run: Path) -> dict:
    """Which checkpoint a run path names (the tag load_model_for_inference reads), for the export's record."""
    from hiervl.run_dir import read_meta, resolve_checkpoint

    ckpt_dir, tag = resolve_checkpoint(run, check=False, setting="RUN")  # an export is refused: it is one already
    return {"checkpoint": str(run.resolve()), "tag": tag, "step": (read_meta(ckpt_dir, tag) or {}).get("step")}


def round_trip_difference(model, cfg, out: Path) -> float:
    """Largest |difference| between the checkpoint's and the export's embeddings of one caption and one clip."""
    import numpy as np
    import torch
    from hiervl.api import HierVLModel, load, resolve_device

    ckpt = HierVLModel(model, cfg, resolve_device("cpu"))
    exported = load(out, device="cpu")
    d = cfg.data
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (2 * d.num_frames, d.short_side + 3, d.short_side + 5, 3), dtype=np.uint8)
    worst = 0.0
    for a, b in ((ckpt.encode_text(["a red circle slides left, then a blue square drops"]),
                  exported.encode_text(["a red circle slides left, then a blue square drops"])),
                 (ckpt.encode_video([clip]), exported.encode_video([clip]))):
        if a.keys() != b.keys():
            raise RuntimeError(f"export levels {sorted(b)} differ from the checkpoint's {sorted(a)}")
        # NaN counts as the largest difference (max() over floats would drop it and report 0)
        worst = max([worst] + [float(torch.nan_to_num((a[k].float() - b[k].float()).abs(), nan=float("inf")).max())
                               for k in a])
    return worst


def main(args, cfg) -> int:
    from hiervl.errors import UserError
    from hiervl.export import write_export
    from hiervl.run_dir import load_model_for_inference

    if args.overrides or args.config:
        raise UserError("export takes no --config or KEY=VALUE overrides: it writes the checkpoint's own config "
                        f"(got {' '.join(([f'--config {args.config}'] if args.config else []) + args.overrides)})")
    from hiervl.launch.model_path import local_model_path

    run = Path(local_model_path(args.run, cfg.storage))  # a URL: fetched into the cache, verified
    source = checkpoint_source(run)  # before the model loads: one line for a wrong RUN
    model, ckpt_cfg = load_model_for_inference(run, setting="RUN")
    out = write_export(model, ckpt_cfg, args.out, source=source, overwrite=args.force)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"exported {ckpt_cfg.model.preset} ({', '.join(model.levels)}) from {run} to {out} "
          f"({size / 2**20:.1f} MiB)")
    if not args.no_verify:
        diff = round_trip_difference(model, ckpt_cfg, out)
        if diff > 1e-6:
            raise RuntimeError(f"the export at {out} does not reproduce the checkpoint (max |difference| {diff:g})")
        print(f"verified: the export's text and video embeddings equal the checkpoint's (max |difference| {diff:g})")
    print(f"load it with: import hiervl; model = hiervl.load({str(out)!r})")
    return 0
