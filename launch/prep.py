"""`hiervl prep`: videos + captions in, verified WebDataset shards out (local pool or Ray), or `--verify DIR`.

Owns: `hiervl prep` arguments and exit code.
Must not touch: preparation logic (dataprep/).
"""

from __future__ import annotations

from pathlib import Path

from hiervl.errors import UserError

HELP = "prepare WebDataset shards (+ DALI index, manifest) from videos and captions"
DESCRIPTION = """Probe, validate and transcode every input video per the prep config, and write
deterministic, resumable WebDataset shards with DALI indexes, manifest.parquet,
quarantine.parquet and dataset.json under --out. One task per shard, on prep.num_workers
local processes, or on Ray (prep.distributor=auto: Ray from 1000 videos or with --ray-address,
joining that cluster; =local / =ray to choose). A rerun finishes only missing shards. Bad inputs are quarantined; the exit code is 1 only past prep.max_failure_rate.
One prep at a time per --out (a lock). --out may already hold splits made from other inputs
(e.g. MSR-VTT test after train): they are kept; remaking another input's split, dropping one,
or another prep config refuses unless --overwrite.
--verify DIR re-reads a prepared dataset with webdataset and DALI and checks it.

Input: a manifest (CSV/JSONL/Parquet: video, caption, [key, split, start, end]) or, with
--format, benchmark annotations: msrvtt, msvd, lsmdc, didemo, activitynet (--videos DIR).

Object storage: --input, --videos, --out and --verify take s3://BUCKET/PREFIX (also gs://; http(s)://
for reading); credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the endpoint from
storage.endpoint_url or AWS_ENDPOINT_URL.

Example: hiervl prep --config configs/tiny.yaml --input runs/demo/corpus/manifest.csv --out runs/demo/shards"""

FORMATS = ("manifest", "msrvtt", "msvd", "lsmdc", "didemo", "activitynet")


def add_arguments(parser) -> None:
    parser.add_argument("--input", metavar="PATH", help="manifest file/folder (or s3:// gs:// http(s):// URL), or annotation file for --format")
    parser.add_argument("--format", choices=FORMATS, default=None, help="input format (default: manifest)")
    parser.add_argument("--videos", metavar="DIR", help="folder (or object-store prefix) holding the videos the input names")
    parser.add_argument("--out", metavar="DIR", help="output dataset folder, or an s3:// / gs:// prefix")
    parser.add_argument("--ray-address", metavar="ADDR", help="join an existing Ray cluster instead of a local one")
    parser.add_argument("--segments", action="store_true",
                        help="didemo/activitynet: one clip per sentence instead of video-paragraph samples")
    parser.add_argument("--split", help="benchmark formats: split name to assign (default: from the file name)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what --out holds (splits of other inputs, another prep config) with this "
                             "run's dataset; without it such a prep refuses")
    parser.add_argument("--verify", metavar="DIR", help="re-read a prepared dataset and check it; no prep")
    parser.add_argument("--no-dali", action="store_true", help="--verify: skip the DALI reader")


def main(args, cfg) -> int:
    if args.verify:
        from hiervl.dataprep.verify import verify
        from hiervl.storage import is_remote
        if is_remote(args.verify):  # the stock readers (webdataset, DALI) read local files: a copy first
            return _verify_remote(args, cfg)
        res = verify(args.verify, dali=not args.no_dali)
        for p in res["problems"]:
            print(f"verify: {p}")
        status = "FAILED" if res["problems"] else "ok"
        print(f"verify {status}: {res['samples']} samples in the manifest, webdataset read {res.get('webdataset')}, "
              f"DALI read {res.get('dali')}, {len(res['problems'])} problems")
        return 1 if res["problems"] else 0
    return _prepare(args, cfg)


def _verify_remote(args, cfg) -> int:
    """`--verify s3://...`: download the dataset into a temporary folder, verify that copy."""
    import tempfile

    from hiervl.storage import open_store

    store = open_store(args.verify, cfg.storage)
    store.check()
    with tempfile.TemporaryDirectory(prefix="hiervl-verify-") as tmp:
        names = store.list()
        for name in names:
            (Path(tmp) / name).write_bytes(store.read(name))
        print(f"verify: {len(names)} objects of {args.verify} copied to a temporary folder")
        args.verify = tmp
        return main(args, cfg)


def _prepare(args, cfg) -> int:
    if not args.input or not args.out:
        raise UserError("prep needs --input PATH and --out DIR (or --verify DIR)")
    from hiervl.dataprep.driver import prepare, quarantine_lines, summary_line
    options = {}
    if args.segments:
        if args.format not in ("didemo", "activitynet"):
            raise UserError("--segments applies to --format didemo or activitynet")
        options["segments"] = True
    if args.split:
        if args.format in (None, "manifest"):
            raise UserError("--split applies to benchmark formats; a manifest has a split column")
        options["split"] = args.split
    fmt = None if args.format == "manifest" else args.format
    summary = prepare(cfg, args.input, args.out, fmt=fmt, videos_dir=args.videos, ray_address=args.ray_address,
                      overwrite=args.overwrite, **options)
    print(summary_line(summary))
    for line in quarantine_lines(summary):
        print(line)
    if not summary["ok"]:
        print(f"prep: failure rate {summary['failure_rate']:.1%} is past prep.max_failure_rate="
              f"{cfg.prep.max_failure_rate}; see {args.out}/quarantine.parquet")
        return 1
    return 0
