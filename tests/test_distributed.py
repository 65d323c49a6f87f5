"""World info from every launcher's variables, and the collectives on a real 2-process gloo group."""


import pytest
import torch
from hiervl import distributed as D


@pytest.mark.parametrize("env, expect", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8, 1, "torchrun/deepspeed")),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}, (5, 16, 1, "slurm")),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, (2, 4, 0, "openmpi")),
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, (1, 2, 0, "mpich")),
    ({}, (0, 1, 0, "single")),
])
def test_world_info_reads_each_launcher(env, expect):
    info = D.world_info(env)
    assert (info.rank, info.world_size, info.local_rank, info.source) == expect


@pytest.mark.parametrize("env, cores, expect", [
    ({}, 2, 2),                                            # one process takes every core
    ({"LOCAL_SIZE": "2"}, 2, 1),                           # DeepSpeed's launcher: two ranks on two cores
    ({"LOCAL_WORLD_SIZE": "4"}, 16, 4),                    # torchrun
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, 8, 2),          # Open MPI
    ({"SLURM_NTASKS_PER_NODE": "8"}, 4, 1),                # more ranks than cores: still one thread each
    ({"LOCAL_SIZE": "2", "OMP_NUM_THREADS": "3"}, 2, 3),   # the user's (or --bind_cores_to_rank's) choice wins
    ({"LOCAL_SIZE": "2", "OMP_NUM_THREADS": ""}, 2, 1),    # an empty setting is no setting
])
def test_cpu_threads_per_rank_never_oversubscribes_the_node(env, cores, expect):
    assert D.cpu_threads_per_rank(env, cores=cores) == expect


def test_single_process_collectives_are_identity():
    x = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(D.all_gather(x), x)
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    assert D.all_gather_object(7) == [7]
    assert D.get_world_size() == 1 and D.is_main()


def _job(rank, world):
    """The collectives on one of the session's two gloo ranks (conftest.py `gloo_pair`: gloo initialised there)."""
    assert D.get_rank() == rank and D.get_world_size() == world == 2
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = D.all_gather(x)                       # [4, 3], no grad
    with_grad = D.all_gather_with_grad(x)            # [4, 3], grad flows to own slice
    with_grad.sum().backward()
    obj = D.broadcast_object({"from": rank} if rank == 0 else None)
    out = {
        "gathered": gathered.tolist(), "requires_grad": gathered.requires_grad,
        "grad": x.grad.tolist(), "obj": obj, "mean": D.all_reduce_mean(torch.tensor([rank * 2.0])).item(),
        "objects": D.all_gather_object(rank * 10),
    }
    D.barrier()
    return out


def test_collectives_on_two_gloo_processes(gloo_pair):
    for r in gloo_pair.run(_job):
        assert r["gathered"] == [[1.0] * 3] * 2 + [[2.0] * 3] * 2
        assert r["requires_grad"] is False
        # sum over both ranks' copies of the gathered tensor: each rank's slice gets grad W=2
        assert r["grad"] == [[2.0] * 3] * 2
        assert r["obj"] == {"from": 0}
        assert r["mean"] == pytest.approx(1.0)
        assert r["objects"] == [0, 10]


@pytest.mark.parametrize("backend, device, expect", [
    ("nccl", "cpu", "cuda"),          # NCCL refuses CPU tensors: they travel through this rank's GPU
    ("nccl", "cuda", "cuda"),
    ("gloo", "cpu", "cpu"),
    ("gloo", "cuda", "cuda"),         # gloo reduces CUDA tensors through the host itself
    ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
    ("cpu:gloo,cuda:nccl", "cuda", "cuda"),
    ("cuda:nccl", "cpu", "cuda"),     # a device-specific string without cpu: still through the GPU
])
def test_backend_device_routes_tensors_to_what_the_backend_moves(monkeypatch, backend, device, expect):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    got = D.backend_device(backend, torch.device(device, 0) if device == "cuda" else torch.device(device))
    assert got.type == expect


class _RecordingNccl:
    """A stand-in for an NCCL process group of 2 ranks: it records the device of every tensor it is
    handed and refuses CPU tensors the way NCCL does; the 'other rank' holds the same values."""

    def __init__(self, accept):
        self.accept, self.seen = accept, []

    def get_backend(self):
        return "nccl"

    def is_initialized(self):
        return True

    def is_available(self):
        return True

    def get_world_size(self):
        return 2

    def _check(self, t):
        self.seen.append(t.device.type)
        if t.device.type != self.accept:
            raise RuntimeError("No backend type associated with device type cpu")

    def all_reduce(self, t, op=None):
        self._check(t)
        t.mul_(2)

    def all_gather(self, parts, t):
        self._check(t)
        for p in parts:
            p.copy_(t)

    ReduceOp = torch.distributed.ReduceOp


def test_collectives_route_every_tensor_through_backend_device(monkeypatch):
    """Each collective asks `backend_device` (checked above) where the group's backend wants the
    tensor, hands the backend a copy there, and returns the result on the caller's device, leaving
    the input untouched. The stand-in group refuses tensors off its device, as NCCL does."""
    fake = _RecordingNccl(accept="cpu")
    asked = []

    def route(backend, device):
        asked.append((backend, device.type))
        return torch.device("cpu")

    monkeypatch.setattr(D, "dist", fake)
    monkeypatch.setattr(D, "backend_device", route)
    x = torch.tensor([1.0, 2.0])
    assert D.all_reduce_sum(x).tolist() == [2.0, 4.0] and x.tolist() == [1.0, 2.0]
    assert D.all_reduce_mean(x).tolist() == [1.0, 2.0]
    assert D.all_gather(torch.ones(1, 2)).shape == (2, 2)
    assert fake.seen == ["cpu"] * 3 and asked == [("nccl", "cpu")] * 3
    # a backend handed a tensor off its device refuses it: the routing is what makes CPU flags work
    monkeypatch.setattr(D, "dist", _RecordingNccl(accept="cuda"))
    monkeypatch.setattr(D, "backend_device", lambda backend, device: device)
    with pytest.raises(RuntimeError, match="device type cpu"):
        D.all_reduce_sum(x)
