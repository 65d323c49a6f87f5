"""The demo's checkpoint: size and save time now vs before issue 27, paired in one run.

    .venv/bin/python bench/checkpoint.py [--config demo] [--rounds 3]

Builds the demo's model (`hiervl demo`'s config: tiny.yaml, `queue.objective=symmetric
queue.enabled=false`) in a one-rank DeepSpeed engine (gloo, CPU), takes one real optimizer step
(so AdamW's state exists), then saves it with `hiervl.train.checkpoint.save` in alternating rounds:

- `before`: what the code did before issue 27: the momentum copies (`video_key`, `text_key`) deep-
  copied into the model although the objective never reads them (so they are in the module state),
  and the manifest made by re-reading every file written to hash it (`checkpoint_hash.WriteRecorder`
  replaced by plain `torch.save`).
- `after`: the code as it is: no momentum copies, hashes computed while writing.

Per save: the checkpoint's bytes on disk, the save's wall seconds and this process's CPU seconds.
Ratios are per round (paired). The demo runs 2 ranks; with ZeRO stage 0 only rank 0 writes the
module and optimizer state (`mp_rank_00_model_states.pt`), so one rank writes the same big file.
Writes bench/out/checkpoint.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import socket
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


class _PlainRecorder:
    """The pre-issue-27 write path: torch.save, nothing recorded (the manifest re-reads every file)."""

    def __init__(self, root):
        self.files: dict = {}

    def save(self, obj, path, zipfile: bool = True) -> None:
        torch.save(obj, path)

    @contextlib.contextmanager
    def deepspeed(self, engine):
        yield


def build(cfg, with_copies: bool):
    import deepspeed
    from hiervl.model.hierarchical import build_model
    from hiervl.train.deepspeed_config import build_deepspeed_config, build_optimizer

    torch.manual_seed(0)
    model = build_model(cfg)
    if with_copies:  # as HierarchicalModel.__init__ did before: deep copies, frozen
        model.video_key, model.text_key = copy.deepcopy(model.video), copy.deepcopy(model.text)
        for p in list(model.video_key.parameters()) + list(model.text_key.parameters()):
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    ds = build_deepspeed_config(cfg, 1)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params,
                                      optimizer=build_optimizer(params, cfg, torch.device("cpu"), ds), config=ds)
    b, d = 4, cfg.data
    batch = {"video": torch.randn(b, d.num_frames, 3, d.size, d.size), "input_ids": torch.randint(1000, 2000, (b, d.max_words)),
             "attention_mask": torch.ones(b, d.max_words, dtype=torch.long), "video_ids": torch.arange(b),
             "valid": torch.ones(b, dtype=torch.bool)}
    engine.backward(engine(batch)["loss"])
    engine.step()
    return engine


def save_once(engine, out: Path, step: int, before: bool) -> dict:
    from hiervl import run_dir
    from hiervl.train import checkpoint as ckpt

    real = ckpt.WriteRecorder
    if before:
        ckpt.WriteRecorder = _PlainRecorder
    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        tag = ckpt.save(engine, out, step, {"step": step}, {"rng": ckpt.rng_state()},
                        {"world_size": 1, "zero_stage": 0}, keep=1)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        ckpt.WriteRecorder = real
    tag_dir = ckpt.checkpoint_dir(out) / tag
    files = {p.relative_to(tag_dir).as_posix(): p.stat().st_size for p in tag_dir.rglob("*") if p.is_file()}
    assert run_dir.verify(run_dir.checkpoint_dir(out), tag) is None
    return {"bytes": sum(files.values()), "files": files, "save_s": wall, "cpu_s": cpu, "load": os.getloadavg()[0]}


def spread(v):
    return [min(v), statistics.median(v), max(v)]


def init_one_rank() -> None:
    """A 1-rank gloo process group on a free local port (what DeepSpeed's engine needs to save)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="demo")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "checkpoint.json"))
    args = ap.parse_args()
    from hiervl.config import load_config

    init_one_rank()
    cfg = load_config(args.config, [])
    print(f"config {args.config}: queue.objective={cfg.queue.objective} queue.enabled={cfg.queue.enabled}", flush=True)
    engines = {"before": build(cfg, True), "after": build(cfg, False)}
    nparams = {k: sum(p.numel() for p in e.module.parameters()) for k, e in engines.items()}
    work = Path(args.work or tempfile.mkdtemp(prefix="hiervl-bench-ckpt-"))
    runs: dict[str, list] = {"before": [], "after": []}
    for r in range(args.rounds + 1):  # round 0 warms the page cache and the writers up; not counted
        for name, engine in engines.items():
            res = save_once(engine, work / name, r + 1, name == "before")
            if r:
                runs[name].append(res)
                print(f"round {r} {name:6s} {res['bytes'] / 1e6:7.1f} MB  save {res['save_s']:.2f} s  "
                      f"CPU {res['cpu_s']:.2f} s  (load {res['load']:.1f})", flush=True)
    b, a = runs["before"], runs["after"]
    summary = {"params": nparams, "mb": {k: v[0]["bytes"] / 1e6 for k, v in runs.items()},
               "files_after": a[0]["files"], "files_before": b[0]["files"],
               "save_s": {k: spread([x["save_s"] for x in v]) for k, v in runs.items()},
               "cpu_s": {k: spread([x["cpu_s"] for x in v]) for k, v in runs.items()},
               "save_ratio_before_over_after": spread([x["save_s"] / y["save_s"] for x, y in zip(b, a)]),
               "cpu_ratio_before_over_after": spread([x["cpu_s"] / y["cpu_s"] for x, y in zip(b, a)]),
               "loads": [x["load"] for x in b + a]}
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("files")}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "runs": runs, "summary": summary}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
