"""World info from every launcher's variables, and the collectives on a real 2-process gloo group."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pipeline import distributed as D


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


def test_single_process_collectives_are_identity():
    x = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(D.all_gather(x), x)
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    assert D.all_gather_object(7) == [7]
    assert D.get_world_size() == 1 and D.is_main()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    D.init(backend="gloo")
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = D.all_gather(x)                       # [4, 3], no grad
    with_grad = D.all_gather_with_grad(x)            # [4, 3], grad flows to own slice
    with_grad.sum().backward()
    obj = D.broadcast_object({"from": rank} if rank == 0 else None)
    out[rank] = {
        "gathered": gathered.tolist(), "requires_grad": gathered.requires_grad,
        "grad": x.grad.tolist(), "obj": obj, "mean": D.all_reduce_mean(torch.tensor([rank * 2.0])).item(),
        "objects": D.all_gather_object(rank * 10),
    }
    D.barrier()
    D.destroy()


def test_collectives_on_two_gloo_processes():
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    for rank in (0, 1):
        r = out[rank]
        assert r["gathered"] == [[1.0] * 3] * 2 + [[2.0] * 3] * 2
        assert r["requires_grad"] is False
        # sum over both ranks' copies of the gathered tensor: each rank's slice gets grad W=2
        assert r["grad"] == [[2.0] * 3] * 2
        assert r["obj"] == {"from": 0}
        assert r["mean"] == pytest.approx(1.0)
        assert r["objects"] == [0, 10]
