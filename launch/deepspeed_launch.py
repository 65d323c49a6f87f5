"""DeepSpeed launcher commands rendered from the config: local, hostfile (pdsh) and `--no_ssh` per node.

Every command is an argv list (never a shell string): the resolved config travels as a YAML file
(`<out_dir>/config.yaml`), so override values never pass through a shell. `shell_join` renders an
argv for printing (`--dry-run`) or for a script, quoting every word with `shlex.quote`.

`python -m hiervl.launch.deepspeed_launch node --hostfile H --master-addr A --config C` is the per-node
task of a SLURM job: it takes the node rank from SLURM_NODEID, runs DeepSpeed's launcher with
`--no_ssh`, and passes SIGTERM/SIGUSR1 straight to the rank processes (which finish the step,
checkpoint and exit 0) instead of letting the launcher kill them.

Owns: DeepSpeed launcher argv (local, pdsh, per node), hostfiles, `.deepspeed_env` and the SLURM
per-node task.
Must not touch: child environments and signals (launch/processes.py) or training.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import re
import shlex
import sys
from pathlib import Path

from hiervl.launch.processes import RANK_MODULE, child_env, host_rendezvous, run_forwarding_signals

LOCAL_LAUNCH_MODULE = "hiervl.launch.local_launch"  # DeepSpeed's per-node launcher, for local CPU runs

# Variables the ranks need on every node; DeepSpeed's pdsh runner exports what .deepspeed_env lists.
PROPAGATED_ENV = ("PYTHONPATH", "DS_ACCELERATOR", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "HF_HUB_OFFLINE",
                  "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "RAY_USAGE_STATS_ENABLED", "TORCH_EXTENSIONS_DIR",
                  # not NCCL/GLOO_SOCKET_IFNAME: one value for every node breaks nodes whose interfaces are
                  # named differently; each rank finds its node's own (launch.socket_ifname, distributed.py)
                  # object storage (pipeline/storage.py): where, never the keys (a file must not hold a secret;
                  # each node brings its own AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws or instance role)
                  "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")


def rank_log_dir(out_dir) -> Path:
    """Where DeepSpeed's launcher writes each rank's full stdout/stderr (the trainer's own
    logger writes <out_dir>/logs/rank{R}.log beside it)."""
    return Path(out_dir) / "logs" / "stdout"


def shell_join(argv) -> str:
    """One shell-safe line for an argv (every word quoted as needed)."""
    return " ".join(shlex.quote(str(a)) for a in argv)


def _base(python: str, port: int) -> list[str]:
    return [python, "-u", "-m", "deepspeed.launcher.runner", "--master_port", str(port)]


def _tail(config_path, log_dir=None) -> list[str]:
    tail = []
    if log_dir is not None:
        tail += ["--enable_each_rank_log", str(log_dir)]
    return tail + ["--module", RANK_MODULE, "--config", str(config_path)]


def local_command(cfg, config_path, *, nranks: int, gpus: bool, log_dir=None, python: str = sys.executable,
                  port: int | None = None) -> list[str]:
    """DeepSpeed's launcher on this machine with `nranks` ranks (GPUs when `gpus`, else CPU ranks);
    `hiervl train` and `hiervl submit local` both run it (`port`: the one `launch_local` holds;
    default launch.master_port, for printing).

    GPUs: DeepSpeed's runner (it also applies its CUDA_VISIBLE_DEVICES rules). CPU ranks: the
    command that runner would start, DeepSpeed's per-node launcher (`local_launch.py`), directly:
    one process less that imports torch and DeepSpeed (`runner_world_info` is what it computes)."""
    port = cfg.launch.master_port if port is None else port
    if gpus:
        return _base(python, port) + ["--num_gpus", str(nranks)] + _tail(config_path, log_dir)
    cmd = [python, "-u", "-m", LOCAL_LAUNCH_MODULE, f"--world_info={runner_world_info(nranks)}",
           "--master_addr=127.0.0.1", f"--master_port={port}", "--module",
           f"--enable_each_rank_log={log_dir}"]  # "None": no per-rank files (DeepSpeed's own default string)
    return cmd + ["--log_level=info", RANK_MODULE, "--config", str(config_path)]


def runner_world_info(nranks: int) -> str:
    """DeepSpeed's runner's `--world_info` for `nranks` local ranks (`--num_accelerators N`, no
    hostfile): {"localhost": [0..N-1]} as urlsafe base64 JSON (its `encode_world_info`)."""
    return base64.urlsafe_b64encode(json.dumps({"localhost": list(range(nranks))}).encode()).decode()


def run_local(cfg, config_path, *, nranks: int, gpus: bool, log_dir=None, echo: bool = False) -> int:
    """Run `local_command` with the rendezvous port held by this process for the whole run
    (launch.master_port when free, else any free one): two runs started together never collide."""
    from hiervl.launch.build_locks import clear_stale_build_locks

    env = rank_env(gpus=gpus)
    clear_stale_build_locks(env)  # an interrupted op build's lock would keep every rank waiting forever
    store, port, extra = host_rendezvous(cfg.launch.master_port, any_free=True)
    cmd = local_command(cfg, config_path, nranks=nranks, gpus=gpus, log_dir=log_dir, port=port)
    if echo:
        print(shell_join(cmd), flush=True)
    try:
        return run_forwarding_signals(cmd, {**env, **extra})
    finally:
        del store


def hostfile_text(hosts, slots: int) -> str:
    """DeepSpeed hostfile: one `host slots=N` line per node."""
    return "".join(f"{h} slots={slots}\n" for h in hosts)


_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def check_host(name: str, where: str) -> str:
    """`name` when it is a host name (dot-separated labels of letters, digits, '-', '_') or an IP
    address; else a ValueError naming `where` (argparse turns it into its usage error)."""
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        pass
    if not name or len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{where}: {name!r} is not a host name or IP address (letters, digits, '-', '.', e.g. node1 "
                         "or 10.0.0.1)")
    return name


def _read_hostfile(path: Path) -> list[str]:
    """Host names of a DeepSpeed hostfile (`host slots=N` lines, `#` comments), each line checked."""
    from hiervl.errors import UserError

    names = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        try:
            check_host(words[0], f"{path} line {number}")
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if len(words) > 2 or (len(words) == 2 and not re.fullmatch(r"slots=[1-9][0-9]*", words[1])):
            raise UserError(f"{path} line {number}: {line!r} is not `host slots=N` (N >= 1)")
        if words[0] in names:
            raise UserError(f"{path} line {number}: host {words[0]} is listed twice; each node once")
        names.append(words[0])
    if not names:
        raise UserError(f"hostfile {path} names no hosts; give `host slots=N` lines")
    return names


def resolve_hosts(hostfile, hosts, default_path, slots: int):
    """(hosts, hostfile path, hostfile text to write or None) from --hostfile FILE or --hosts a,b
    (a list already checked by `check_host`, or a comma-separated string)."""
    from hiervl.errors import UserError

    if hostfile:
        path = Path(hostfile).resolve()
        if not path.is_file():
            raise UserError(f"hostfile {path} does not exist; give `host slots=N` lines, or use --hosts a,b")
        return _read_hostfile(path), path, None
    if hosts:
        names = [h.strip() for h in hosts.split(",") if h.strip()] if isinstance(hosts, str) else list(hosts)
        return names, Path(default_path), hostfile_text(names, slots)
    raise UserError("submit deepspeed needs --hosts a,b or --hostfile FILE")


def pdsh_command(cfg, config_path, hostfile, *, master_addr: str, log_dir=None, python: str = sys.executable) -> list[str]:
    """One launcher that reaches every host of the hostfile over pdsh (passwordless ssh needed):
    DeepSpeed's runner with the remote command's words shell-quoted (launch/pdsh_runner.py), so a
    `;` or a space in train.out_dir reaches each node as text."""
    base = [python, "-u", "-m", "hiervl.launch.pdsh_runner", "--master_port", str(cfg.launch.master_port)]
    return (base + ["--hostfile", str(hostfile), "--launcher", "pdsh",
                                                     "--master_addr", master_addr] + _tail(config_path, log_dir))


def node_command(cfg, config_path, hostfile, *, node_rank: int, master_addr: str, log_dir=None,
                 python: str = sys.executable) -> list[str]:
    """The launcher for one node with `--no_ssh`: run it on node `node_rank` (0 holds the master)."""
    return (_base(python, cfg.launch.master_port) + ["--hostfile", str(hostfile), "--no_ssh",
                                                     "--node_rank", str(node_rank), "--master_addr", master_addr]
            + _tail(config_path, log_dir))


def node_ranks(hostfile, node_rank: int) -> list[int]:
    """The global ranks DeepSpeed's launcher gives node `node_rank` of a hostfile (slots in order)."""
    slots = []
    for line in Path(hostfile).read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            slots.append(int(words[1].split("=", 1)[1]) if len(words) > 1 else 1)
    first = sum(slots[:node_rank])
    return list(range(first, first + slots[node_rank]))


