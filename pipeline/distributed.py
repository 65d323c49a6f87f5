"""The one place that talks to `torch.distributed`.

World information comes from whichever launcher started us (torchrun and DeepSpeed's launcher
set RANK/WORLD_SIZE/LOCAL_RANK; SLURM sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; Open MPI
and MPICH set OMPI_COMM_WORLD_* / PMI_*). Everything else in the code base calls the helpers
here, so a single process (no launcher) runs the same code with world size 1.

Owns: every collective, rank and world-size query, and device routing for backends.
Must not touch: model, data or training logic.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single"  # which launcher's variables were read


_ENV_SCHEMES = (
    # (source, rank var, world var, local rank var)
    ("torchrun/deepspeed", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
)


def world_info(env: dict | None = None) -> WorldInfo:
    """Read rank / world size / local rank from the launcher's environment variables."""
    env = os.environ if env is None else env
    for source, rank_var, world_var, local_var in _ENV_SCHEMES:
        if rank_var in env and world_var in env:
            return WorldInfo(int(env[rank_var]), int(env[world_var]), int(env.get(local_var, 0)), source)
    return WorldInfo()


# how many ranks share this node, by launcher: torchrun, DeepSpeed's per-node launcher, Open MPI, MPICH,
# SLURM (srun); the first one set wins
_LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                    "SLURM_NTASKS_PER_NODE")


def _count(env: dict, var: str) -> int | None:
    """`env[var]` as a positive whole number; None when it is unset, empty or anything else."""
    value = str(env.get(var, "")).strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def local_world_size(env: dict | None = None) -> int:
    """The number of ranks on this node, from the launcher's environment (1 without a launcher)."""
    env = os.environ if env is None else env
    return next((n for var in _LOCAL_SIZE_VARS if (n := _count(env, var)) is not None), 1)


def cpu_threads_per_rank(env: dict | None = None, cores: int | None = None) -> int:
    """Torch's intra-op threads for one CPU rank: OMP_NUM_THREADS when it is set (the user's choice, or
    DeepSpeed's --bind_cores_to_rank), else this process's usable cores split evenly over the node's ranks.

    Why it matters: more compute threads than cores is not just slower. OpenMP's workers spin at each
    parallel region's barrier while their partner waits for a core, and a CPU step runs ~1,000 regions:
    two ranks of two threads each on two cores spent 4-9x the CPU per sample of one thread each
    (bench/RESULTS.md, "Issue #28: the demo trains flat")."""
    env = os.environ if env is None else env
    if (threads := _count(env, "OMP_NUM_THREADS")) is not None:
        return threads
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_world_size(env))


def export_env(info: WorldInfo, master_addr: str | None = None, master_port: int | None = None) -> None:
    """Set RANK/WORLD_SIZE/LOCAL_RANK (and master) so torch/DeepSpeed find them (SLURM, MPI)."""
    os.environ["RANK"] = str(info.rank)
    os.environ["WORLD_SIZE"] = str(info.world_size)
    os.environ["LOCAL_RANK"] = str(info.local_rank)
    if master_addr:
        os.environ.setdefault("MASTER_ADDR", master_addr)
    if master_port:
        os.environ.setdefault("MASTER_PORT", str(master_port))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def skip_deepspeed_shm_op() -> None:
    """On a machine without CUDA, keep DeepSpeed from JIT-compiling its `deepspeed_shm_comm` C++ op
    when its communication backend starts (minutes on a first run, silently, into a build cache that
    every checkout shares). The op serves only DeepSpeed's inference all-reduce; our collectives and
    the engine's gradient all-reduce go through torch.distributed (gloo), which it does not touch."""
    if torch.cuda.is_available():
        return
    import importlib

    # by module name: the attribute `deepspeed.comm.torch` is the torch package itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def route_to(master_addr: str) -> tuple[str, str | None]:
    """(this host's address on the way to `master_addr`, the interface that holds it or None):
    the kernel's route, read with an unconnected UDP socket (no packet is sent)."""
    import psutil

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(master_addr), 9))
        addr = s.getsockname()[0]
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == addr for a in addrs):
            return addr, name
    return addr, None


