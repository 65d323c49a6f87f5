"""Step time while a checkpoint is saved: synchronous vs asynchronous save (checkpoint.async_save), one run.

    .venv/bin/python bench/async_checkpoint.py [--config demo] [--rounds 3] [--after 3]

Builds the demo's model (tiny.yaml with the demo's objective, as bench/checkpoint.py) in a one-rank
DeepSpeed engine (gloo, CPU) and trains it on random batches. Each round, in one process and on one
engine, three windows of `--after`+1 optimizer steps, in rotating order:

- `none`:  no save (the reference step time);
- `sync`:  the first step is followed by `checkpoint.save` (the synchronous save: write, hash, fsync,
  commit) before the next step starts;
- `async`: the first step is followed by `checkpoint.save(background=True)` (copy to host memory, then
  the write runs in a background thread while the next steps train); `checkpoint.finish` at the
  window's end collects it (its wait is counted in the window).

Per window: the wall seconds of the save step (step + whatever the save blocks), the mean of the
following steps, and the window's seconds per step (all of it, saves and waits included). Figures are
per round and paired (same round, same engine). Writes bench/out/async_checkpoint.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from checkpoint import build, init_one_rank  # noqa: E402  (bench/checkpoint.py: the demo model in a 1-rank engine)


def batch(cfg, b: int = 4) -> dict:
    d = cfg.data
    return {"video": torch.randn(b, d.num_frames, 3, d.size, d.size), "input_ids": torch.randint(1000, 2000, (b, d.max_words)),
            "attention_mask": torch.ones(b, d.max_words, dtype=torch.long), "video_ids": torch.arange(b),
            "valid": torch.ones(b, dtype=torch.bool)}


def train_step(engine, cfg) -> float:
    t0 = time.perf_counter()
    engine.backward(engine(batch(cfg))["loss"])
    engine.step()
    return time.perf_counter() - t0


def window(engine, cfg, mode: str, out: Path, step: int, after: int) -> dict:
    from hiervl import run_dir
    from hiervl.train import checkpoint as ckpt

    t_start = time.perf_counter()
    first = train_step(engine, cfg)
    save_s, job, wait_s, write_s = 0.0, None, 0.0, None
    if mode != "none":
        t0 = time.perf_counter()
        result = ckpt.save(engine, out, step, {"step": step}, {"rng": ckpt.rng_state()}, {"world_size": 1, "zero_stage": 0},
                           keep=2, background=mode == "async")
        save_s = time.perf_counter() - t0
        job = result if mode == "async" else None
    steps = [train_step(engine, cfg) for _ in range(after)]
    if job is not None:
        t0 = time.perf_counter()
        ckpt.finish(job)
        wait_s = time.perf_counter() - t0
        write_s = job.write_seconds
    total = time.perf_counter() - t_start
    if mode != "none":
        assert run_dir.verify(run_dir.checkpoint_dir(out), ckpt.tag_for(step)) is None
    return {"save_step_s": first + save_s, "blocked_s": save_s, "following_step_s": statistics.mean(steps),
            "finish_wait_s": wait_s, "background_write_s": write_s, "s_per_step": total / (after + 1),
            "load": os.getloadavg()[0]}


def spread(v):
    return [round(min(v), 3), round(statistics.median(v), 3), round(max(v), 3)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="demo")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--after", type=int, default=3, help="steps after the save step in each window")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "async_checkpoint.json"))
    args = ap.parse_args()
    from hiervl.config import load_config

    init_one_rank()
    cfg = load_config(args.config, [])
    engine = build(cfg, False)
    work = Path(args.work or tempfile.mkdtemp(prefix="hiervl-bench-async-ckpt-"))
    modes = ("none", "sync", "async")
    runs: dict[str, list] = {m: [] for m in modes}
    step = 0
    for r in range(args.rounds + 1):  # round 0 warms the page cache, allocator and writers up; not counted
        order = modes[r % 3:] + modes[:r % 3]
        for mode in order:
            step += 1
            res = window(engine, cfg, mode, work / "ckpt", step, args.after)
            if r:
                runs[mode].append(res)
                print(f"round {r} {mode:5s} save step {res['save_step_s']:.2f} s (blocked {res['blocked_s']:.2f} s)  "
                      f"following steps {res['following_step_s']:.2f} s  window {res['s_per_step']:.2f} s/step  "
                      f"finish wait {res['finish_wait_s']:.2f} s  background write {res['background_write_s'] or 0:.2f} s"
                      f"  (load {res['load']:.1f})", flush=True)
    summary = {m: {k: spread([x[k] for x in v]) for k in ("save_step_s", "blocked_s", "following_step_s", "s_per_step")}
               for m, v in runs.items()}
    summary["async"]["background_write_s"] = spread([x["background_write_s"] for x in runs["async"]])
    summary["async"]["finish_wait_s"] = spread([x["finish_wait_s"] for x in runs["async"]])
    s, a, n = runs["sync"], runs["async"], runs["none"]
    summary["paired"] = {
        "save_step_sync_over_async": spread([x["save_step_s"] / y["save_step_s"] for x, y in zip(s, a)]),
        "window_sync_over_async": spread([x["s_per_step"] / y["s_per_step"] for x, y in zip(s, a)]),
        "window_async_over_none": spread([y["s_per_step"] / z["s_per_step"] for y, z in zip(a, n)]),
        "window_sync_over_none": spread([x["s_per_step"] / z["s_per_step"] for x, z in zip(s, n)]),
        "following_async_over_none": spread([y["following_step_s"] / z["following_step_s"] for y, z in zip(a, n)]),
    }
    summary["loads"] = [round(x["load"], 1) for v in runs.values() for x in v]
    print(json.dumps(summary, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "runs": runs, "summary": summary}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
