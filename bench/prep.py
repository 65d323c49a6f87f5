"""Shard-preparation throughput: hiervl prep (Ray) vs video2dataset, same inputs, same transcode.
(The local process pool vs Ray: bench/prep_distributor.py.)

Inputs: the synthetic corpus as VP9/webm and as H.264/mp4 (`hiervl.dataprep.synth`). Transcode: short
side 48, 8 fps (configs/tiny.yaml), to VP9/webm (our default) and to H.264/mp4 (what
video2dataset's resolution + fps subsamplers write: ffmpeg's default libx264 into .mp4), with 1
and 2 workers. video2dataset runs from its own venv (default /tmp/v2d/bin/video2dataset,
see shared/ECOSYSTEM.md) on local paths, multiprocessing distributor, processes_count = workers.

Figures: videos/s and realtime factor (seconds of source video per wall second), both over the
whole command (Ray or Python start-up included) and over the work phase alone (after Ray start
for us; from video2dataset's own per-shard stats for it). Prints a table, writes
bench/out/prep.json.

Example: .venv/bin/python bench/prep.py --num-videos 300
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_ours(manifest: Path, out: Path, workers: int, codec: str, seconds_per_video: float) -> dict:
    import ray
    from hiervl.config import load_config
    from hiervl.dataprep.driver import prepare
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"prep.num_workers={workers}", f"prep.codec={codec}",
                                                      "prep.shard_max_samples=16", "prep.distributor=ray"])
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    s = prepare(cfg, manifest, out, progress=False)  # starts (and stops) its own local Ray
    wall = time.time() - t0
    assert not ray.is_initialized()
    n = s["samples_out"]
    return {"tool": "hiervl", "videos": n, "wall_s": wall, "work_s": s["task_seconds"],
            "videos_per_s": n / wall, "videos_per_s_work": n / s["task_seconds"],
            "realtime": s["source_seconds"] / wall, "realtime_work": s["source_seconds"] / s["task_seconds"]}


# video2dataset 1.3.0 reads `subsampler.encode_formats` but its Resolution/Frame subsamplers only set
# `encode_format`, so any config with a video subsampler fails every shard with AttributeError. A
# sitecustomize on PYTHONPATH (imported by its spawned workers too) adds the attribute the worker
# expects (same value: mp4); nothing else changes. Its FrameSubsampler is left out: in 1.3.0 it pops
# and re-adds the "video" stream while the worker iterates over the streams dict (RuntimeError:
# dictionary keys changed during iteration). The sources are 8 fps already, so our fps step
# (to 8) is a no-op on them and both tools do the same work: decode, scale to short side 48, encode.
_V2D_PATCH = """
try:
    from video2dataset import subsamplers as _s
    for _c in (_s.ResolutionSubsampler, _s.FrameSubsampler):
        _c.encode_formats = property(lambda self: {"video": self.encode_format})
except ImportError:
    pass
"""


def run_v2d(v2d: str, manifest: Path, out: Path, workers: int, seconds_per_video: float) -> dict:
    rows = list(csv.DictReader(open(manifest)))
    url_list = out.parent / f"{out.name}_urls.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(url_list, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        for r in rows:
            w.writerow([str(manifest.parent / r["video"]), json.loads(r["caption"])[0]])
    config = out.parent / f"{out.name}_v2d.yaml"
    config.write_text(f"""subsampling:
    ResolutionSubsampler:
        args: {{video_size: 48, resize_mode: scale}}
reading:
    yt_args: {{download_size: 360, download_audio_rate: 44100, yt_metadata_args: null}}
    timeout: 60
    sampler: null
storage:
    number_sample_per_shard: 16
    oom_shard_count: 5
    captions_are_subtitles: False
distribution:
    processes_count: {workers}
    thread_count: 4
    subjob_size: 1000
    distributor: multiprocessing
""")
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, WANDB_MODE="disabled", WANDB_SILENT="true")
    t0 = time.time()
    patch = out.parent / "v2d_patch"
    patch.mkdir(exist_ok=True)
    (patch / "sitecustomize.py").write_text(_V2D_PATCH)
    env["PYTHONPATH"] = str(patch)
    r = subprocess.run([v2d, f"--url_list={url_list}", "--input_format=csv", "--url_col=url",
                        "--caption_col=caption", f"--output_folder={out}", "--output_format=webdataset",
                        f"--config={config}", "--enable_wandb=False"], capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if r.returncode != 0:
        return {"tool": "video2dataset", "error": r.stderr[-2000:]}
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    n = sum(s.get("successes", 0) for s in stats)
    starts = [s["start_time"] for s in stats if "start_time" in s]
    ends = [s["end_time"] for s in stats if "end_time" in s]
    work = (max(ends) - min(starts)) if starts and ends else wall
    return {"tool": "video2dataset", "videos": n, "wall_s": wall, "work_s": work, "videos_per_s": n / wall,
            "videos_per_s_work": n / work if work else 0.0, "realtime": n * seconds_per_video / wall,
            "realtime_work": n * seconds_per_video / work if work else 0.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-videos", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each synthetic source video")
    ap.add_argument("--size", type=int, default=64, help="source frame side")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--work-dir", default="/tmp/hiervl-bench-prep")
    ap.add_argument("--v2d", default="/tmp/v2d/bin/video2dataset", help="video2dataset executable ('' to skip)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from hiervl.dataprep.synth import make_corpus
    work = Path(args.work_dir)
    sources = {}
    for codec in ("vp9", "h264"):
        t0 = time.time()
        sources[codec] = make_corpus(work / f"src_{codec}", args.num_videos, seed=0, codec=codec, size=args.size,
                                     seconds=args.seconds)
        print(f"sources: {args.num_videos} {codec} videos {args.size}px {args.seconds}s in {time.time() - t0:.1f}s")
    have_v2d = bool(args.v2d) and Path(args.v2d).exists()
    results = []
    for workers in [int(w) for w in args.workers.split(",")]:
        for src in ("vp9", "h264"):
            for target in ("vp9", "h264"):
                r = run_ours(sources[src], work / f"ours_{src}_{target}_{workers}", workers, target, args.seconds)
                results.append({"source": src, "target": target, "workers": workers, **r})
            if have_v2d:
                r = run_v2d(args.v2d, sources[src], work / f"v2d_{src}_{workers}", workers, args.seconds)
                results.append({"source": src, "target": "h264 (ffmpeg default)", "workers": workers, **r})
    print(f"\n{'tool':14} {'source':6} {'target':22} {'workers':>7} {'videos':>6} {'wall s':>7} {'v/s':>7} "
          f"{'v/s work':>8} {'RT x':>7} {'RT x work':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['tool']:14} {r['source']:6} {r['target']:22} {r['workers']:>7} ERROR {r['error'][-300:]}")
            continue
        print(f"{r['tool']:14} {r['source']:6} {r['target']:22} {r['workers']:>7} {r['videos']:>6} {r['wall_s']:>7.1f} "
              f"{r['videos_per_s']:>7.1f} {r['videos_per_s_work']:>8.1f} {r['realtime']:>7.1f} {r['realtime_work']:>9.1f}")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "prep.json").write_text(json.dumps({"args": vars(args), "cpus": os.cpu_count(), "results": results},
                                              indent=2))
    print(f"\nwrote {out / 'prep.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
