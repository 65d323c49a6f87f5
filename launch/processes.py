"""Child processes of `hiervl`: their environment, the local master port, and signal forwarding.

Owns: `child_env` (Hugging Face offline, no tokenizer threads, no Ray
usage stats: what every `hiervl` subprocess needs, set only where the caller's environment has not
set them), `local_port` (the master port of a one-machine launch), `signal_ranks` and
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


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def local_port(configured: int) -> int:
    """The master port of a launch on this machine: `configured` (launch.master_port) when it is
    free, else a free one, so two local runs on one machine do not collide."""
    if _port_is_free(configured):
        return configured
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def signal_ranks(proc: subprocess.Popen, signum: int) -> int:
    """Send `signum` to the rank processes under `proc` (those running RANK_MODULE, not DeepSpeed's
    launchers, whose command lines name it too); returns how many."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    sent = 0
    for child in children:
        try:
            cmdline = child.cmdline()
            if RANK_MODULE in cmdline and not any(a.startswith("deepspeed.launcher") for a in cmdline):
                child.send_signal(signum)
                sent += 1
        except psutil.Error:
            pass
    return sent


def run_forwarding_signals(cmd: list[str], env: dict | None = None) -> int:
    """Run a launcher; SIGTERM/SIGUSR1 go to its ranks so they checkpoint and exit 0."""
    proc = subprocess.Popen(cmd, env=env)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: signal_ranks(proc, signum))
    return proc.wait()
