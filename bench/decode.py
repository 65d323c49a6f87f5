"""Decode cost: hiervl's loader vs a tuned webdataset + PyAV user loop (the baseline) and the naive
one, paired in one run; 64 px and 256 px clips, VP9 and H.264. Optionally decord / torchcodec.

    .venv/bin/python bench/decode.py [--sizes 64 256] [--rounds 3] [--parallel 2] [--min-seconds 4]

Data (synthetic, `hiervl.dataprep.synth`, 8 fps, a keyframe every 8 frames, packed by
`hiervl.dataprep.driver.prepare` with prep.codec=copy): "64 px" = 64 clips of 64x64, 4 s = 32 frames
(the data of the earlier claims); "256 px" = 32 clips of 256x256, 10 s = 80 frames (base-shaped: what
base.yaml's prep keeps). Only the `train` split is read. Every contender turns each clip into T=8 frames,
resized (short side 36), cropped 32x32 and normalised with the same `transform_clip`; the loader also
tokenizes a caption.

Contenders, each with `--parallel` P (2) of its unit of parallelism:
- `hiervl workers`: `VideoTextLoader`, data.decoder=pyav, data.decode_workers=P (PyAV processes).
- `hiervl threads`: the same, data.decode_workers=0, data.num_threads=P (PyAV in the loader's threads).
- `hiervl dali`: data.decoder=dali (VP9 only: DALI's CPU backend lacks H.264), data.num_threads=P.
- `baseline tuned` (THE baseline): `wds.WebDataset(tars).map(decode).batched(B)` in a
  `DataLoader(num_workers=P, persistent_workers=True)`, decoding as a competent user would: codec
  `thread_count=1`, the same random frame per segment as the loader, decode stops after the last wanted
  frame, RGB only for the kept frames with `to_ndarray(threads=1)`. It still decodes every frame before
  the last wanted one (no keyframe seeking).
- `baseline naive`: the loop this file used to compare against: every frame decoded and converted to RGB
  with PyAV's default codec and swscale threads, then T kept (linspace). Kept as a labelled row.

Measurement: every contender is built once and warmed up (one epoch: worker start-up, DALI build, page
cache). Then `--rounds` rounds; in each round every contender runs whole epochs for >= `--min-seconds`
in turn. Per run: clips/s (wall) and CPU ms per clip = user + system CPU of the whole process tree (this
process and every child: decode workers, DataLoader workers) over the run / clips. CPU per clip is the
figure to trust on a loaded machine (wall clips/s partly measures how many runnable threads a side has);
ratios are taken within a round (paired) and reported min / median / max. Writes bench/out/decode.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
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
from hiervl.data.sampler import frame_indices  # noqa: E402

T, SIZE, SHORT = 8, 32, 36
DATASETS = {64: {"num_videos": 64, "seconds": 4.0, "batch": 8}, 256: {"num_videos": 32, "seconds": 10.0, "batch": 8}}


def make_shards(work: Path, codec: str, size: int, n: int, seconds: float) -> Path:
    """Synthetic corpus (hiervl.dataprep.synth) packed to the shard contract as encoded; reused when present."""
    out = work / f"{codec}-{size}" / "shards"
    if (out / "manifest.parquet").is_file():
        return out
    from hiervl.dataprep import driver, synth

    manifest = synth.make_corpus(work / f"{codec}-{size}" / "corpus", n, seed=0, codec=codec, size=size,
                                 seconds=seconds)
    cfg = Config()
    cfg.prep.codec, cfg.prep.short_side, cfg.prep.shard_max_samples = "copy", size, 8
    driver.prepare(cfg, str(manifest), str(out), progress=False)
    return out


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and all its live descendants so far."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


# ---------------------------------------------------------------------------- contenders


class HiervlLoader:
    """`VideoTextLoader` over the train split with these data.* settings."""

    def __init__(self, shards: Path, batch: int, **data):
        from hiervl.data.loader import VideoTextLoader
        from hiervl.model.text_model import load_tokenizer

        cfg = Config()
        d = cfg.data
        d.path, d.batch_size, d.num_frames, d.size, d.short_side = str(shards), batch, T, SIZE, SHORT
        d.prefetch, d.remainder = 2, "pad"
        for k, v in data.items():
            setattr(d, k, v)
        self.loader = VideoTextLoader(cfg, split="train", tokenizer=load_tokenizer(cfg.model.text.path))
        self.epoch = 0

    def epoch_clips(self) -> int:
        self.loader.set_epoch(self.epoch)
        self.epoch += 1
        clips = sum(int(b["valid"].sum()) for b in self.loader)
        assert self.loader.stats["skipped"] == 0, self.loader.stats["skipped_reasons"]
        return clips

    def close(self) -> None:
        self.loader.close()


def _sample_bytes(sample: dict) -> bytes:
    return sample["webm" if "webm" in sample else "mp4"]


class NaiveDecode:
    """The old baseline: decode every frame, RGB for every frame (PyAV's default threads), keep T (linspace)."""

    def __call__(self, sample):
        import av

        with av.open(io.BytesIO(_sample_bytes(sample))) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        idx = np.linspace(0, len(frames) - 1, T).round().astype(int)
        return transform_clip(np.stack([frames[i] for i in idx]), SHORT, SIZE)


class TunedDecode:
    """What a competent user writes: one codec thread, the loader's frame choice (a random frame per
    segment), stop after the last wanted frame, RGB only for the kept frames with threads=1."""

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def __call__(self, sample):
        import av

        with av.open(io.BytesIO(_sample_bytes(sample))) as c:
            stream = c.streams.video[0]
            stream.codec_context.thread_count = 1
            packets = [p for p in c.demux(stream) if p.size]  # demux once: the frame count, then decode
            wanted = frame_indices(len(packets), T, self.rng)
            last, keep, got, i = int(wanted.max()), set(int(w) for w in wanted), {}, 0
            for pkt in packets + [None]:  # None: drain the decoder
                for frame in stream.codec_context.decode(pkt):
                    if i in keep:
                        got[i] = frame.to_ndarray(format="rgb24", threads=1)
                    i += 1
                if i > last:
                    break
        have = sorted(got)
        clip = np.stack([got[w] if w in got else got[have[-1]] for w in wanted.tolist()])
        return transform_clip(clip, SHORT, SIZE)


class WdsBaseline:
    """webdataset + DataLoader(num_workers=P, persistent) with `decode` mapped over the samples."""

    def __init__(self, shards: Path, batch: int, workers: int, decode):
        import webdataset as wds

        tars = sorted(str(p) for p in shards.glob("train-*.tar"))
        ds = wds.WebDataset(tars, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker,
                            empty_check=False).map(decode).batched(batch)
        self.dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=True)

    def epoch_clips(self) -> int:
        return sum(len(b) for b in self.dl)

    def close(self) -> None:
        self.dl = None


