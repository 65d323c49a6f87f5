"""Start-up and exit of a short `hiervl train`: this checkout against another commit, paired.

    .venv/bin/python bench/startup.py --base REV [--rounds 3] [--steps 25] [--config tiny.yaml]

A short run is mostly fixed cost: launcher processes, imports, the model build, the first batch,
then exit. Both contenders run the same `hiervl train --config CONFIG train.steps=N` (2 CPU ranks,
gloo) on the same prepared data (`hiervl synth` + `hiervl prep` with tiny.yaml, 160 videos, made
once): `new` is this checkout; `base` is REV, checked out once into a git worktree with a venv of
its own (the same installed dependencies, `pip install -e --no-deps`). Rounds alternate the order
(base new, new base, ...) so drift in the machine's load hits both alike; ratios are per round.

Per run, split at the run's own metrics.jsonl times:
- start-up: command start -> step 1 done (launchers, imports, model, DeepSpeed, loader, first batch);
- steps: step 1 done -> step N done;
- exit: step N done -> the command returned (final checkpoint, teardown of ranks and launchers);
each as wall seconds and as CPU seconds of the whole process tree (sampled every 0.1 s per process,
split at the same times), plus each process kind's CPU (the CLI, DeepSpeed's runner, the per-node
launcher, the ranks, the decode workers) and the peak summed RSS. The total CPU is also taken from
getrusage(RUSAGE_CHILDREN) as a check on the sampling. Writes bench/out/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("cli", "runner", "launcher", "rank", "workers")


def sh(*cmd, cwd=None, env=None, timeout=1800) -> str:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return res.stdout


def base_python(rev: str, work: Path) -> tuple[Path, str]:
    """A python whose `hiervl` is commit `rev` (a git worktree + venv made once under `work`)."""
    commit = sh("git", "rev-parse", "--verify", f"{rev}^{{commit}}", cwd=ROOT).strip()
    tree = work / f"base-{commit[:10]}"
    py = tree / ".venv" / "bin" / "python"
    if not py.is_file():
        if tree.exists():
            sh("git", "worktree", "remove", "--force", tree, cwd=ROOT)
        sh("git", "worktree", "add", "--detach", tree, commit, cwd=ROOT)
        sh(sys.executable, "-m", "venv", tree / ".venv")
        import torch  # the installed dependencies: the same for both contenders

        deps = Path(torch.__file__).resolve().parents[1]
        site = next((tree / ".venv" / "lib").glob("python*/site-packages"))
        (site / "zz_bench_deps.pth").write_text(f"{deps}\n")
        sh(py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", tree, cwd=tree)
    return py, commit


def prepare(py: Path, work: Path, videos: int) -> Path:
    shards = work / "shards"
    if not (shards / "manifest.parquet").is_file():
        sh(py, "-m", "hiervl.launch.cli", "synth", "--out", work / "corpus", "--num-videos", videos)
        sh(py, "-m", "hiervl.launch.cli", "prep", "--config", "tiny.yaml", "--input", work / "corpus" / "manifest.csv",
           "--out", shards)
    return shards


def kind(cmdline: list[str]) -> str:
    line = " ".join(cmdline)
    if "hiervl.launch.cli" in line:
        return "cli"
    if "deepspeed.launcher.runner" in line:
        return "runner"
    if "deepspeed.launcher.launch" in line or "hiervl.launch.local_launch" in line:
        return "launcher"
    if "-m" in cmdline and cmdline[cmdline.index("-m") + 1:][:1] == ["hiervl.launch.train"]:
        return "rank"
    return "workers"  # decode workers, their forkserver, multiprocessing's resource tracker


class TreeSampler(threading.Thread):
    """Every `period` s: each process's user+system CPU under `root` (last value kept after it
    exits), the tree's total, and the summed RSS."""

    def __init__(self, root: int, period: float = 0.1):
        super().__init__(daemon=True)
        self.root, self.period = psutil.Process(root), period
        self.procs: dict[int, psutil.Process] = {}
        self.cpu: dict[tuple[int, float], tuple[str, float]] = {}
        self.series: list[tuple[float, float]] = []  # (time, tree CPU s)
        self.peak_rss = 0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            self.sample()
            time.sleep(self.period)
        self.sample()

    def sample(self):
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            procs = []
        rss = 0
        for p in procs:
            try:
                key = (p.pid, p.create_time())
                with p.oneshot():
                    t = p.cpu_times()
                    rss += p.memory_info().rss
                    cmdline = p.cmdline()  # each time: a rank is first seen as its launcher's fork, before exec
                    name = kind(cmdline) if cmdline else self.cpu.get(key, ("workers", 0))[0]  # [] once exited
                self.cpu[key] = (name, t.user + t.system)
            except psutil.Error:
                pass
        self.peak_rss = max(self.peak_rss, rss)
        self.series.append((time.time(), sum(c for _, c in self.cpu.values())))

    def at(self, when: float) -> float:
        """Tree CPU seconds at time `when` (the first sample at or after it)."""
        for t, c in self.series:
            if t >= when:
                return c
        return self.series[-1][1]

    def by_kind(self) -> dict[str, float]:
        out = dict.fromkeys(KINDS, 0.0)
        for name, c in self.cpu.values():
            out[name] += c
        return out


