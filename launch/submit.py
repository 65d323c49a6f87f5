"""`hiervl submit {local,deepspeed,slurm,ray,status,cancel}`: one config, every backend.

Rendering lives in launch/deepspeed_launch.py, launch/slurm.py and launch/ray_job.py; this module
picks the backend, writes the resolved config (<train.out_dir>/config.yaml, so override values
never pass through a shell) and prints (--dry-run) or runs what was rendered.

One run folder, one training, as for `hiervl train`: `local`, `deepspeed` (pdsh, or node rank 0 of
--no-ssh) hold the run folder's train lock while they run, and `slurm` while it submits; each
refuses in one line, before config.yaml is written, when the folder is locked by a live
`hiervl train` / submission or its recorded SLURM job is still queued or running.

Owns: `hiervl submit`: choosing a backend and writing its files.
Must not touch: launcher argv (deepspeed_launch), environments and signals (processes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from hiervl import run_dir
from hiervl.atomic_write import write_atomic
from hiervl.config import load_config, to_yaml
from hiervl.errors import UserError
from hiervl.launch import deepspeed_launch as ds
from hiervl.launch.processes import run_forwarding_signals

HELP = "submit training (local, DeepSpeed hostfile, SLURM) or shard prep (Ray job); status/cancel SLURM jobs"
DESCRIPTION = """Render one config to a backend and run it (or print it with --dry-run):
  local      DeepSpeed's launcher on this machine (GPUs per node, else train.ranks CPU ranks)
  deepspeed  hostfile (--hosts a,b or --hostfile F) + DeepSpeed's launcher over pdsh; with --no-ssh
             one launcher per node (run each with --node-rank R); .deepspeed_env, per-rank logs
  slurm      sbatch script (preemption: SIGTERM -> checkpoint -> requeue -> auto resume); prints job id
  ray        shard prep (--input, --out) or training (--train) as a Ray job; exit code = job status
  status JOB / cancel JOB   squeue / scancel
Multi-node runs (deepspeed on other hosts, slurm --nodes > 1) need checkpoints every node sees, else they are
refused before any rank starts: checkpoint.dir=s3://BUCKET/PREFIX (nodes sharing no filesystem), train.out_dir
on a network filesystem (NFS, Lustre, GPFS, CephFS, ...), or launch.shared_fs=true to declare a folder shared.
Example: hiervl submit slurm --config configs/base.yaml --nodes 2 --gpus-per-node 8 launch.partition=gpu --dry-run"""

ACTIONS = ("local", "deepspeed", "slurm", "ray", "status", "cancel")


def _count(minimum: int, what: str):
    """An argparse type: an integer >= minimum (argparse reports anything else, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} {what}; give {minimum} or more")
        return value
    return parse


def _host_list(text: str) -> list[str]:
    """An argparse type: comma-separated host names or addresses, none empty, none twice."""
    names = [h.strip() for h in text.split(",")]
    if any(not h for h in names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty host name; give names like node1,node2")
    for name in names:
        _host(name)
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} names a host twice; each node once")
    return names


def _host(text: str) -> str:
    """An argparse type: one host name or IP address."""
    try:
        return ds.check_host(text.strip(), "host")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("host: ")) from None


def add_arguments(p) -> None:
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("job", nargs="?", help="status/cancel: the SLURM job id")
    p.add_argument("--nodes", type=_count(1, "nodes is too few"), help="launch.nodes (>= 1)")
    p.add_argument("--gpus-per-node", type=_count(0, "GPUs per node is negative"), help="launch.gpus_per_node (0: CPU ranks)")
    p.add_argument("--dry-run", action="store_true", help="print the script/commands and exit")
    p.add_argument("--hosts", type=_host_list, help="deepspeed: comma-separated hosts (first = master)")
    p.add_argument("--hostfile", help="deepspeed: an existing hostfile (`host slots=N` lines)")
    p.add_argument("--no-ssh", action="store_true", help="deepspeed: one launcher per node, no pdsh")
    p.add_argument("--node-rank", type=_count(0, "is not a node rank"), help="deepspeed --no-ssh: run this node's launcher")
    p.add_argument("--master-addr", type=_host, help="deepspeed: master address (default: the first host)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"), help="ray: dashboard address")
    p.add_argument("--input", help="ray prep: manifest"), p.add_argument("--out", help="ray prep: output folder")
    p.add_argument("--train", action="store_true", help="ray: submit training instead of prep")
    p.add_argument("--python", default="python", help="ray: python on the cluster (default: python)")
    p.add_argument("--no-follow", action="store_true", help="ray: submit and return without streaming logs")


def _run_or_print(args, cmds, env=None) -> int:
    for cmd in cmds:
        print(ds.shell_join(cmd), flush=True)
    if args.dry_run:
        return 0
    return max(run_forwarding_signals(cmd, env) for cmd in cmds)


