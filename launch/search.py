"""`hiervl search`: the top videos for one or many sentences; `hiervl search index`: make an index.

Owns: `hiervl search` arguments and printing.
Must not touch: search logic (pipeline/eval/search.py, ann.py, video_index.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

HELP = "search videos by text (ANN + re-ranking), or index a folder/manifest of videos"
DESCRIPTION = """Search: encode each sentence with the checkpoint that made the index (one model load,
a forward pass per 256 queries), take the top --candidates videos of the global level from the
ANN index (exact below 65,536 videos, FAISS IVF-flat above), re-rank them by every level fused
exactly as `hiervl eval` scores, and print the top k: rank, fused and per-level scores, key, path
and first caption (--json: everything, one object per query). A contact sheet PNG shows frames of
each hit. The index's model fingerprint must match the checkpoint's (refused otherwise).

Index: `hiervl search index` embeds any folder of video files (--videos) or manifest (--manifest:
CSV/JSONL/Parquet with a `video` column, optional `key` and `caption`) with a checkpoint, and
writes an index directory (embeddings, catalog, index.json, ann.faiss). `hiervl eval --out DIR`
writes one for a prepared split.

Examples:
  hiervl search "a red circle slides left" --index runs/demo/train/eval-test -k 10
  hiervl search "a red circle slides left" "a blue square drops" --index DIR --json
  hiervl search --queries queries.txt --index DIR --no-sheet        # one query per line
  hiervl search index --checkpoint runs/demo/train --videos runs/demo/corpus/videos --out runs/demo/index
