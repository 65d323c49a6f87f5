"""`hiervl train`: start training under DeepSpeed's launcher; `python -m hiervl.launch.train`: one rank.

`hiervl train` resolves the config, writes it to <out_dir>/config.yaml and starts
`train.ranks` local ranks with DeepSpeed's launcher, each running `python -m hiervl.launch.train`: the same
launcher command, environment and port as `hiervl submit local` (launch/deepspeed_launch.py,
launch/processes.py).
SIGTERM/SIGUSR1 sent to `hiervl train` are passed to the ranks themselves, which finish the
step, write a checkpoint and exit 0 (a preempted job is resubmitted with the same command).

Owns: `hiervl train` (the local launch) and one rank's entry point.
Must not touch: the launcher argv, child environment or signals (launch/deepspeed_launch.py,
launch/processes.py), or training (pipeline/train/).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hiervl.atomic_write import write_atomic
from hiervl.config import load_config, to_yaml
from hiervl.launch import deepspeed_launch as ds
from hiervl.launch import quiet_gc
from hiervl.storage import is_remote, open_store

HELP = "train a model with DeepSpeed (local ranks; resumes automatically)"
DESCRIPTION = """Train the hierarchical model on a prepared dataset (data.path) with DeepSpeed.

Starts train.ranks local ranks with DeepSpeed's launcher (CPU ranks use gloo; GPUs are used
when present). Checkpoints go to <train.out_dir>/checkpoints; a run pointed at an out_dir that
holds checkpoints resumes from the newest complete one (train.resume=auto), also with another
number of ranks. checkpoint.dir=s3://BUCKET/PREFIX (or gs://) puts checkpoints in an object store instead
(each rank uploads its own files; meta.json, then `latest`, last). Metrics: <out_dir>/metrics.jsonl and TensorBoard in <out_dir>/tensorboard.

Example:
  hiervl train --config configs/tiny.yaml data.path=runs/demo/shards train.steps=100 train.ranks=2
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print the launcher command and exit")


def main(args, cfg) -> int:
    """Check the run here (one line, exit 2, before any rank starts), write the resolved config
    with absolute paths, then start the ranks; --dry-run prints the command and creates nothing."""
    was_on = quiet_gc.off()  # this process imports torch, then only waits for the ranks (launch/quiet_gc.py)
    try:
        return _start(args, cfg)
    finally:
        quiet_gc.restore(was_on)  # for a caller in-process (tests)


def _start(args, cfg) -> int:
    import torch
    from hiervl.run_dir import CONFIG, absolute_paths
    from hiervl.train.global_batch import hold_global_batch
    from hiervl.train.preflight import check_training_run, resume_checkpoint, resumed_config

    # a resume keeps the checkpoint's train.global_batch: held here, so config.yaml is written once, as the ranks run
    resumed = resume_checkpoint(cfg)
    saved = resumed_config(resumed)
    cfg = hold_global_batch(cfg, saved)
    held = ((saved or {}).get("train") or {}).get("global_batch")
    check_training_run(cfg, world_size=cfg.train.ranks, held_from=str(resumed) if held else None)
    cfg = absolute_paths(cfg)  # the run folder's config.yaml and every checkpoint work from any directory
    config_path = Path(cfg.train.out_dir) / CONFIG  # written here once: the ranks read it
    gpus = torch.cuda.is_available()
    cmd = ds.local_command(cfg, config_path, nranks=cfg.train.ranks, gpus=gpus)
    if args.dry_run:
        print(ds.shell_join(cmd))
        return 0
    if is_remote(cfg.data.path):  # wrong credentials / a missing bucket: one line before any rank starts
        open_store(cfg.data.path, cfg.storage).check()
    if cfg.checkpoint.dir:  # checkpoints in an object store: it must take writes, said before any rank starts
        open_store(cfg.checkpoint.dir, cfg.storage).check(write=True)
    from hiervl.dataprep.out_lock import train_lock

    Path(cfg.train.out_dir).mkdir(parents=True, exist_ok=True)
    from hiervl.launch.slurm import refuse_active_job

    with train_lock(cfg.train.out_dir):  # a second `hiervl train` into this out_dir is refused in one line
        refuse_active_job(cfg.train.out_dir)  # and so is one into the folder of a queued or running SLURM job
        write_atomic(config_path, to_yaml(cfg))
        quiet_gc.started()  # its exit then skips torch's objects
        return ds.run_local(cfg, config_path, nranks=cfg.train.ranks, gpus=gpus)


def compiler_off() -> None:
    """train.compile is off: TorchDynamo is off in this rank (TORCHDYNAMO_DISABLE=1, unless already set).

    Why: with ZeRO on, `deepspeed.initialize` checks the optimizer against a list it completes by
    importing DeepSpeed's Muon optimizer, whose `@torch.compile` decorators load the inductor at import:
    ~0.6 s of CPU per rank (bench/RESULTS.md "Issue #22"), for kernels hiervl never runs. With dynamo off,
    `torch.compile` returns the function as it is. A process entry point's choice (like launch/quiet_gc.py),
    never library code's: a caller of `hiervl.train.trainer.run` keeps its own setting."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def rank_main(argv: list[str] | None = None, started=None) -> int:
    """One rank: `python -m hiervl.launch.train --config FILE [overrides]`. `started`: called once
    the trainer is built, before the first step (see `run`)."""
    parser = argparse.ArgumentParser(prog="python -m hiervl.launch.train", description="run one training rank")
    parser.add_argument("--config", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from hiervl.config import ConfigError
    from hiervl.errors import UserError
    from hiervl.eval.evaluate import evaluate_model
    from hiervl.run_dir import absolute_paths
    from hiervl.train.trainer import PeerLost, run

    try:
        cfg = absolute_paths(load_config(args.config, args.overrides))  # as `hiervl train` stores it
        if not cfg.train.compile:
            compiler_off()
        return run(cfg, evaluate=evaluate_model, started=started)  # the periodic eval, handed in: train/ does not import eval/
    except (ConfigError, UserError) as exc:
        # an error every rank raised alike (a checkpoint write, a resume plan) is reported by rank 0 alone
        if not getattr(exc, "same_on_every_rank", False) or os.environ.get("RANK", "0") == "0":
            print(f"hiervl train: error: {exc}", file=sys.stderr, flush=True)
        if isinstance(exc, PeerLost):
            sys.stdout.flush()
            os._exit(1)  # interpreter exit would tear down the broken process group, waiting on the lost peer
        return 2 if isinstance(exc, ConfigError) else 1


if __name__ == "__main__":
    quiet_gc.off()  # imports and the model build run without collections; the trainer, built, turns it on
    from hiervl.redact import RedactingStream

    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)  # a rank's tracebacks too
    code = rank_main(started=quiet_gc.started)
    quiet_gc.before_exit()  # exit skips the full collection over everything the rank holds
    sys.exit(code)