def run(py: Path, shards: Path, out: Path, config: str, steps: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [str(py), "-m", "hiervl.launch.cli", "train", "--config", config, f"data.path={shards}",
           f"train.out_dir={out}", f"train.steps={steps}", "train.log_every=1", "checkpoint.every_steps=0",
           "eval.every_steps=0"]
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    log = open(out.parent / f"{out.name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    code = proc.wait(timeout=1800)
    t_end = time.time()
    sampler.done.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    log.close()
    if code != 0:
        return {"failed": (out.parent / f"{out.name}.log").read_text()[-3000:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first, last = rows[0]["time"], rows[-1]["time"]
    c_first, c_last, c_end = sampler.at(first), sampler.at(last), sampler.series[-1][1]
    return {"wall": {"startup": first - t0, "steps": last - first, "exit": t_end - last, "total": t_end - t0},
            "cpu": {"startup": c_first, "steps": c_last - c_first, "exit": c_end - c_last, "total": c_end},
            "cpu_rusage": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "cpu_by_kind": sampler.by_kind(), "peak_rss_mb": sampler.peak_rss / 2**20,
            "processes": sorted({name for name, _ in sampler.cpu.values()}), "load": load,
            "load_after": os.getloadavg()[0], "steps_logged": len(rows)}


def spread(v):
    return [round(min(v), 3), round(statistics.median(v), 3), round(max(v), 3)] if v else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the commit to compare against (e.g. the one before a change)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--videos", type=int, default=160)
    ap.add_argument("--config", default="tiny.yaml")
    ap.add_argument("--work", default="/tmp/hiervl-bench-startup")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "startup.json"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pythons = {"new": Path(sys.executable)}
    pythons["base"], commit = base_python(args.base, work)
    shards = prepare(pythons["new"], work, args.videos)
    runs: dict[str, list] = {"base": [], "new": []}
    for r in range(args.rounds):
        for name in (("base", "new") if r % 2 == 0 else ("new", "base")):
            res = run(pythons[name], shards, work / f"run-{name}-{r}", args.config, args.steps)
            runs[name].append(res)
            if "failed" in res:
                print(f"round {r + 1} {name}: FAILED\n{res['failed']}", flush=True)
                continue
            w, c, k = res["wall"], res["cpu"], res["cpu_by_kind"]
            print(f"round {r + 1} {name:4s} wall s: start-up {w['startup']:5.1f} steps {w['steps']:5.1f} exit "
                  f"{w['exit']:4.1f} total {w['total']:5.1f} | CPU s: start-up {c['startup']:5.1f} steps {c['steps']:5.1f} "
                  f"exit {c['exit']:4.1f} total {c['total']:5.1f} (rusage {res['cpu_rusage']:5.1f}) | "
                  + " ".join(f"{n} {k[n]:.1f}" for n in KINDS) + f" | peak RSS {res['peak_rss_mb']:.0f} MB "
                  f"| load {res['load']:.1f}->{res['load_after']:.1f}", flush=True)
    ratios = {}
    pairs = [(b, n) for b, n in zip(runs["base"], runs["new"]) if "failed" not in b and "failed" not in n]
    for fig in ("wall", "cpu"):
        for part in ("startup", "steps", "exit", "total"):
            ratios[f"{fig} {part}: base / new"] = spread([b[fig][part] / n[fig][part] for b, n in pairs])
            ratios[f"{fig} {part}: base - new (s)"] = spread([b[fig][part] - n[fig][part] for b, n in pairs])
    ratios["peak RSS MB: base - new"] = spread([b["peak_rss_mb"] - n["peak_rss_mb"] for b, n in pairs])
    print(json.dumps(ratios, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "base": commit, "runs": runs, "ratios": ratios},
                                         indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