def spans_hosts(env: dict | None = None) -> bool:
    """Whether this world has ranks on other hosts: WORLD_SIZE above the ranks on this node
    (DeepSpeed's LOCAL_SIZE, torchrun's LOCAL_WORLD_SIZE, SLURM's SLURM_NNODES)."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    if "SLURM_NNODES" in env and "RANK" not in env:
        return int(env["SLURM_NNODES"]) > 1
    local = env.get("LOCAL_SIZE") or env.get("LOCAL_WORLD_SIZE")
    return local is not None and world > int(local)


def interface_addr(name: str) -> str | None:
    """The first IPv4 address of interface `name` (the first of a comma-separated list), or None."""
    import psutil

    addrs = psutil.net_if_addrs().get(name.split(",")[0], [])
    return next((a.address for a in addrs if a.family == socket.AF_INET), None)


def outward_interface() -> tuple[str | None, str | None]:
    """(address, name) of the interface other hosts reach this one by, when the master's name
    resolves to loopback here (this node is the master; Debian's `127.0.1.1 hostname` line): the
    first interface that is up, not loopback and has an IPv4 address."""
    import psutil

    stats = psutil.net_if_stats()
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        if name == "lo" or not stats.get(name) or not stats[name].isup:
            continue
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return a.address, name
    return None, None


def socket_ifname(setting: str, master_addr: str | None, hostname: str | None = None,
                  multi_host: bool | None = None) -> str | None:
    """The network interface this node's gloo/NCCL sockets use (GLOO/NCCL_SOCKET_IFNAME), per node.

    `setting` is launch.socket_ifname: "auto" (the interface of the route to the master, found on
    each node: nodes whose interfaces are named differently, eno1 here and ens5 there, each get
    their own; on the master itself, whose name may resolve to loopback, the interface other hosts
    reach it by; None for a one-machine run), one name for every node, or per host
    "n1:eno1,n2:ens5" (this host's short name picks). A ConfigError names a host left out.
    """
    from hiervl.config import ConfigError

    hostname = (hostname or socket.gethostname()).split(".")[0]
    if setting == "auto":
        multi_host = spans_hosts() if multi_host is None else multi_host
        if not master_addr or not multi_host:
            return None
        if _is_loopback(master_addr):
            if master_addr == "localhost" or _is_ip(master_addr):
                return None  # loopback named as such: every "node" is on this machine
            return outward_interface()[1]  # this node is the master, and its name maps to 127.0.1.1 here
        try:
            return route_to(master_addr)[1]
        except OSError:
            return None  # the master's name does not resolve here: torch's rendezvous reports that
    if ":" not in setting:
        return setting
    table = dict(item.split(":", 1) for item in setting.split(","))
    if hostname not in table:
        raise ConfigError(f"launch.socket_ifname={setting} names no interface for this host {hostname}; "
                          f"add {hostname}:IFNAME")
    return table[hostname]


def set_socket_ifname(setting: str = "auto") -> str | None:
    """Export GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME for this node from `socket_ifname`, where the
    node's own environment has not set them (a value set on the node wins); returns the interface."""
    name = socket_ifname(setting, os.environ.get("MASTER_ADDR"))
    if name:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", name)
    return os.environ.get("GLOO_SOCKET_IFNAME", name)


def set_timeout(seconds: float) -> None:
    """The timeout of every later collective in every process group (torch's `_set_pg_timeout`): the
    train-time timeout, after a start-up that may wait far longer for slow nodes."""
    if not is_initialized():
        return
    from torch.distributed import distributed_c10d as c10d

    delta = datetime.timedelta(seconds=seconds)
    for group in list(c10d._world.pg_map):
        try:
            c10d._set_pg_timeout(delta, group)
        except (ValueError, AssertionError, RuntimeError):
            pass  # a group this rank is not in, or a backend without a settable timeout


_PEER = re.compile(r"\[?([0-9]{1,3}(?:\.[0-9]{1,3}){3})\]?:([0-9]+)")


def failed_peer_line(exc: BaseException, peers: list[dict], timeout_s: float, step: int) -> str | None:
    """One line for a collective that failed across hosts (a timeout, a closed connection), naming the
    peer: the address in the backend's message when it has one, else every rank on another host.
    `peers`: every rank's {"rank", "host", "addr"} (gathered at start). None when `exc` is not a
    collective failure (a bug: keep its traceback)."""
    text = str(exc)
    markers = ("Timed out", "timed out", "Connection closed", "Connection reset", "Connection refused",
               "Broken pipe", "No route to host", "DistBackendError", "ProcessGroupGloo", "NCCL")
    if not (isinstance(exc, RuntimeError) and any(m in text or m in type(exc).__name__ for m in markers)):
        return None
    me = next((p for p in peers if p["rank"] == get_rank()), {"host": socket.gethostname(), "addr": None})
    named = {m.group(1) for m in _PEER.finditer(text)}
    suspects = [p for p in peers if p["addr"] in named and p["addr"] != me["addr"]] or [
        p for p in peers if p["host"] != me["host"]] or [p for p in peers if p["rank"] != me.get("rank")]
    who = ", ".join(f"rank {p['rank']} on {p['host']} ({p['addr']})" for p in suspects)
    kind = "timed out" if "imed out" in text else "failed"
    return (f"a collective {kind} at step {step} (train.dist_timeout_s={timeout_s:g}): no answer from {who}; "
            f"check that node and the network between it and {me['host']}, then relaunch (training resumes from "
            "the latest checkpoint)")


def init(backend: str | None = None, timeout_s: int = 600, use_deepspeed: bool = False,
         socket_ifname_setting: str = "auto") -> WorldInfo:
    """Initialise the process group when more than one process runs; a no-op for one.
    `timeout_s` is the start-up timeout (every node must arrive within it); `set_timeout` sets the
    train-time one afterwards. The node's socket interface is set first (`set_socket_ifname`)."""
    if use_deepspeed:
        skip_deepspeed_shm_op()  # before DeepSpeed's backend starts (here, or in deepspeed.initialize)
    info = world_info()
    if is_initialized():
        return WorldInfo(get_rank(), get_world_size(), info.local_rank, info.source)
    if info.world_size > 1 or use_deepspeed:
        # DeepSpeed builds a group even for one process, and without RANK/WORLD_SIZE/LOCAL_RANK it
        # falls back to MPI discovery (which needs mpi4py)
        export_env(info, master_addr="127.0.0.1", master_port=29500)
    if info.world_size <= 1:
        return WorldInfo(get_rank(), get_world_size(), info.local_rank, info.source)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(resolve_device("auto", info.local_rank))
    set_socket_ifname(socket_ifname_setting)
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    else:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return info


def resolve_device(device="auto", local_rank: int | None = None, setting: str = "device") -> torch.device:
    """The one device choice. 'auto' (or None): this rank's GPU (`local_rank` modulo the GPUs, the
    current one without a rank) when CUDA is available, else the CPU; 'cpu', 'cuda' / 'gpu', 'cuda:N' or
    a torch.device as given, refused in one line (naming `setting`) when CUDA is not there."""
    if device in (None, "auto"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count()) if local_rank is not None else \
            torch.device("cuda")
    from hiervl.errors import UserError

    try:
        dev = torch.device("cuda" if device == "gpu" else device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"{setting}={device!r} is not a device; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{setting}={device!r} but CUDA is not available here; use {setting}='cpu' (or 'auto')")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"{setting}={device!r}: only 'cpu' and 'cuda' are supported")
    return dev


def destroy() -> None:
    """Tear the process group down explicitly (avoids aborts at interpreter exit)."""
    if is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to every rank; returns it on all ranks."""
    if not is_initialized():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's object, in rank order."""
    if not is_initialized():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def backend_device(backend: str, device: torch.device) -> torch.device:
    """Where a collective on `backend` needs a tensor that lives on `device`.

    NCCL only moves CUDA tensors ("No backend type associated with device type cpu"), so a CPU
    tensor goes to this rank's GPU and back; gloo moves CPU tensors (CUDA ones go through the
    host). A device-specific backend string ("cpu:gloo,cuda:nccl") serves the device types it
    names as they are.
    """
    if ":" in backend:  # "cpu:gloo,cuda:nccl": one backend per device type
        served = {part.split(":")[0].strip() for part in backend.split(",")}
        if device.type in served:
            return device
        backend = "nccl" if "cuda" in served else "gloo"
    if backend == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo" and device.type not in ("cpu", "cuda"):
        return torch.device("cpu")
    return device


def _comm_device(x: torch.Tensor) -> torch.device:
    """The device the process group's backend takes x on."""
    return backend_device(str(dist.get_backend()), x.device)


def _comm_copy(x: torch.Tensor) -> torch.Tensor:
    """A detached copy of x on the device the process group's backend takes."""
    return x.detach().to(_comm_device(x), copy=True).contiguous()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy on x's device; the input is untouched). Any device, any backend."""
    return all_reduce_sum(x) / get_world_size()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy on x's device; the input is untouched). Any device, any backend."""
    if not is_initialized():
        return x.detach().clone()
    y = _comm_copy(x)
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y.to(x.device)


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [n, ...] from every rank along dim 0, in rank order, without gradient.

    Every rank must pass the same shape (the loader guarantees equal batch counts and sizes).
    The result is on x's device, whatever device the backend needs for the transfer.
    """
    if not is_initialized():
        return x.detach().clone()
    y = _comm_copy(x)
    parts = [torch.empty_like(y) for _ in range(get_world_size())]
    dist.all_gather(parts, y)
    return torch.cat(parts, dim=0).to(x.device)  # [W*n, ...]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Like `all_gather`, but gradients flow back to each rank's own slice."""
    if not is_initialized():
        return x
    import torch.distributed.nn.functional as dist_fn

    parts = dist_fn.all_gather(x.to(_comm_device(x)).contiguous())  # differentiable moves both ways
    return torch.cat(parts, dim=0).to(x.device)  # [W*n, ...]
