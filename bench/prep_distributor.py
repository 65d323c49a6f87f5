"""A small prep with and without Ray: wall time of `hiervl prep` on the local process pool vs a
local Ray cluster, paired in one run (issue #27 "prep without Ray", issue #22).

Each repeat runs the same prep twice, once per distributor, in alternating order (so load drift
hits both), each in a fresh Python process as a user's `hiervl prep` would (imports included),
into fresh folders; then checks that both folders hold the same bytes. Figures per run: wall
seconds of the command, the task seconds after the backend started (the summary's
`task_seconds`), and their difference (start-up: imports, reading, planning, pool or Ray start).

The last line derives `auto`'s threshold from the same run: the number of videos from which a Ray
start costs under 10% of the pool's wall time, at the measured work rate.

Example: .venv/bin/python bench/prep_distributor.py --num-videos 24 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN = """
import json, sys
from hiervl.config import load_config
from hiervl.dataprep.driver import prepare
cfg = load_config(sys.argv[1], [f"prep.distributor={sys.argv[4]}", f"prep.num_workers={sys.argv[5]}"])
s = prepare(cfg, sys.argv[2], sys.argv[3], progress=False)
print(json.dumps({k: s[k] for k in ("samples_out", "task_seconds", "distributor", "shards_run")}))
"""


def one(kind: str, manifest: Path, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", RUN, str(ROOT / "configs" / "tiny.yaml"), str(manifest), str(out), kind,
                        str(workers)], capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if r.returncode != 0:
        return {"kind": kind, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc {r.returncode}"}
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["distributor"] == kind, s
    return {"kind": kind, "wall_s": wall, "task_s": s["task_seconds"], "overhead_s": wall - s["task_seconds"],
            "videos": s["samples_out"]}


def files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-videos", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work-dir", default="/tmp/hiervl-bench-prep-distributor")
    args = ap.parse_args()
    from hiervl.dataprep.synth import make_corpus
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    manifest = make_corpus(work / "corpus", args.num_videos, seed=0, size=64, seconds=2.0)
    print(f"load before: {open('/proc/loadavg').read().split()[:3]}")
    runs = []
    for rep in range(args.repeats):
        order = ("local", "ray") if rep % 2 == 0 else ("ray", "local")
        res = {kind: one(kind, manifest, work / kind, args.workers) for kind in order}
        same = all("error" not in r for r in res.values()) and files(work / "local") == files(work / "ray")
        for kind in order:
            r = res[kind]
            runs.append({"repeat": rep, **r, "same_bytes": same})
            if "error" in r:
                print(f"repeat {rep} {kind:5}: ERROR {r['error']}")
            else:
                print(f"repeat {rep} {kind:5}: wall {r['wall_s']:6.1f} s, tasks {r['task_s']:5.1f} s, "
                      f"start-up {r['overhead_s']:5.1f} s, {r['videos']} videos; same bytes: {same}")
    print(f"load after: {open('/proc/loadavg').read().split()[:3]}")
    ok = {k: [r for r in runs if r["kind"] == k and "error" not in r] for k in ("local", "ray")}
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("wall_s", "task_s", "overhead_s")}
           for k, v in ok.items() if v}
    print(f"\n{'distributor':12} {'runs':>4} {'wall s':>7} {'tasks s':>8} {'start-up s':>10}   (medians)")
    for k, m in med.items():
        print(f"{k:12} {len(ok[k]):>4} {m['wall_s']:>7.1f} {m['task_s']:>8.1f} {m['overhead_s']:>10.1f}")
    failed = sum(1 for r in runs if "error" in r)
    print(f"failed runs: {failed} of {len(runs)}")
    if len(med) == 2:
        print(f"local / ray wall: {med['local']['wall_s'] / med['ray']['wall_s']:.2f}")
        extra = med["ray"]["overhead_s"] - med["local"]["overhead_s"]  # what Ray's start adds
        per_video = med["local"]["task_s"] / args.num_videos
        # Ray's extra start-up <= 10% of the pool's wall: extra <= 0.1 * (local overhead + n * per_video)
        n = max(0.0, (extra / 0.1 - med["local"]["overhead_s"]) / per_video) if per_video > 0 else float("inf")
        print(f"Ray adds {extra:.1f} s of start-up; work {per_video * 1000:.0f} ms/video with {args.workers} "
              f"workers: Ray's start is under 10% of the wall from ~{n:.0f} videos on")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "prep_distributor.json").write_text(json.dumps({"args": vars(args), "runs": runs, "medians": med},
                                                          indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
