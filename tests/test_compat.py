"""Old formats still read (pipeline/compat.py): each conversion gives today's form, through the reader
that calls it. (The model state dict's old queue names: tests/test_model.py.)"""

from __future__ import annotations

import torch
from hiervl import compat
from hiervl.model.queue import MomentumQueue
from hiervl.train.checkpoint import load_queue_state, queue_state
from torch import nn


def _model_with_queue() -> nn.Module:
    model = nn.Module()
    model.objective = nn.Module()
    model.objective.queues = nn.ModuleDict({"global_text": MomentumQueue(4, {"emb": ((2,), torch.float32)})})
    return model


def test_a_checkpoints_queue_state_under_its_old_names_loads_into_todays_queues():
    saved = _model_with_queue()
    q = saved.objective.queues["global_text"]
    for buf in q.buffers():
        buf.copy_(torch.arange(buf.numel()).reshape(buf.shape).to(buf.dtype) % 3)
    old = {name.removeprefix("objective."): state for name, state in queue_state(saved).items()}
    assert set(old) == {"queues.global_text"}  # the layout before the objective module
    fresh = _model_with_queue()
    load_queue_state(fresh, old)
    for name, value in q.state_dict().items():
        assert torch.equal(fresh.objective.queues["global_text"].state_dict()[name], value), name
    # today's names pass unchanged, and a name of neither form is left for the reader to refuse
    assert compat.queue_state_names({"objective.queues.a": 1, "other": 2}, ["objective.queues.a"]) == \
        {"objective.queues.a": 1, "other": 2}


def test_an_old_cuda_rng_state_list_gives_this_ranks_own_device():
    states = [torch.tensor([0], dtype=torch.uint8), torch.tensor([1], dtype=torch.uint8)]
    assert compat.own_cuda_rng_state(states, 1) is states[1]
    assert compat.own_cuda_rng_state(states, 2) is None  # fewer devices were visible then
    assert compat.own_cuda_rng_state(states[0], 1) is states[0]  # today's: this rank's own, as saved


def test_an_old_loader_state_takes_the_order_parameters_from_the_config():
    assert compat.loader_state({"order": "block", "seed": 1}, 64, 8) == \
        {"order": "block", "seed": 1, "block_window": 64, "group_chunk": 8}
    assert compat.loader_state({"block_window": 16, "group_chunk": 4}, 64, 8) == {"block_window": 16, "group_chunk": 4}
