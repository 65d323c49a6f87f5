"""Decode throughput: this loader (DALI CPU path, PyAV path) vs decord, torchcodec and a plain
webdataset + PyAV DataLoader, on the same shards (VP9 and H.264), 1 and 2 threads.

    .venv/bin/python bench/decode.py [--num-videos 64] [--seconds 4] [--peer-python /tmp/decbench/bin/python]

Every contender turns each clip into T frames sampled over the clip. The loader and the
baseline also resize, crop and normalise (same `transform_clip`) and the loader tokenizes the
caption; decord and torchcodec only decode (they run in their own venv, `--peer-python`, made
with `python3.11 -m venv /tmp/decbench && /tmp/decbench/bin/pip install decord torchcodec torch`),
so their figures are an upper bound for a loader built on them. Prints a table and writes
bench/out/decode.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hiervl.config import Config  # noqa: E402
from hiervl.data.decode import transform_clip  # noqa: E402
from hiervl.model.text_model import load_tokenizer

T, SIZE, SHORT, B = 8, 32, 36, 8


def make_shards(work: Path, codec: str, n: int, seconds: float) -> Path:
    """Synthetic corpus (hiervl.dataprep.synth) packed to the shard contract; reused when present."""
    out = work / codec / "shards"
    if (out / "manifest.parquet").is_file():
        return out
    from hiervl.dataprep import synth

    manifest = synth.make_corpus(work / codec / "corpus", n, seed=0, codec=codec, size=64, seconds=seconds)
    try:
        from hiervl.dataprep import driver

        cfg = Config()
        cfg.prep.codec, cfg.prep.short_side, cfg.prep.shard_max_samples = "copy", 64, 8
        driver.prepare(cfg, str(manifest), str(out))
        return out
    except Exception as exc:  # noqa: BLE001 - hiervl.dataprep.driver not there: pack ourselves, same contract
        print(f"(packing shards in the benchmark: hiervl.dataprep.driver.prepare unavailable: {exc})")
    import csv

    import av
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(open(manifest)))
    records = []
    for s in range(0, len(rows), 8):
        shard = f"train-{s // 8:06d}.tar"
        with tarfile.open(out / shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for row in rows[s:s + 8]:
                tar.add(str(manifest.parent / row["video"]), arcname=f"{row['key']}.{Path(row['video']).suffix[1:]}")
        with tarfile.open(out / shard) as tar:
            for m, row in zip(tar.getmembers(), rows[s:s + 8]):
                data = (manifest.parent / row["video"]).read_bytes()
                with av.open(io.BytesIO(data)) as c:
                    nf = sum(1 for p in c.demux(video=0) if p.size)
                records.append({"key": row["key"], "video_id": row["key"], "split": "train", "shard": shard,
                                "index_in_shard": len(records) % 8, "video_offset": m.offset_data, "video_size": m.size,
                                "captions": json.loads(row["caption"]), "num_frames": nf, "codec": codec})
    pq.write_table(pa.Table.from_pylist(records), out / "manifest.parquet")
    return out


def run_loader(shards: Path, decoder: str, threads: int, min_seconds: float) -> dict:
    from hiervl.data.loader import VideoTextLoader

    cfg = Config()
    d = cfg.data
    d.path, d.batch_size, d.num_frames, d.size, d.short_side = str(shards), B, T, SIZE, SHORT
    d.decoder, d.num_threads, d.prefetch, d.remainder = decoder, threads, 2, "pad"
    loader = VideoTextLoader(cfg, split="train", tokenizer=load_tokenizer(cfg.model.text.path))
    next(iter(loader))  # warm-up: DALI pipeline build, tokenizer
    clips, epoch, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        loader.set_epoch(epoch)
        for batch in loader:
            clips += int(batch["valid"].sum())
        epoch += 1
    el = time.perf_counter() - start
    assert loader.stats["skipped"] == 0, loader.stats
    return {"clips_per_s": clips / el, "frames_per_s": clips * T / el, "path": dict(loader.stats["decode_path"])}


class _PlainDecode:
    """The baseline's per-sample work: PyAV decodes every frame, keep T, same transform."""

    def __call__(self, sample):
        import av

        ext = "webm" if "webm" in sample else "mp4"
        with av.open(io.BytesIO(sample[ext])) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        idx = np.linspace(0, len(frames) - 1, T).round().astype(int)
        return transform_clip(np.stack([frames[i] for i in idx]), SHORT, SIZE)


