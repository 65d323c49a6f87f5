"""Where checkpoint state lands on a GPU, shown on CPU.

- A universal (world-size or ZeRO-stage change) load: DeepSpeed sets the torch optimizer's
  `state[p]['step']` to a tensor read with map_location='cpu'. torch's fused AdamW reads it through a
  device pointer, unchecked, so `checkpoint.load` must leave every step where the optimizer expects
  it: on the parameter's device (float32) for a fused or capturable one. The parameters here are on
  the `meta` device, standing in for CUDA; the loading engine is a stand-in that does what
  DeepSpeed's universal load does to the optimizer state.
- RNG: a rank saves and restores only its own GPU's generator (the current device), never every
  visible GPU's.
"""


import pytest
import torch
from hiervl.train import checkpoint as ckpt


class _UniversalLoadingEngine:
    """`engine.load_checkpoint` as DeepSpeed's universal path leaves the optimizer (base_optimizer.py)."""

    def __init__(self, optimizer, step):
        self.optimizer = optimizer  # DeepSpeed's wrapper; the torch optimizer is its .optimizer
        self.step = step

    def load_checkpoint(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states):
        for group in self.optimizer.optimizer.param_groups:
            for p in group["params"]:
                self.optimizer.optimizer.state[p]["step"] = self.step  # torch.load(step.pt), map_location cpu
        return load_dir, {"step": 7}


class _Wrapper:
    def __init__(self, optimizer):
        self.optimizer = optimizer


def _plan(tmp_path):
    (tmp_path / "step00000007").mkdir()
    return {"dir": str(tmp_path), "tag": "step00000007", "load_tag": "step00000007_universal", "universal": True,
            "meta": {"world_size": 2, "zero_stage": 2}}


@pytest.mark.parametrize("fused", [True, False])
def test_a_universal_load_puts_the_optimizer_steps_where_the_optimizer_reads_them(tmp_path, fused):
    device = torch.device("meta") if fused else torch.device("cpu")  # meta: a stand-in for the GPU
    params = [torch.nn.Parameter(torch.zeros(4, device=device)), torch.nn.Parameter(torch.zeros(2, 3, device=device))]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True if fused else None)
    if fused:  # torch refuses fused=True on meta tensors at step(); the flag is what the fix reads
        assert opt.param_groups[0]["fused"]
    engine = _UniversalLoadingEngine(_Wrapper(opt), torch.tensor(7, dtype=torch.int64))
    client, rank_state = ckpt.load(engine, _plan(tmp_path))
    assert client == {"step": 7} and rank_state is None
    for p in params:
        step = opt.state[p]["step"]
        assert step.device == (p.device if fused else torch.device("cpu")) and step.dtype == torch.float32
        if not fused:
            assert float(step) == 7.0


def test_a_fused_cpu_adamw_steps_after_the_fix_up():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.ones(3)
    opt.step()
    opt.state[p]["step"] = 1  # a plain number, as some loaders leave it
    assert ckpt.place_optimizer_steps(opt) == 1
    assert opt.state[p]["step"].dtype == torch.float32 and float(opt.state[p]["step"]) == 1.0
    p.grad = torch.ones(3)
    opt.step()
    assert float(opt.state[p]["step"]) == 2.0 and ckpt.place_optimizer_steps(opt) == 0


class _FakeCuda:
    """torch.cuda as a rank on a 4-GPU node whose own device is 2 would see it."""

    def __init__(self):
        self.calls = []

    def is_available(self):
        return True

    def current_device(self):
        return 2

    def get_rng_state(self, device="cuda"):
        self.calls.append(("get", device))
        return torch.tensor([2], dtype=torch.uint8)

    def set_rng_state(self, state, device="cuda"):
        self.calls.append(("set", device, int(state[0])))

    def get_rng_state_all(self):
        raise AssertionError("every GPU's RNG state read")

    def set_rng_state_all(self, states):
        raise AssertionError("every GPU's RNG state set")


def test_a_rank_saves_and_restores_only_its_own_gpus_rng(monkeypatch):
    fake = _FakeCuda()
    for name in ("is_available", "current_device", "get_rng_state", "set_rng_state", "get_rng_state_all",
                 "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    state = ckpt.rng_state()
    assert int(state["cuda"][0]) == 2 and fake.calls == [("get", "cuda")]
    ckpt.set_rng_state(state)
    assert fake.calls[-1] == ("set", "cuda", 2)
    # a checkpoint written before, with every visible GPU's state: only this rank's own is restored
    old = dict(state, cuda=[torch.tensor([d], dtype=torch.uint8) for d in range(4)])
    ckpt.set_rng_state(old)
    assert fake.calls[-1] == ("set", "cuda", 2) and len(fake.calls) == 3
    ckpt.set_rng_state(dict(state, cuda=[torch.tensor([0], dtype=torch.uint8)]))  # fewer devices then: left alone
    assert len(fake.calls) == 3
