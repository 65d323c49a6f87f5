"""`hiervl train`: start training under DeepSpeed's launcher; `python -m launch.train`: one rank.

`hiervl train` resolves the config, writes it to <out_dir>/config.yaml and starts
`train.ranks` local ranks with DeepSpeed's launcher, each running `python -m launch.train`.
SIGTERM/SIGUSR1 sent to `hiervl train` are passed to the ranks themselves, which finish the
step, write a checkpoint and exit 0 (a preempted job is resubmitted with the same command).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from pipeline.config import load_config, to_yaml

HELP = "train a model with DeepSpeed (local ranks; resumes automatically)"
DESCRIPTION = """Train the hierarchical model on a prepared dataset (data.path) with DeepSpeed.

Starts train.ranks local ranks with DeepSpeed's launcher (CPU ranks use gloo; GPUs are used
when present). Checkpoints go to <train.out_dir>/checkpoints; a run pointed at an out_dir that
holds checkpoints resumes from the newest complete one (train.resume=auto), also with another
number of ranks. Metrics: <out_dir>/metrics.jsonl and TensorBoard in <out_dir>/tensorboard.

Example:
  hiervl train --config configs/tiny.yaml data.path=runs/demo/shards train.steps=100 train.ranks=2
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print the launcher command and exit")


def launcher_command(cfg, config_path: Path) -> list[str]:
    import torch

    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(_free_port())]
    if torch.cuda.is_available():
        cmd += ["--num_gpus", str(cfg.train.ranks)]
    else:
        cmd += ["--num_accelerators", str(cfg.train.ranks)]
    return cmd + ["--module", "launch.train", "--config", str(config_path)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _signal_ranks(proc: subprocess.Popen, signum: int) -> None:
    """Send `signum` to the rank processes only; DeepSpeed's launchers would kill the ranks and exit 1."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for child in children:
        try:
            cmdline = " ".join(child.cmdline())
            if "launch.train" not in cmdline or "deepspeed.launcher" in cmdline:
                continue  # not a rank process (the launchers' own command lines name launch.train too)
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def main(args, cfg) -> int:
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    cmd = launcher_command(cfg, config_path)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    config_path.write_text(to_yaml(cfg))
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(cmd, env=env)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: _signal_ranks(proc, signum))
    return proc.wait()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def rank_main(argv: list[str] | None = None) -> int:
    """One rank: `python -m launch.train --config FILE [overrides]`."""
    parser = argparse.ArgumentParser(prog="python -m launch.train", description="run one training rank")
    parser.add_argument("--config", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from pipeline.config import ConfigError
    from pipeline.errors import UserError
    from pipeline.train.trainer import run

    try:
        cfg = load_config(args.config, args.overrides)
        return run(cfg)
    except (ConfigError, UserError) as exc:
        print(f"hiervl train: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(rank_main())
