"""Does the loader slow CPU training? `hiervl train` with the real loader vs an ideal one, paired.

    .venv/bin/python bench/train_loader.py [--rounds 2] [--steps 20] [--videos 160]

The ideal loader replays batches: the first epoch is decoded for real, later epochs replay those same
batches from memory (no decode, no transform), everything else identical. It is installed in the
ranks only by a `sitecustomize.py` this script writes to a temporary folder put on PYTHONPATH (the
DeepSpeed launcher passes it to the ranks) with HIERVL_BENCH_IDEAL=1: no knob in hiervl itself.

Contenders, each a full `hiervl train --config tiny.yaml` (2 ranks, gloo) on the demo's data
(`hiervl synth` + `hiervl prep` with tiny.yaml: VP9, 48 px short side):
- `real`: the current defaults (data.decode_workers=auto, data.decoder=auto);
- `real w0`: the previous defaults (data.decode_workers=0: DALI's CPU backend in the loader's
  thread for VP9), on the current code;
- `ideal`: replayed batches.
Per run, from the run's own metrics.jsonl (train.log_every=1): the median samples/s over the steps
after `--skip` (epoch 0 and start-up excluded), the mean data-wait and loader CPU shares, and the median
CPU seconds per sample of all ranks and their decode workers. On a loaded machine the wall samples/s of
separate runs swing several-fold with other jobs; CPU per sample does not, and ideal / real CPU per
sample is the real / ideal throughput a CPU-bound run gets on cores of its own. Rounds
run the contenders in turn; ratios are per round. Writes bench/out/train_loader.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SITE = r'''
import os
if os.environ.get("HIERVL_BENCH_IDEAL") == "1" and os.environ.get("LOCAL_RANK") is not None:
    from hiervl.data import loader as _loader

    _orig_iter = _loader.VideoTextLoader.__iter__

    def _iter(self):
        if not self.train:
            yield from _orig_iter(self)
            return
        cache = self.__dict__.setdefault("_bench_cache", {})
        key = self.position
        if self.epoch > 0 and key in cache:  # replay epoch 0's batches from this position
            for b in cache[key]:
                b = dict(b, epoch=self.epoch)
                self.position = b["position"]
                yield b
            return
        got = cache.setdefault(key, [])
        for b in _orig_iter(self):
            got.append(b)
            yield b

    _loader.VideoTextLoader.__iter__ = _iter
'''

CONTENDERS = {"real": [], "real w0": ["data.decode_workers=0"], "ideal": []}


def hiervl(*args: str, env=None, timeout=3600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hiervl.launch.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def prepare(work: Path, videos: int) -> Path:
    shards = work / "shards"
    if (shards / "manifest.parquet").is_file():
        return shards
    for args in (["synth", "--out", str(work / "corpus"), "--num-videos", str(videos)],
                 ["prep", "--config", "tiny.yaml", "--input", str(work / "corpus" / "manifest.csv"), "--out", str(shards)]):
        res = hiervl(*args)
        if res.returncode != 0:
            raise SystemExit(f"hiervl {args[0]} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return shards


def run(name: str, shards: Path, out: Path, steps: int, skip: int, site: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR="cpu")
    if name == "ideal":
        env.update(HIERVL_BENCH_IDEAL="1", PYTHONPATH=os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")])))
    load = os.getloadavg()[0]
    t0 = time.time()
    res = hiervl("train", "--config", "tiny.yaml", f"data.path={shards}", f"train.out_dir={out}", f"train.steps={steps}",
                 "train.log_every=1", "checkpoint.every_steps=0", "eval.every_steps=0", *CONTENDERS[name], env=env)
    wall = time.time() - t0
    if res.returncode != 0:
        return {"failed": (res.stdout[-1500:] + res.stderr[-2500:])}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = [r for r in rows if r["step"] > skip]
    return {"samples_per_s": statistics.median(r["samples_per_s"] for r in steady),
            "data_wait_share": statistics.fmean(r["data_wait_share"] for r in steady),
            "loader_cpu_share": statistics.fmean(r.get("loader_cpu_share", float("nan")) for r in steady),
            "cpu_s_per_sample": statistics.median(r.get("cpu_s_per_sample") or float("nan") for r in steady),
            "wall_s": wall, "load": load, "steps": len(steady)}


def spread(v):
    return [min(v), statistics.median(v), max(v)] if v else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip", type=int, default=5, help="steps left out of the figures (start-up, epoch 0)")
    ap.add_argument("--videos", type=int, default=160)
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    ap.add_argument("--work", default="/tmp/hiervl-bench-train-loader")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "train_loader.json"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shards = prepare(work, args.videos)
    site = Path(tempfile.mkdtemp(prefix="hiervl-ideal-"))
    (site / "sitecustomize.py").write_text(SITE)
    runs: dict[str, list] = {n: [] for n in args.contenders}
    for r in range(args.rounds):
        for name in args.contenders:
            res = run(name, shards, work / f"run-{name.replace(' ', '_')}-{r}", args.steps, args.skip, site)
            runs[name].append(res)
            if "failed" in res:
                print(f"round {r + 1} {name}: FAILED\n{res['failed']}", flush=True)
            else:
                print(f"round {r + 1} {name:8s} {res['samples_per_s']:6.2f} samples/s  data-wait "
                      f"{100 * res['data_wait_share']:4.1f}%  loader CPU {100 * res['loader_cpu_share']:4.1f}%  "
                      f"CPU {1000 * res['cpu_s_per_sample']:.0f} ms/sample  wall {res['wall_s']:.0f} s  "
                      f"(load {res['load']:.1f})", flush=True)
    ratios = {}
    for name in runs:
        if name != "ideal" and "ideal" in runs:
            ratios[f"{name} / ideal"] = spread([a["samples_per_s"] / b["samples_per_s"] for a, b in
                                                zip(runs[name], runs["ideal"]) if "failed" not in a and "failed" not in b])
        if name != "ideal" and "ideal" in runs:  # CPU per sample: what the run costs, whatever the load
            ratios[f"{name} / ideal, by CPU per sample"] = spread([
                b["cpu_s_per_sample"] / a["cpu_s_per_sample"] for a, b in zip(runs[name], runs["ideal"])
                if "failed" not in a and "failed" not in b])
    if "real" in runs and "real w0" in runs:
        ratios["real / real w0"] = spread([a["samples_per_s"] / b["samples_per_s"] for a, b in
                                           zip(runs["real"], runs["real w0"]) if "failed" not in a and "failed" not in b])
    print(json.dumps(ratios, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "runs": runs, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