def contenders(shards: Path, codec: str, batch: int, p: int) -> dict:
    out = {"hiervl workers": lambda: HiervlLoader(shards, batch, decoder="pyav", decode_workers=p, num_threads=1),
           "hiervl threads": lambda: HiervlLoader(shards, batch, decoder="pyav", decode_workers=0, num_threads=p)}
    if codec == "vp9":
        out["hiervl dali"] = lambda: HiervlLoader(shards, batch, decoder="dali", decode_workers=0, num_threads=p)
    out["baseline tuned"] = lambda: WdsBaseline(shards, batch, p, TunedDecode())
    out["baseline naive"] = lambda: WdsBaseline(shards, batch, p, NaiveDecode())
    return out


def measure(c, min_seconds: float) -> dict:
    clips, load = 0, os.getloadavg()[0]
    cpu0, start = tree_cpu_seconds(), time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        clips += c.epoch_clips()
    el, cpu = time.perf_counter() - start, tree_cpu_seconds() - cpu0
    return {"clips": clips, "seconds": el, "clips_per_s": clips / el, "cpu_ms_per_clip": 1000 * cpu / max(clips, 1),
            "load": load}


def spread(values: list[float]) -> list[float]:
    return [min(values), statistics.median(values), max(values)]


def run_set(shards: Path, codec: str, size: int, batch: int, p: int, rounds: int, min_seconds: float) -> dict:
    torch.set_num_threads(p)
    built = {name: make() for name, make in contenders(shards, codec, batch, p).items()}
    try:
        for c in built.values():
            c.epoch_clips()  # warm-up epoch
        runs: dict[str, list] = {name: [] for name in built}
        for r in range(rounds):
            for name, c in built.items():
                res = measure(c, min_seconds)
                runs[name].append(res)
                print(f"  {codec:5s} {size:3d}px round {r + 1}  {name:15s} {res['clips_per_s']:7.1f} clips/s "
                      f"{res['cpu_ms_per_clip']:6.2f} ms CPU/clip  (load {res['load']:.1f})", flush=True)
    finally:
        for c in built.values():
            c.close()
    rows = {name: {"clips_per_s": spread([x["clips_per_s"] for x in got]),
                   "cpu_ms_per_clip": spread([x["cpu_ms_per_clip"] for x in got]), "runs": got}
            for name, got in runs.items()}
    ratios = {}
    for name in built:
        if name.startswith("hiervl"):
            for base in ("baseline tuned", "baseline naive"):
                ratios[f"{name} vs {base}"] = {
                    # > 1: hiervl uses less CPU per clip / delivers more clips per second
                    "cpu_efficiency": spread([b["cpu_ms_per_clip"] / h["cpu_ms_per_clip"]
                                              for h, b in zip(runs[name], runs[base])]),
                    "clips_per_s": spread([h["clips_per_s"] / b["clips_per_s"] for h, b in zip(runs[name], runs[base])])}
    ratios["baseline tuned vs baseline naive"] = {
        "cpu_efficiency": spread([n["cpu_ms_per_clip"] / t["cpu_ms_per_clip"]
                                  for t, n in zip(runs["baseline tuned"], runs["baseline naive"])]),
        "clips_per_s": spread([t["clips_per_s"] / n["clips_per_s"]
                               for t, n in zip(runs["baseline tuned"], runs["baseline naive"])])}
    return {"codec": codec, "size": size, "parallel": p, "batch": batch, "rows": rows, "ratios": ratios}


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
    """decord / torchcodec in their own venv (decode only: an upper bound for a loader built on them)."""
    import pandas as pd

    if not python or not Path(python).exists():
        return {"skipped": f"no peer venv at {python!r} (python3.11 -m venv /tmp/decbench && "
                           "/tmp/decbench/bin/pip install decord torchcodec torch)"}
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


