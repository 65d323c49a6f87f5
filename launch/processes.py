"""Child processes of `hiervl`: their environment, the local master port, and signal forwarding.

Owns: `child_env` (Hugging Face offline, no tokenizer threads, no Ray
usage stats: what every `hiervl` subprocess needs, set only where the caller's environment has not
set them), `host_rendezvous` (the master port, held by the launcher itself), `signal_ranks` and
`run_forwarding_signals` (SIGTERM/SIGUSR1 go to the rank processes, which checkpoint and exit 0,
not to DeepSpeed's launchers, which would kill them). `hiervl train`, `hiervl submit`, `hiervl demo`
and the bench/ scripts start their children through it.
Must not touch: what the children run (commands are built by their owners: deepspeed_launch, cli).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess

from hiervl.errors import UserError

RANK_MODULE = "hiervl.launch.train"  # what every training rank runs: `python -m hiervl.launch.train --config FILE`
OFFLINE_ENV = (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
               ("RAY_USAGE_STATS_ENABLED", "0"))


def child_env(env: dict | None = None, **extra: str) -> dict:
    """`env` (default: this process's) with the OFFLINE_ENV defaults where unset, then `extra` set
    as given. The children import the installed `hiervl` (no source tree on PYTHONPATH)."""
    env = dict(os.environ if env is None else env)
    for key, value in OFFLINE_ENV:
        env.setdefault(key, value)
    env.update(extra)
    return env


class PortInUse(UserError):
    """The master port a multi-node launch must use is taken on this host."""


def host_rendezvous(port: int, *, any_free: bool, timeout_s: float = 600.0):
    """Host the ranks' rendezvous store (torch's TCPStore server) in this launcher; returns
    (store, port, env) where env tells the ranks to join it as clients.

    Why: a port that is only checked and later bound by rank 0 is a race: two runs started in the
    same second both find 29500 free, one rank 0 dies with EADDRINUSE and its other ranks join the
    other run's store. Here the launcher binds the port before any rank starts and keeps it for the
    run (torch's `TORCHELASTIC_USE_AGENT_STORE`: every rank is a client of the launcher's store).
    `any_free` (a one-machine launch): `port` when free, else one the kernel picks atomically.
    Otherwise (node 0 of a multi-node job, whose port the other nodes were told) a taken `port` is
    one PortInUse line. Keep the returned store referenced until the ranks exit.
    """
    import datetime

    from torch.distributed import TCPStore

    def bind(p: int):
        return TCPStore("0.0.0.0", p, None, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False)

    try:
        store = bind(port)
    except RuntimeError as exc:  # torch's DistNetworkError: "... code: -98, name: EADDRINUSE"
        if "EADDRINUSE" not in str(exc) and "address already in use" not in str(exc).lower():
            raise
        if not any_free:
            raise PortInUse(f"launch.master_port {port} is already in use on {socket.gethostname()} (another run or "
                            "service holds it); stop that, or give every node another port: launch.master_port=N") from None
        store = bind(0)
    return store, store.port, {"TORCHELASTIC_USE_AGENT_STORE": "True"}


def runs_rank_module(cmdline: list[str]) -> bool:
    """Whether a command line is a training rank: `python ... -m RANK_MODULE ...`. The launchers
    above the ranks (DeepSpeed's runner and launcher, local_launch, pdsh_runner) name RANK_MODULE
    too, as an argument, but run another module."""
    return "-m" in cmdline and cmdline.index("-m") + 1 < len(cmdline) and cmdline[cmdline.index("-m") + 1] == RANK_MODULE


def signal_ranks(proc: subprocess.Popen, signum: int) -> int:
    """Send `signum` to the rank processes under `proc` (`runs_rank_module`, not the launchers);
    returns how many."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    sent = 0
    for child in children:
        try:
            if runs_rank_module(child.cmdline()):
                child.send_signal(signum)
                sent += 1
        except psutil.Error:
            pass
    return sent


def run_forwarding_signals(cmd: list[str], env: dict | None = None) -> int:
    """Run a launcher; SIGTERM/SIGUSR1 go to its ranks so they checkpoint and exit 0.

    The launcher starts with SIGUSR1 ignored (an ignored signal stays ignored across exec; the ranks
    install their own handler when training starts): SLURM delivers a signal to every process of a
    job step (srun forwards SIGUSR1 so, `--signal=USR1@T` too), and DeepSpeed's two launcher processes,
    which handle only SIGINT/SIGTERM, would die of it, failing the node's task while its ranks write
    their checkpoint."""
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(cmd, env=env)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: signal_ranks(proc, signum))
    return proc.wait()
