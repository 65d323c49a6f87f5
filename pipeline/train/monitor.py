"""Where a training run's figures go: metrics.jsonl (always), TensorBoard, and W&B when asked.

    monitor = Monitor.open(cfg, out_dir)        # rank 0 only
    monitor.log(record)                         # one metrics.jsonl line; every number also to TB / W&B
    monitor.close()

A record is one log step's dict (pipeline/train/trainer.py `_log_window`): step, loss, losses per
level, lr, samples/s, data-wait share, grad norm, temperature per level and, at an evaluation step,
"eval" (t2v/v2t R@1/5/10, MdR, MnR per level and fused). TensorBoard and W&B get each number under
its path: `loss/semantic`, `temperature/feature`, `eval/t2v/fused/R1`, ...

W&B (`train.wandb=PROJECT`): `wandb.init(project, dir=out_dir, mode)`; the mode is `train.wandb_mode`,
else the WANDB_MODE environment variable, else `offline` (nothing leaves the machine unless asked;
`wandb sync <out_dir>/wandb/offline-run-*` uploads later). The resolved config is the run's config.

Owns: writing metrics records to metrics.jsonl, TensorBoard and W&B.
Must not touch: what is measured (the trainer computes the record).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hiervl import run_dir
from hiervl.config import to_dict
from hiervl.log import get_logger

log = get_logger(__name__)
SKIP = ("step", "time", "epoch")  # kept in metrics.jsonl, not plotted


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """{"a": {"b": 1.0}, "c": 2} -> {"a/b": 1.0, "c": 2.0}: the numeric leaves, with their paths."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not (not prefix and key in SKIP):
            out[name] = float(value)
    return out


def tb_name(path: str) -> str:
    """The TensorBoard / W&B tag of a record path: the total loss is `loss/total`, a level's `loss/<level>`."""
    if path == "loss":
        return "loss/total"
    return "loss/" + path[len("losses/"):] if path.startswith("losses/") else path


def wandb_mode(cfg) -> str:
    return cfg.train.wandb_mode or os.environ.get("WANDB_MODE") or "offline"


class Monitor:
    def __init__(self, out_dir: Path, tb=None, wandb_run=None):
        self.out, self.tb, self.wandb = Path(out_dir), tb, wandb_run

    @classmethod
    def open(cls, cfg, out_dir: str | Path) -> "Monitor":
        out_dir = Path(out_dir)
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(out_dir / run_dir.TENSORBOARD))
        except ImportError:  # e.g. a bare GPU image: metrics.jsonl still has every figure
            log.warning("tensorboard is not installed: metrics go to %s only", out_dir / run_dir.METRICS)
            tb = None
        run = None
        if cfg.train.wandb:
            import hashlib

            import wandb  # presence checked at config load (TrainConfig)

            mode = wandb_mode(cfg)
            online = {"id": hashlib.sha1(str(out_dir.resolve()).encode()).hexdigest()[:16], "resume": "allow"} \
                if mode == "online" else {}  # a requeued run (same out_dir) continues the same W&B run
            run = wandb.init(project=cfg.train.wandb, dir=str(out_dir), mode=mode, config=to_dict(cfg),
                             name=out_dir.name, **online)
            log.info("W&B run %s (%s mode) in %s", run.name, mode, out_dir / "wandb")
        return cls(out_dir, tb, run)

    def log(self, record: dict) -> None:
        path = self.out / run_dir.METRICS
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        scalars = {tb_name(k): v for k, v in flatten(record).items()}
        step = int(record["step"])
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