def rank_errors(log_dir, ranks, since: float) -> list[str]:
    """The `hiervl train: error:` lines of these ranks' stdout/stderr files (DeepSpeed's
    `--enable_each_rank_log`) written since `since`, once each: what the launcher's console lacks."""
    lines = []
    for rank in ranks:
        for path in sorted(Path(log_dir).glob(f"*_rank{rank}.log")):
            if path.stat().st_mtime >= since:
                for ln in path.read_text(errors="replace").splitlines():
                    if ln.startswith("hiervl train: error:") and ln not in lines:
                        lines.append(ln)
    return lines


def run_node(cfg, cmd, *, node_rank: int, env: dict, hostfile=None, log_dir=None) -> int:
    """Run one node's launcher (`node_command`). Node 0 holds the master port itself for the whole
    run (its ranks join that store as clients): a port already taken there is one line before any
    rank starts, not an EADDRINUSE traceback minutes into start-up on every node. When the ranks
    failed, their one-line errors (in the per-rank files) are repeated here."""
    import time

    from hiervl.launch.build_locks import clear_stale_build_locks

    clear_stale_build_locks(env)  # an interrupted op build's lock would keep every rank waiting forever
    store, extra = None, {}
    if node_rank == 0:
        store, _, extra = host_rendezvous(cfg.launch.master_port, any_free=False)
    started = time.time() - 1
    try:
        code = run_forwarding_signals(cmd, {**env, **extra})
    finally:
        del store
    if code != 0 and hostfile is not None and log_dir is not None:
        for line in rank_errors(log_dir, node_ranks(hostfile, node_rank), started):
            print(line, file=sys.stderr, flush=True)
    return code