def run_baseline(shards: Path, threads: int, min_seconds: float) -> dict:
    import webdataset as wds

    tars = sorted(str(p) for p in shards.glob("train-*.tar"))
    ds = wds.WebDataset(tars, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker,
                        empty_check=False).map(_PlainDecode())
    dl = torch.utils.data.DataLoader(ds.batched(B), batch_size=None, num_workers=threads, persistent_workers=True)
    for _ in dl:  # warm-up epoch: worker start-up is not counted
        pass
    clips, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for batch in dl:
            clips += len(batch)
    el = time.perf_counter() - start
    return {"clips_per_s": clips / el, "frames_per_s": clips * T / el}


PEER = r'''
import io, json, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np
tool, threads, min_s, items = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), json.load(open(sys.argv[4]))
T = %d
if tool == "decord":
    import decord
    def one(it):
        vr = decord.VideoReader(io.BytesIO(_read(it)), num_threads=1)
        idx = np.linspace(0, len(vr) - 1, T).round().astype(int)
        return vr.get_batch(list(idx)).asnumpy().shape[0]
else:
    import torch
    torch.set_num_threads(1)
    from torchcodec.decoders import VideoDecoder
    def one(it):
        dec = VideoDecoder(_read(it), seek_mode="approximate")
        n = dec.metadata.num_frames or it[3]
        idx = np.linspace(0, n - 1, T).round().astype(int).tolist()
        return dec.get_frames_at(idx).data.shape[0]
def _read(it):
    with open(it[0], "rb") as f:
        f.seek(it[1]); return f.read(it[2])
clips, start = 0, time.perf_counter()
with ThreadPoolExecutor(threads) as pool:
    list(pool.map(one, items[:4]))
    start = time.perf_counter()
    while time.perf_counter() - start < min_s:
        clips += sum(1 for _ in pool.map(one, items))
el = time.perf_counter() - start
print(json.dumps({"clips_per_s": clips / el, "frames_per_s": clips * T / el}))
''' % T


def run_peer(python: str, tool: str, shards: Path, threads: int, min_seconds: float, work: Path) -> dict:
    import pandas as pd

    if not python or not Path(python).exists():
        return {"skipped": f"no peer venv at {python!r} (see the module docstring)"}
    m = pd.read_parquet(shards / "manifest.parquet")
    items = [[str(shards / r.shard), int(r.video_offset), int(r.video_size), int(r.num_frames)] for r in m.itertuples()]
    (work / "items.json").write_text(json.dumps(items))
    (work / "peer.py").write_text(PEER)
    proc = subprocess.run([python, str(work / "peer.py"), tool, str(threads), str(min_seconds), str(work / "items.json")],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        err = [ln for ln in proc.stderr.strip().splitlines() if "Error" in ln] or proc.stderr.strip().splitlines()[-1:]
        return {"skipped": f"{tool} did not run: {err[0][:200] if err else 'exit ' + str(proc.returncode)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-videos", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each synthetic clip")
    ap.add_argument("--min-seconds", type=float, default=3.0, help="time each measurement at least this long")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--peer-python", default="/tmp/decbench/bin/python")
    ap.add_argument("--work", default="/tmp/hiervl-bench-decode")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "decode.json"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for codec in ("vp9", "h264"):
        shards = make_shards(work, codec, args.num_videos, args.seconds)
        for threads in args.threads:
            torch.set_num_threads(threads)
            row = {"codec": codec, "threads": threads}
            row["loader_dali"] = (run_loader(shards, "dali", threads, args.min_seconds) if codec == "vp9"
                                  else {"skipped": "DALI's CPU backend does not decode H.264 (the loader uses PyAV)"})
            row["loader_pyav"] = run_loader(shards, "pyav", threads, args.min_seconds)
            row["baseline_wds_pyav"] = run_baseline(shards, threads, args.min_seconds)
            for tool in ("decord", "torchcodec"):
                row[tool] = run_peer(args.peer_python, tool, shards, threads, args.min_seconds, work)
            results.append(row)
            print_row(row)
    out = {"config": {"num_videos": args.num_videos, "clip_seconds": args.seconds, "frames": T, "crop": SIZE,
                      "batch": B, "cpus": os.cpu_count()}, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


def print_row(row: dict) -> None:
    base = row["baseline_wds_pyav"]["clips_per_s"]
    print(f"\n{row['codec']} threads={row['threads']}")
    for name in ("loader_dali", "loader_pyav", "baseline_wds_pyav", "decord", "torchcodec"):
        r = row[name]
        if "skipped" in r:
            print(f"  {name:18s} skipped: {r['skipped']}")
        else:
            print(f"  {name:18s} {r['clips_per_s']:8.1f} clips/s {r['frames_per_s']:9.1f} frames/s"
                  f"  {r['clips_per_s'] / base:5.2f}x baseline")


if __name__ == "__main__":
    sys.exit(main())