def main(args, cfg) -> int:
    if args.action in ("status", "cancel"):
        from hiervl.launch import slurm
        if not args.job:
            raise UserError(f"submit {args.action} needs a job id: hiervl submit {args.action} 12345")
        print(slurm.status(args.job) if args.action == "status" else slurm.cancel(args.job))
        return 0
    if args.job:  # argparse put the first KEY=VALUE override into `job`: apply it too
        cfg = load_config(args.config, [args.job] + list(args.overrides))
    cfg.launch.nodes = cfg.launch.nodes if args.nodes is None else args.nodes
    cfg.launch.gpus_per_node = cfg.launch.gpus_per_node if args.gpus_per_node is None else args.gpus_per_node
    if args.action == "ray":
        from hiervl.launch import ray_job
        return ray_job.submit_cli(args, cfg)
    out = Path(cfg.train.out_dir).resolve()
    with contextlib.ExitStack() as held:
        if not args.dry_run and (args.action in ("local", "slurm") or not args.no_ssh or args.node_rank == 0):
            from hiervl.dataprep.out_lock import train_lock
            from hiervl.launch.slurm import refuse_active_job

            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(train_lock(out))  # a live `hiervl train` / submission here: one line
            refuse_active_job(out)  # the folder's SLURM job, queued or running: one line
        return _submit(args, cfg, out)


def _submit(args, cfg, out: Path) -> int:
    """Write config.yaml (not for --dry-run) and run or print the backend's commands."""
    gpus = cfg.launch.gpus_per_node > 0
    config_path, log_dir = out / run_dir.CONFIG, ds.rank_log_dir(out)
    if not args.dry_run and args.action in ("slurm", "deepspeed"):  # before anything is written or started
        from hiervl.launch.shared_checkpoints import check_shared_checkpoints

        if args.action == "slurm":
            check_shared_checkpoints(cfg, cfg.launch.nodes)
        else:
            hosts = ds.resolve_hosts(args.hostfile, args.hosts, out / "hostfile", 1)[0]
            check_shared_checkpoints(cfg, len(hosts), hosts)
    if not args.dry_run:
        write_atomic(config_path, to_yaml(cfg))
    env = ds.rank_env(gpus=gpus)
    if args.action == "local":
        nranks = cfg.launch.gpus_per_node if gpus else cfg.train.ranks
        if args.dry_run:
            return _run_or_print(args, [ds.local_command(cfg, config_path, nranks=nranks, gpus=gpus, log_dir=log_dir)])
        return ds.run_local(cfg, config_path, nranks=nranks, gpus=gpus, log_dir=log_dir, echo=True)
    if args.action == "slurm":
        from hiervl.launch import slurm
        script = slurm.render_sbatch(cfg, config_path, out)
        if args.dry_run:
            print(script, end="")
            return 0
        script_path = out / "submit.sbatch"
        write_atomic(script_path, script)
        job = slurm.submit(script_path)
        slurm.record_job(out, job)  # a later submission into this folder asks squeue about it
        print(f"submitted batch job {job} ({script_path})")
        return 0
    # deepspeed: hostfile + pdsh, or one launcher per node
    hosts, hostfile, text = ds.resolve_hosts(args.hostfile, args.hosts, out / "hostfile",
                                             cfg.launch.gpus_per_node if gpus else cfg.train.ranks)
    if text and not args.dry_run:
        write_atomic(hostfile, text)
    if len(hosts) != cfg.launch.nodes and args.nodes:
        raise UserError(f"--nodes {args.nodes} but the hostfile names {len(hosts)} hosts; make them agree")
    master = args.master_addr or hosts[0]
    if not args.dry_run:
        write_atomic(out / ".deepspeed_env", ds.deepspeed_env_text(env))
    env["DS_ENV_FILE"] = str(out / ".deepspeed_env")
    if not args.no_ssh:
        return _run_or_print(args, [ds.pdsh_command(cfg, config_path, hostfile, master_addr=master, log_dir=log_dir)], env)
    if args.node_rank is not None and args.node_rank >= len(hosts):
        raise UserError(f"--node-rank {args.node_rank} but the hostfile names {len(hosts)} hosts (ranks 0 to "
                        f"{len(hosts) - 1}); give one of those")
    ranks = range(len(hosts)) if args.node_rank is None else [args.node_rank]
    cmds = [ds.node_command(cfg, config_path, hostfile, node_rank=r, master_addr=master, log_dir=log_dir) for r in ranks]
    if args.node_rank is None and not args.dry_run:
        for r, cmd in zip(ranks, cmds):
            print(f"# on {hosts[r]}: {ds.shell_join(cmd)}")
        print("run each line on its node, or pass --node-rank R to run that node's launcher here")
        return 0
    if args.dry_run:
        return _run_or_print(args, cmds)
    print(ds.shell_join(cmds[0]), flush=True)
    return ds.run_node(cfg, cmds[0], node_rank=args.node_rank, env=env, hostfile=hostfile, log_dir=log_dir)