def deepspeed_env_text(env: dict | None = None) -> str:
    """`.deepspeed_env` lines (KEY=VALUE) for the variables the ranks need on the other nodes."""
    env = os.environ if env is None else env
    lines = [f"{k}={env[k]}" for k in PROPAGATED_ENV if k in env]
    return "\n".join(lines) + "\n"


def rank_env(env: dict | None = None, gpus: bool = False) -> dict:
    """The environment for the launcher: `child_env` plus DS_ACCELERATOR (cuda or cpu) where unset, and on
    CPU ranks OMP_WAIT_POLICY=PASSIVE where unset.

    Why passive: CPU ranks share their cores with the decode workers (and, on a shared machine, with
    anyone). With OpenMP's default, a thread that reaches a parallel region's barrier spins while its
    partner waits for a core, and a step runs ~1,000 regions: one flat rank of 2 threads on 2 busy cores
    spent 0.10-0.20 CPU-s per sample against 0.021 with passive waits and 0.018 with one thread
    (bench/RESULTS.md "Issue #28: the demo trains flat"). libgomp reads it when torch loads, so it is set
    here, before any rank starts (and sent to other nodes' ranks with PROPAGATED_ENV)."""
    env = child_env(env)
    env.setdefault("DS_ACCELERATOR", "cuda" if gpus else "cpu")
    if not gpus:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def node_main(argv: list[str] | None = None) -> int:
    """SLURM per-node task: node rank from SLURM_NODEID, then DeepSpeed's launcher with --no_ssh."""
    p = argparse.ArgumentParser(prog="python -m hiervl.launch.deepspeed_launch node")
    p.add_argument("--hostfile", required=True)
    p.add_argument("--master-addr", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--echo", action="store_true", help="print the launcher command instead of running it")
    args = p.parse_args(argv)
    from hiervl.config import load_config

    cfg = load_config(args.config)
    node_rank = int(os.environ.get("SLURM_NODEID", "0"))
    cmd = node_command(cfg, args.config, args.hostfile, node_rank=node_rank, master_addr=args.master_addr,
                       log_dir=args.log_dir)
    if args.echo or os.environ.get("HIERVL_SUBMIT_ECHO") == "1":
        print(f"node {os.environ.get('SLURMD_NODENAME', '?')} rank {node_rank}: {shell_join(cmd)}", flush=True)
        return 0
    return run_node(cfg, cmd, node_rank=node_rank, env=rank_env(gpus=cfg.launch.gpus_per_node > 0),
                    hostfile=args.hostfile, log_dir=args.log_dir)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "node":
        sys.exit(node_main(sys.argv[2:]))
    print("usage: python -m hiervl.launch.deepspeed_launch node --hostfile H --master-addr A --config C", file=sys.stderr)
    sys.exit(2)