def fmt(s: list[float], digits: int = 2) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in s)


def print_set(res: dict) -> None:
    print(f"\n{res['codec']} {res['size']} px, parallel {res['parallel']}: clips/s and CPU ms per clip, min / med / max")
    for name, row in res["rows"].items():
        print(f"  {name:15s} {fmt(row['clips_per_s'], 1):>22s} clips/s   {fmt(row['cpu_ms_per_clip']):>22s} ms/clip")
    print("  paired ratios (> 1: the first is cheaper / faster): CPU efficiency | clips/s")
    for pair, r in res["ratios"].items():
        print(f"  {pair:38s} {fmt(r['cpu_efficiency']):>20s} | {fmt(r['clips_per_s'])}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256], choices=sorted(DATASETS))
    ap.add_argument("--codecs", nargs="+", default=["h264", "vp9"], choices=["h264", "vp9"])
    ap.add_argument("--parallel", type=int, default=2, help="decode processes / threads / DataLoader workers")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=4.0, help="time each contender per round at least this long")
    ap.add_argument("--peer-python", default="/tmp/decbench/bin/python")
    ap.add_argument("--work", default="/tmp/hiervl-bench-decode")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "decode.json"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sets, peers = [], []
    for size in args.sizes:
        for codec in args.codecs:
            d = DATASETS[size]
            shards = make_shards(work, codec, size, d["num_videos"], d["seconds"])
            res = run_set(shards, codec, size, d["batch"], args.parallel, args.rounds, args.min_seconds)
            sets.append(res)
            print_set(res)
            for tool in ("decord", "torchcodec"):
                peer = run_peer(args.peer_python, tool, shards, args.parallel, args.min_seconds, work)
                peers.append({"codec": codec, "size": size, "tool": tool, **peer})
                what = peer.get("skipped") or f"{peer['clips_per_s']:.1f} clips/s (decode only)"
                print(f"  {tool}: {what}")
    out = {"argv": sys.argv[1:], "cpus": os.cpu_count(), "frames": T, "crop": SIZE, "short_side": SHORT,
           "datasets": DATASETS, "sets": sets, "peers": peers}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
