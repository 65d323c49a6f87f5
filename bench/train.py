"""Training throughput, checkpoint save/load time and data-wait share (issue #6).

Makes one small dataset (`hiervl synth` + `hiervl prep`), then for each world size W runs
`hiervl train` (DeepSpeed's launcher, W local ranks) for --steps steps and reads what the run
itself recorded:
- samples/s: the median of the per-step `samples_per_s` in metrics.jsonl, leaving out the first
  --warmup steps (start-up, first batches);
- data-wait share: the mean share of each step spent waiting for the loader (same steps);
- checkpoint save seconds: the final checkpoint's write time (status.json);
- checkpoint load seconds: a second command on the same out_dir with two more steps resumes from
  that checkpoint; its status.json holds the time of the resume (DeepSpeed load + client state).
A resume on another world size (W -> 1) is timed too, at --reshard-stage (ZeRO-2 by default, so it
goes through DeepSpeed's universal checkpoint conversion, timed apart from the load).

Prints a table, writes bench/out/train.json.

Examples:
  .venv/bin/python bench/train.py                         # CPU, tiny config, W=1 and W=2
  .venv/bin/python bench/train.py --config configs/base.yaml --worlds 1 --steps 50   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from hiervl_cli import run_hiervl, write_results


def _read_run(run: Path, warmup: int) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    steady = [r for r in rows if r["step"] > warmup] or rows
    status = json.loads((run / "status.json").read_text())
    return {"samples_per_s": statistics.median(r["samples_per_s"] for r in steady),
            "data_wait_share": statistics.fmean(r["data_wait_share"] for r in steady),
            "save_s": status.get("checkpoint_save_seconds"), "steps": status["step"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench-train", help="work folder (corpus, shards, one run per W)")
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--num-videos", type=int, default=160)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the averages")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reshard-stage", type=int, default=2,
                   help="ZeRO stage of the W -> 1 resume (0 loads directly; 1-3 convert to a universal checkpoint)")
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = p.parse_args()
    out = Path(args.out).resolve()
    shards = out / "shards"
    if not (shards / "dataset.json").is_file():
        run_hiervl(["synth", "--out", str(out / "corpus"), "--num-videos", str(args.num_videos), "--seed", "0"])
        run_hiervl(["prep", "--config", args.config, "--input", str(out / "corpus" / "manifest.csv"), "--out", str(shards)])

    rows = []
    for world in args.worlds:
        run = out / f"w{world}"
        shutil.rmtree(run, ignore_errors=True)

        def train(ranks: int, steps: int, out_dir: Path = run, extra: tuple = ()) -> float:
            return run_hiervl(["train", "--config", args.config, f"data.path={shards}", f"train.out_dir={out_dir}",
                    f"train.ranks={ranks}", f"train.steps={steps}", "train.log_every=1", "checkpoint.every_steps=0",
                    "eval.every_steps=0", *args.overrides, *extra], quiet=True)

        wall = train(world, args.steps)
        row = {"world": world, "wall_s": round(wall, 1), **_read_run(run, args.warmup)}
        train(world, args.steps + 2)  # resumes from the final checkpoint
        row["load_s"] = json.loads((run / "status.json").read_text()).get("resume_seconds")
        if world > 1:  # a W-rank ZeRO checkpoint resumed on one rank (universal checkpoint conversion + load)
            zrun, stage = out / f"w{world}-zero{args.reshard_stage}", (f"train.zero_stage={args.reshard_stage}",)
            shutil.rmtree(zrun, ignore_errors=True)
            train(world, 4, zrun, stage)
            reshard_wall = train(1, 6, zrun, stage)
            status = json.loads((zrun / "status.json").read_text())
            row.update(reshard_stage=args.reshard_stage, reshard_to_1_wall_s=round(reshard_wall, 1),
                       reshard_convert_s=status.get("universal_conversion_seconds"),
                       reshard_load_s=status.get("resume_seconds"))
        rows.append(row)

    print(f"\ntraining: {args.config}, {args.steps} steps, median over steps > {args.warmup}")
    print(f"| W | samples/s | data-wait share | checkpoint save s | checkpoint load s | W->1 (ZeRO-{args.reshard_stage}) "
          "convert s | W->1 load s | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world']} | {r['samples_per_s']:.1f} | {100 * r['data_wait_share']:.1f}% | {r['save_s']} | "
              f"{r['load_s']} | {r.get('reshard_convert_s', '-')} | {r.get('reshard_load_s', '-')} | {r['wall_s']} |")
    write_results("train", args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
