"""Ablation: the four model presets trained with the same budget on the same synthetic data.

One corpus (`hiervl synth`) and one prepared dataset (`hiervl prep`) are made once; then each
preset (flat, hit, hcmi, hanet) is trained with `hiervl train` (same steps, ranks, batch, LR,
seed) and evaluated with `hiervl eval` on the held-out test split. The synthetic corpus is built
to need the hierarchy (groups of four videos that differ only in event order or direction), so
`flat` (one global embedding) should trail the hierarchical presets if the hierarchy helps.

Each preset runs once per training seed (`--seeds`: train.seed and data.seed; the corpus stays
the same), and the table gives the mean and the spread (min-max) over the seeds.

Prints a table of fused t2v/v2t R@1/5 and per-level t2v R@1, writes bench/out/ablation.json.

Example (about 10-15 minutes per seed on 2 cores with the defaults):
  .venv/bin/python bench/ablation.py --steps 150 --ranks 1 --num-videos 600 --seeds 0,1,2

`--task hierarchy|queue` runs instead the pre-registered in-memory trials of issue #28 (the real
model and objective on pre-rendered frames, bench/inmemory.py; arms in TASKS, bench/RESULTS.md
"Issue #28"): every arm with every seed, paired (same seed = same weights, batches, captions and
frames in every arm), one JSON line per run in --out/runs.jsonl (a rerun skips finished runs),
then a table of mean, spread and per-seed paired differences against the task's reference arm:
  .venv/bin/python bench/ablation.py --task hierarchy --seeds 0,1,2 --out /tmp/i28
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from hiervl.model.text_model import load_tokenizer
from hiervl_cli import run_hiervl, write_results

PRESETS = ("flat", "hit", "hcmi", "hanet")


def sibling_analysis(run: Path, shards: Path, split_name: str = "test") -> dict:
    """Where the fused text-to-video top-1 goes, against the corpus's groups of siblings.

    The figures are `hiervl eval`'s own (pipeline/eval/metrics.py `group_metrics`, ties pessimistic):
    `group_R1`: the top video is in the query's group (objects right); `sibling_R1`: among the
    query's own group, its video scores highest (order and direction right; chance = mean of
    1 / group size, 25% for full groups). Groups come from the manifest's `group` column; a
    dataset prepared before it falls back to the synthetic corpus's layout (key synthNNNNNN,
    group = N // hiervl.dataprep.synth.GROUP).
    """
    import dataclasses

    import torch
    from hiervl.data.loader import iter_eval
    from hiervl.dataprep.synth import GROUP
    from hiervl.eval.evaluate import embed_batches, load_groups
    from hiervl.eval.metrics import group_metrics
    from hiervl.run_dir import load_model_for_inference

    model, cfg = load_model_for_inference(run)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(shards)))
    with torch.no_grad():
        split = embed_batches(model, iter_eval(cfg, split=split_name, rank=0, world_size=1,
                                               batch_size=cfg.eval.batch_size, tokenizer=load_tokenizer(cfg.model.text.path)))
        sim = model.similarity(split.texts, split.videos)["fused"]  # [captions, videos]
    groups = load_groups(shards, split_name)
    video_group = [groups.get(k) if groups else int(k.removeprefix("synth")) // GROUP for k in split.keys]
    res = group_metrics(sim, split.caption_to_video.numpy(), video_group)
    return {"group_R1": res["group_R1"], "sibling_R1": res["sibling_R1"], "sibling_chance": res["chance"]["sibling_R1"]}


def group_figures(res: dict, run: Path, shards: Path) -> dict:
    """Group / sibling R@1 of the fused level from eval.json (hiervl eval computes them on grouped
    data), or from `sibling_analysis` for a dataset prepared without the `group` column."""
    groups = res.get("groups")
    if groups:
        fused = groups["levels"]["fused"]
        return {"group_R1": fused["group_R1"], "sibling_R1": fused["sibling_R1"],
                "sibling_chance": groups["chance"]["sibling_R1"]}
    return sibling_analysis(run, shards)


# Issue #28's pre-registered trials (bench/RESULTS.md "Issue #28"): corpus, budget, arms, metric.
# Arms are dotted overrides on configs/demo.yaml; the first arm is the reference of the paired differences.
TASKS = {
    "hierarchy": {  # multi-event corpus: captions name some events; sentence -> video and paragraph -> video
        "kind": "events", "num_videos": 600, "steps": 300,
        "common": ["data.batch_size=16", "data.max_words=48", "queue.enabled=false"],
        "arms": {"flat": ["model.preset=flat"],
                 "hit-fused-monotonic": ["model.preset=hit", "model.loss_on=fused", "model.token_align=monotonic"]},
        "metrics": ("sentence", "paragraph"),
    },
    "queue": {  # thousands of short low-res videos, a small batch: the queue supplies the negatives
        "kind": "pairs", "num_videos": 2000, "steps": 300,
        "common": ["model.preset=flat", "data.batch_size=8", "queue.size=1024", "queue.momentum=0.99",
                   "queue.mask_same_video=true"],
        "arms": {"no-queue": ["queue.objective=symmetric", "queue.enabled=false"],
                 "queue-both": ["queue.objective=both", "queue.enabled=true"],
                 # issue #28 second session, secondary (registered in RESULTS before it ran): the query's
                 # siblings in the queue are not negatives
                 "queue-both-group": ["queue.objective=both", "queue.enabled=true", "queue.mask_same_group=true"]},
        "metrics": ("sentence",),
    },
}


def in_memory_main(args) -> int:
    """Run a TASKS entry: every arm x seed, paired; print the table; rows in OUT/runs.jsonl."""

    import torch
    from hiervl.config import load_config
    from inmemory import corpus_tensors, train_and_eval

    torch.set_num_threads(max(1, args.threads))
    task = TASKS[args.task]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    done = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    seeds = [int(x) for x in args.seeds.split(",") if x]
    steps = args.steps_override or task["steps"]
    arms = [a for a in task["arms"] if not args.arms or a in args.arms.split(",")]
    for seed in seeds:  # seed-major: a partial grid still holds complete pairs
        for arm in arms:
            if any(r["task"] == args.task and r["arm"] == arm and r["seed"] == seed and r["steps"] == steps for r in done):
                continue
            cfg = load_config(args.config, [*task["common"], *task["arms"][arm], f"train.steps={steps}", *args.overrides])
            data = corpus_tensors(task["kind"], task["num_videos"], args.seed, cfg, out / "cache")
            print(f"+ {args.task} arm={arm} seed={seed} steps={steps}", flush=True)
            row = {"task": args.task, "arm": arm, "seed": seed, "steps": steps,
                   **train_and_eval(cfg, data, seed, log_every=args.log_every)}
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            done.append(row)
    rows = [r for r in done if r["task"] == args.task and r["steps"] == steps and r["seed"] in seeds]
    print(in_memory_table(rows, args.task, arms))
    return 0


def in_memory_table(rows: list[dict], task: str, arms: list[str]) -> str:
    """Markdown: per arm, mean (min-max) over seeds of each metric, and paired differences vs arms[0]."""
    import statistics as st

    spec = TASKS[task]
    ref = arms[0]
    by = {(r["arm"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    n = rows[0]["num_videos"] if rows else 0

    def cell(xs):
        return "-" if not xs else (f"{xs[0]:.1f}" if len(xs) == 1 else f"{st.mean(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})")

    metrics = [(m, lambda r, m=m: r[m]["fused"]) for m in spec["metrics"]]
    metrics += [("sibling R@1", lambda r: r["sibling_R1"]), ("order %", lambda r: r["order"]),
                ("train s", lambda r: r["train_s"])]
    lines = [f"{task} task ({spec['kind']} corpus, {n} test videos; R@1 chance {100 / max(n, 1):.2f}%, sibling chance 25%): "
             f"seeds {seeds}; cells mean (min-max); delta = arm - {ref} per seed (paired)",
             "| arm | " + " | ".join(f"{m} R@1" if m in spec["metrics"] else m for m, _ in metrics) + " | per-level sentence R@1 |",
             "|---|" + "---|" * (len(metrics) + 1)]
    for arm in arms:
        rs = [by[(arm, s)] for s in seeds if (arm, s) in by]
        if not rs:
            continue
        levels = ", ".join(f"{k} {cell([r['sentence'][k] for r in rs])}" for k in rs[0]["sentence"] if k != "fused")
        lines.append(f"| {arm} | " + " | ".join(cell([f(r) for r in rs]) for _, f in metrics) + f" | {levels} |")
    for arm in arms[1:]:
        for m, f in metrics[:len(spec["metrics"])]:
            d = [f(by[(arm, s)]) - f(by[(ref, s)]) for s in seeds if (arm, s) in by and (ref, s) in by]
            if d:
                lines.append(f"\n{arm} - {ref}, {m} R@1 per seed: {', '.join(f'{x:+.1f}' for x in d)}; "
                             f"mean {st.mean(d):+.1f}; every seed favours {arm}: {all(x > 0 for x in d)}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=tuple(TASKS), help="an issue #28 in-memory trial instead of the hiervl-run ablation")
    p.add_argument("--arms", default="", help="--task: comma-separated subset of the task's arms")
    p.add_argument("--threads", type=int, default=1, help="--task: torch threads")
    p.add_argument("--log-every", type=int, default=50, help="--task: print the mean loss every N steps")
    p.add_argument("--steps-override", type=int, default=0, help="--task: other than the pre-registered steps")
    p.add_argument("--out", default="runs/ablation", help="work folder (corpus, shards, one run per preset)")
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--num-videos", type=int, default=600)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="corpus seed (hiervl synth --seed)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (train.seed and data.seed), e.g. 0,1,2")
    p.add_argument("--kind", choices=("pairs", "events"), default="pairs",
                   help="synthetic corpus kind (hiervl synth --kind): pairs, or events (3-5 events, partial captions)")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated subset of " + ",".join(PRESETS))
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for every preset")
    args = p.parse_args()
    if args.task:
        if args.config == "configs/tiny.yaml":
            args.config = "configs/demo.yaml"
        return in_memory_main(args)
    out = Path(args.out).resolve()
    presets = [x for x in args.presets.split(",") if x]
    if not (out / "shards" / "dataset.json").is_file():
        run_hiervl(["synth", "--out", str(out / "corpus"), "--num-videos", str(args.num_videos), "--seed", str(args.seed),
                    "--kind", args.kind])
        run_hiervl(["prep", "--config", args.config, "--input", str(out / "corpus" / "manifest.csv"),
              "--out", str(out / "shards")])
    seeds = [int(x) for x in args.seeds.split(",") if x]
    rows = []
    for preset in presets:
        for seed in seeds:
            run = out / (preset if seed == 0 else f"{preset}-seed{seed}")
            common = ["--config", args.config, f"model.preset={preset}", f"data.path={out / 'shards'}",
                      f"train.out_dir={run}", f"train.steps={args.steps}", f"train.ranks={args.ranks}",
                      f"train.seed={seed}", f"data.seed={seed}", "checkpoint.every_steps=0", *args.overrides]
            timing = run / "ablation-train-seconds.json"  # a rerun reuses a finished run's training
            status = json.loads((run / "status.json").read_text()) if (run / "status.json").is_file() else {}
            if timing.is_file() and status.get("state") == "finished" and status.get("step") == args.steps:
                train_s = json.loads(timing.read_text())["seconds"]
            else:
                train_s = run_hiervl(["train", *common])
                timing.write_text(json.dumps({"seconds": train_s}) + "\n")
            if not (run / "eval-test" / "eval.json").is_file():
                run_hiervl(["eval", *common, "--checkpoint", str(run), "--data", str(out / "shards"), "--split", "test",
                            "--out", str(run / "eval-test"), "--no-export"])
            res = json.loads((run / "eval-test" / "eval.json").read_text())
            rows.append({"preset": preset, "seed": seed, "train_s": round(train_s, 1), "num_videos": res["num_videos"],
                         "t2v": {k: res["t2v"]["fused"][k] for k in ("R1", "R5", "R10", "MdR")},
                         "v2t": {k: res["v2t"]["fused"][k] for k in ("R1", "R5", "R10", "MdR")},
                         "t2v_R1_per_level": {lv: m["R1"] for lv, m in res["t2v"].items()},
                         "order": (res.get("order") or {}).get("fused", {}).get("order", float("nan")),
                         **group_figures(res, run, out / "shards")})
    n = rows[0]["num_videos"] if rows else 0

    def cell(values: list[float]) -> str:
        """mean (min-max) over the seeds; just the value for one seed."""
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{statistics.mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    print(f"\nablation ({args.kind} corpus): {args.steps} steps x {args.ranks} rank(s), seeds {seeds}, {n} test videos "
          f"(t2v R@1 chance {100 / max(n, 1):.2f}%); cells: mean (min-max) over the seeds")
    print("| preset | t2v R@1 | t2v R@5 | v2t R@1 | t2v R@1 per level | group R@1 | sibling R@1 | order % | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in presets:
        rs = [r for r in rows if r["preset"] == preset]
        levels = ", ".join(f"{k} {cell([r['t2v_R1_per_level'][k] for r in rs])}" for k in rs[0]["t2v_R1_per_level"]
                           if k != "fused")
        print(f"| {preset} | {cell([r['t2v']['R1'] for r in rs])} | {cell([r['t2v']['R5'] for r in rs])} | "
              f"{cell([r['v2t']['R1'] for r in rs])} | {levels} | {cell([r['group_R1'] for r in rs])} | "
              f"{cell([r['sibling_R1'] for r in rs])} (chance {rs[0]['sibling_chance']:.1f}) | "
              f"{cell([r['order'] for r in rs])} | {statistics.mean(r['train_s'] for r in rs):.0f} |")
    write_results("ablation", args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