"""

OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)+=.*")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", nargs="*", help="sentence(s) to search for; or the word `index` to build an index")
    parser.add_argument("--index", metavar="DIR", help="index directory (search: read; not with `index`)")
    parser.add_argument("--queries", metavar="FILE", help="a text file of queries, one per line (blank lines skipped)")
    parser.add_argument("-k", type=int, default=10, help="how many videos to return per query (default 10)")
    parser.add_argument("--candidates", type=int, default=100,
                        help="ANN shortlist re-ranked by every level (default 100; >= the index size: exact)")
    parser.add_argument("--exact", action="store_true", help="score every video (brute force), no ANN stage")
    parser.add_argument("--nprobe", type=int, help="IVF cells scanned per query (default 32)")
    parser.add_argument("--json", action="store_true", help="print JSON (one object per query) instead of a table")
    from hiervl.run_dir import MODEL_PATHS

    parser.add_argument("--checkpoint", metavar="DIR",
                        help=f"the model (search: default the index's; index: required): {MODEL_PATHS}")
    parser.add_argument("--data", metavar="DIR", help="dataset for the contact sheet frames (default: the index's)")
    parser.add_argument("--sheet", metavar="PNG", help="contact sheet path (one query; default <index>/search-<query>.png)")
    parser.add_argument("--frames", type=int, default=4, help="frames per video on the contact sheet")
    parser.add_argument("--no-sheet", action="store_true", help="do not draw contact sheets")
    g = parser.add_argument_group("hiervl search index")
    g.add_argument("--videos", metavar="DIR", help="index every video file under DIR (or the base of --manifest paths)")
    g.add_argument("--manifest", metavar="FILE", help="index a manifest's videos (columns video, key?, caption?)")
    g.add_argument("--out", metavar="DIR", help="where the new index goes")
    g.add_argument("--ann", default="auto", choices=("auto", "flat", "ivf", "hnsw"),
                   help="ANN kind for the global level (auto: exact flat below 65,536 videos, else ivf)")
    g.add_argument("--batch-size", type=int, default=16, help="videos per forward pass")


def _split_overrides(args) -> list[str]:
    """`query` is nargs='*', so it also swallows KEY=VALUE overrides: give them back to the config."""
    overrides = [q for q in args.query if OVERRIDE.fullmatch(q)]
    args.query = [q for q in args.query if not OVERRIDE.fullmatch(q)]
    return overrides


def main(args, cfg) -> int:
    from hiervl.config import load_config
    from hiervl.errors import UserError
    from hiervl.launch.evaluate import refuse_model_overrides

    overrides = _split_overrides(args)
    if overrides:
        cfg = load_config(args.config, list(args.overrides) + overrides)
    refuse_model_overrides(list(args.overrides) + overrides, "search")
    if args.videos or args.manifest or args.query[:1] == ["index"]:
        if args.query not in ([], ["index"]):
            raise UserError(f"`hiervl search index` takes no query (got {args.query[1:] or args.query}); "
                            "search the new index with `hiervl search QUERY --index DIR`")
        return build_index(args, cfg)
    return run_search(args)


def build_index(args, cfg) -> int:
    from hiervl.errors import UserError

    if not (args.videos or args.manifest):
        raise UserError("`hiervl search index` needs --videos DIR or --manifest FILE")
    if not args.checkpoint or not args.out:
        raise UserError("`hiervl search index` needs --checkpoint RUN (the model) and --out DIR (the index)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be >= 1")
    from hiervl.launch.model_path import local_model_path

    args.checkpoint = local_model_path(args.checkpoint, cfg.storage)  # a URL: fetched into the cache, verified
    if not Path(args.checkpoint).exists():
        from hiervl.run_dir import MODEL_PATHS

        raise UserError(f"--checkpoint {args.checkpoint} does not exist; give {MODEL_PATHS}")
    from hiervl.eval.search import build_video_index  # slow (torch, the model): after the cheap checks

    t0 = time.perf_counter()
    entries = manifest_entries(args.manifest, args.videos) if args.manifest else None
    summary = build_video_index(args.checkpoint, args.out, videos=None if entries else args.videos, entries=entries,
                                source=args.manifest, ann=args.ann, batch_size=args.batch_size, num_threads=cfg.data.num_threads)
    print(f"indexed {summary['count']} videos ({summary['skipped']} skipped, {summary['captioned']} with captions) "
          f"into {args.out} ({summary['ann']} ANN on level {summary['level']}) in {time.perf_counter() - t0:.1f}s")
    for key, reason in summary.get("skipped_videos", [])[:5]:
        print(f"  skipped {key}: {reason}")
    audio = summary.get("audio_files") or []
    if audio:
        print(f"  not indexed: {len(audio)} audio file(s) with no picture ({', '.join(audio[:5])})")
    return 0


def manifest_entries(manifest: str, videos: str | None = None) -> list:
    """The videos a manifest lists, for an index: read by the one input-manifest reader (dataprep/sources.py,
    captions optional), relative paths from the manifest's folder or `videos`. A bad cell, a clip bound
    (start/end: cut the clips first, or prep them and use `hiervl eval`) or a URL is refused in one line."""
    from hiervl.dataprep.sources import manifest_path, read_manifest
    from hiervl.errors import UserError
    from hiervl.eval.video_index import CatalogEntry
    from hiervl.storage import is_remote

    path = manifest_path(manifest)
    entries = []
    for s in read_manifest(path, videos, caption_required=False):
        if s.invalid:
            raise UserError(f"--manifest {path}: {s.invalid}; fix that row")
        if s.start is not None or s.end is not None:
            raise UserError(f"--manifest {path}: clip bounds (start/end) are not supported by `search index`; cut "
                            "the clips into files first, or `hiervl prep` them and index with `hiervl eval`")
        if not s.video or is_remote(s.video):
            raise UserError(f"--manifest {path}: video {s.video!r} (key {s.key}) is not a local file path")
        entries.append(CatalogEntry(s.key, str(Path(s.video).resolve()), [c.strip() for c in s.captions if c.strip()]))
    return entries


def read_queries(args) -> list[str]:
    from hiervl.errors import UserError

    queries = list(args.query)
    if args.queries:
        path = Path(args.queries)
        if not path.is_file():
            raise UserError(f"--queries {path}: file not found (one query per line)")
        queries += [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if not queries:
        raise UserError("no query: give a sentence, several, or --queries FILE (one per line)")
    return queries


def _check_search_args(args) -> list[str]:
    """The checks of a search that need no model, torch or index read (one line within a second)."""
    from hiervl.errors import UserError

    if not args.index:
        raise UserError("--index DIR is required (an index from `hiervl search index` or `hiervl eval`)")
    if not (Path(args.index) / "index.json").is_file():
        raise UserError(f"{args.index} is not a search index (no index.json); make one with "
                        "`hiervl search index --checkpoint RUN --videos DIR --out DIR` or "
                        "`hiervl eval --checkpoint RUN --data SHARDS --split SPLIT --out DIR`")
    if args.k < 1 or args.candidates < 1:
        raise UserError(f"-k {args.k} / --candidates {args.candidates}: ask for at least one video")
    return read_queries(args)


def run_search(args) -> int:
    queries = _check_search_args(args)  # before the slow imports below
    from hiervl.errors import UserError
    from hiervl.eval.fingerprint import check_fingerprint
    from hiervl.eval.search import (
        SearchIndex,
        contact_sheet,
        format_hits,
        frames_for_hits,
        hits_to_json,
        search_batch,
    )
    from hiervl.log import get_logger
    from hiervl.run_dir import checkpoint_step, load_model_for_inference

    index = SearchIndex.load(args.index)
    from hiervl.launch.model_path import local_model_path

    checkpoint = local_model_path(args.checkpoint or index.meta.get("checkpoint"))  # a URL: fetched, verified
    if not checkpoint:
        raise UserError(f"{args.index}/index.json names no checkpoint; pass --checkpoint DIR")
    model, _ = load_model_for_inference(checkpoint)
    warning = check_fingerprint(index.fingerprint, list(index.meta.get("shapes", {})), model, str(checkpoint),
                                str(args.index), checkpoint_step(checkpoint))
    if warning:
        get_logger(__name__).warning(warning)
    if args.nprobe:
        for level in [lv.name for lv in model.level_specs if lv.kind == "global"]:
            index.ann(level).nprobe = args.nprobe
    t0 = time.perf_counter()
    results = search_batch(model, index, queries, k=args.k, candidates=args.candidates, exact=args.exact)
    seconds = time.perf_counter() - t0
    out = sys.stdout
    if args.json:
        out.write(json.dumps([hits_to_json(q, h) for q, h in zip(queries, results)], indent=2) + "\n")
    else:
        for q, hits in zip(queries, results):
            if len(queries) > 1:
                print(f"\nquery: {q}")
            print(format_hits(hits))
    print(f"{len(queries)} queries over {len(index.keys)} videos in {seconds * 1000:.1f} ms", file=sys.stderr)
    if args.sheet and len(queries) > 1:
        raise UserError("--sheet PNG names one file: use it with one query (several: sheets go to the index folder)")
    if not args.no_sheet:
        for q, hits in zip(queries, results):
            if not hits:
                continue
            slug = re.sub(r"[^a-z0-9]+", "-", q.lower()).strip("-")[:60] or "query"
            sheet = Path(args.sheet) if args.sheet else Path(args.index) / f"search-{slug}.png"
            frames = frames_for_hits(index, hits, args.frames, data=args.data)
            contact_sheet(hits, frames, sheet, query=q)
            print(f"contact sheet: {sheet} ({len(frames)} of {len(hits)} videos with frames)",
                  file=sys.stderr if args.json else sys.stdout)
    return 0
