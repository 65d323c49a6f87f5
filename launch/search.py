"""`hiervl search`: the top videos for a sentence, from an index `hiervl eval` exported.

Owns: `hiervl search` arguments and printing.
Must not touch: search logic (pipeline/eval/search.py).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

HELP = "search videos by text in an exported index; prints the top k and writes a contact sheet"
DESCRIPTION = """Encode a sentence with the checkpoint that made the index, score it against every
video of the index (per level and fused) and print the top k by the fused score. A contact sheet
PNG shows frames of each hit (read from the dataset the index was made from).

The index is the --out directory of `hiervl eval` (embeddings.parquet + index.json).

Example:
  hiervl search "a red circle slides left" --index runs/demo/train/eval-test -k 10
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", help="the sentence to search for")
    parser.add_argument("--index", required=True, metavar="DIR", help="directory written by `hiervl eval` (index.json)")
    parser.add_argument("-k", type=int, default=10, help="how many videos to return (default 10)")
    parser.add_argument("--checkpoint", metavar="DIR", help="model to encode the query (default: the index's)")
    parser.add_argument("--data", metavar="DIR", help="dataset for the contact sheet frames (default: the index's)")
    parser.add_argument("--sheet", metavar="PNG", help="contact sheet path (default: <index>/search-<query>.png)")
    parser.add_argument("--frames", type=int, default=4, help="frames per video on the contact sheet")
    parser.add_argument("--no-sheet", action="store_true", help="do not draw the contact sheet")


def main(args, cfg) -> int:
    from pipeline.errors import UserError
    from pipeline.eval.search import SearchIndex, contact_sheet, format_hits, load_frames, search
    from pipeline.train.checkpoint import load_model_for_inference

    if args.k < 1:
        raise UserError(f"-k {args.k}: ask for at least one video")
    index = SearchIndex.load(args.index)
    checkpoint = args.checkpoint or index.meta.get("checkpoint")
    if not checkpoint:
        raise UserError(f"{args.index}/index.json names no checkpoint; pass --checkpoint DIR")
    model, _ = load_model_for_inference(checkpoint)
    hits = search(model, index, args.query, k=args.k)
    print(format_hits(hits))
    if not args.no_sheet and hits:
        data = args.data or index.data
        slug = re.sub(r"[^a-z0-9]+", "-", args.query.lower()).strip("-")[:60] or "query"
        sheet = Path(args.sheet) if args.sheet else Path(args.index) / f"search-{slug}.png"
        frames = load_frames(data, index.split, [h.key for h in hits], count=args.frames) if data else {}
        contact_sheet(hits, frames, sheet, query=args.query)
        print(f"contact sheet: {sheet} ({len(frames)} of {len(hits)} videos with frames)")
    return 0
