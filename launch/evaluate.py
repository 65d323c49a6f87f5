"""`hiervl eval`: retrieval metrics of a checkpoint on a split, plus the search index.

Runs as one process, or one per rank under any launcher (torchrun, DeepSpeed, SLURM: the
world comes from the environment), each rank embedding its slice of the split.

Owns: `hiervl eval`: arguments, ranks from the environment, printing and writing results.
Must not touch: metric or ranking logic (pipeline/eval/).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

HELP = "evaluate a checkpoint: t2v/v2t R@1/5/10, MdR, MnR per level and fused (+ search index)"
DESCRIPTION = """Embed a split of a prepared dataset with a trained checkpoint (or its export: the same
numbers) and report retrieval metrics for text-to-video and video-to-text, per level and fused:
R@1/5/10 (percent), median and mean rank, ties counted pessimistically (and reported), every
caption a query. Dual-softmax
(DSL) numbers are extra rows marked (DSL), never in place of the plain ones (eval.dsl=false
drops them). The similarity is computed in blocks of eval.block_size captions (at most
eval.block_mb MiB at once), so large splits fit in memory.

Diagnostics, in a second table (and eval.json "order", "groups"):
  order        how often a caption scores its own video higher played forward than with its
               frames reversed in time (every video is encoded twice; ties fail; 50 = blind to
               order, 100 = always the true order), per level and fused
  group R@1    on data whose manifest has a `group` column (hiervl synth writes one): the top
               video is in the caption's group of related videos
  sibling R@1  within the caption's group, its own video scores highest (chance 1 / group size)
--no-diagnostics skips them (and the second encoding).

The model (preset, sizes, levels, frames, tokens) is the checkpoint's: `model.*` overrides are refused.
Writes eval.json, eval.md and the video embeddings (embeddings.parquet + index.json, the
index `hiervl search` reads) to --out (default: <run>/eval-<split>; for an export, <export>-eval-<split>
beside it: eval never writes into an export).

Example:
  hiervl eval --checkpoint runs/demo/train --data runs/demo/shards --split test
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hiervl.run_dir import MODEL_PATHS

    parser.add_argument("--checkpoint", required=True, metavar="DIR", help=f"the model: {MODEL_PATHS}")
    parser.add_argument("--data", metavar="DIR", help="prepared dataset directory or s3:// / gs:// / http(s):// prefix (default: the checkpoint's data.path)")
    parser.add_argument("--split", default=None, help="split to evaluate (default: eval.split, 'test')")
    parser.add_argument("--out", metavar="DIR", help="where eval.json, eval.md and the index go")
    parser.add_argument("--no-export", action="store_true", help="do not write the embeddings / search index")
    parser.add_argument("--no-diagnostics", action="store_true",
                        help="skip order sensitivity (the time-reversed second encoding) and group / sibling R@1")


def refuse_model_overrides(overrides: list[str], command: str = "eval") -> None:
    """The model's config comes from its checkpoint (the weights were trained with it): a `model.*`
    override would be silently ignored, or, applied, describe other weights. Refused in one line."""
    from hiervl.errors import UserError

    bad = [o for o in overrides if o.split("=", 1)[0].strip() == "model" or o.startswith("model.")]
    if bad:
        raise UserError(f"{bad[0]}: `hiervl {command}` takes the model's config from the checkpoint (its weights were "
                        "trained with it); drop the model.* override, or train a model with it")


def merged_config(ckpt_cfg, cli_cfg, data: str | None, checkpoint: str | None = None):
    """The checkpoint's config (model, frames, tokens: what the weights expect), with the data
    path, the decoder settings and the eval section taken from the command line. The data path is
    absolute (it goes into index.json): --data from here, else the checkpoint's data.path (a
    relative one, from a run older than absolute paths, found from the checkpoint's folder)."""
    from hiervl.run_dir import absolute, find_recorded

    d = ckpt_cfg.data
    path = absolute(data) if data else absolute(find_recorded(d.path, checkpoint or "."))
    data_cfg = dataclasses.replace(d, path=path, decoder=cli_cfg.data.decoder, device=cli_cfg.data.device,
                                   num_threads=cli_cfg.data.num_threads)
    # storage (endpoint, retries, cache) is where this machine reads from now, not what the run used
    return dataclasses.replace(ckpt_cfg, data=data_cfg, eval=cli_cfg.eval, storage=cli_cfg.storage)


def check_split(data: str | None, split: str) -> None:
    """A --data folder holds `split`: one line before the model loads (not after it embedded a batch)."""
    from hiervl.errors import UserError
    from hiervl.storage import is_remote

    if not data or is_remote(data):
        return
    manifest = Path(data) / "manifest.parquet"
    if not manifest.is_file():
        raise UserError(f"--data {data} is not a prepared dataset (no manifest.parquet); make one with "
                        "`hiervl prep --input MANIFEST --out DIR`")
    from hiervl.data.manifest import read_dataset_info, read_manifest

    read_dataset_info(data)  # damaged, foreign or of another schema version: one line naming it
    splits = set(read_manifest(manifest, ["split"]).column(0).to_pylist())  # the same for the manifest
    if split not in splits:
        raise UserError(f"{data} has no samples of split '{split}' (it has: {', '.join(sorted(map(str, splits))) or 'none'})")


def main(args, cfg) -> int:
    check_split(args.data, args.split or cfg.eval.split)  # before the slow imports and the model
    from hiervl.launch.model_path import local_model_path
    from hiervl.storage import is_remote

    if is_remote(str(args.checkpoint)) and not args.out:
        from hiervl.errors import UserError

        raise UserError(f"--checkpoint {args.checkpoint} is in an object store: give --out DIR for the results")
    args.checkpoint = local_model_path(args.checkpoint, cfg.storage)  # a URL: fetched into the cache, verified
    from hiervl import distributed as dist
    from hiervl.eval.evaluate import diagnostics_note, evaluate_model, format_diagnostics, format_table
    from hiervl.log import setup_logging
    from hiervl.run_dir import checkpoint_step, eval_dir, load_model_for_inference

    refuse_model_overrides(args.overrides)  # before any rank starts work
    info = dist.init()
    setup_logging(info.rank)
    try:
        model, ckpt_cfg = load_model_for_inference(args.checkpoint)
        run_cfg = merged_config(ckpt_cfg, cfg, args.data, args.checkpoint)
        model = model.to(dist.resolve_device("auto", info.local_rank))
        split = args.split or cfg.eval.split
        out = Path(args.out) if args.out else eval_dir(args.checkpoint, split)
        result = evaluate_model(model, run_cfg, split=split, out_dir=out, export=not args.no_export,
                                meta={"checkpoint": str(Path(args.checkpoint).resolve()),
                                      "checkpoint_step": checkpoint_step(args.checkpoint)},
                                diagnostics=not args.no_diagnostics)
        if dist.is_main():
            print(format_table(result), end="")
            diag = format_diagnostics(result)
            if diag:
                print("\n" + diagnostics_note(result) + "\n" + diag, end="")
            print(f"{result['num_videos']} videos, {result['num_captions']} captions, {result['skipped']} skipped; "
                  f"embedded {result['videos_per_s']:.1f} videos/s; report in {out}/eval.md")
    finally:
        dist.destroy()
    return 0
