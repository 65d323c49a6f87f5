"""The momentum (key) encoders' EMA in bf16, as DeepSpeed's bf16 runs it on a GPU.

DeepSpeed's bf16 casts every parameter to bf16, the `requires_grad=False` key towers too, and keeps
an fp32 master only of what the optimizer steps (the query towers). Simulated here on CPU: the
towers cast to bf16, an fp32 master of the query towers that moves 1e-4 per element per step (70%
of the time in the same direction), copied into the bf16 query weights after each step as
DeepSpeed does; then `momentum_update`. The bf16 keys must follow the fp32 EMA of the master:
  - in total, after 100 steps, the error is under 15% of the EMA's own motion (measured: 8.4%, and
    1.6% of the key elements never changed; a plain bf16 EMA: 83%, with 78% never changed);
  - every element is within one bf16 ulp of the fp32 EMA (half an ulp for rounding the query
    weights the EMA reads, half for rounding the fp32 shadow into the bf16 keys).
The fp32 shadow travels with the checkpoint: `momentum_state` / `load_momentum_state`.
"""

from pathlib import Path

import pytest
import torch
from hiervl.config import load_config
from hiervl.model.hierarchical import build_model

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.num_frames=4", "data.size=32", "model.vision.width=32", "model.vision.heads=2", "model.vision.layers=2",
         "model.vision.patch_size=8", "model.temporal_layers=1", "model.text.pretrained=false",
         "queue.enabled=true", "queue.objective=both", "queue.size=8", "queue.momentum=0.995"]


@pytest.fixture
def text_dir(small_text_dir):
    return small_text_dir  # conftest.py: the session's small random-init BERT config


def _cfg(text_dir):
    return load_config(ROOT / "configs" / "tiny.yaml", [*SMALL, f"model.text.path={text_dir}"])


def _bf16_model(text_dir):
    torch.manual_seed(0)
    model = build_model(_cfg(text_dir))
    for p in model.parameters():  # what deepspeed's _cast_module_mixed_precision does (buffers stay fp32)
        p.data = p.data.to(torch.bfloat16)
    return model


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp at |x| (8 significant bits)."""
    return torch.ldexp(torch.ones_like(x), torch.frexp(x.abs().clamp_min(1e-30))[1] - 8)


def _run(model, steps: int):
    m = model.cfg.queue.momentum
    queries = list(model.video.parameters()) + list(model.text.parameters())
    keys = list(model.video_key.parameters()) + list(model.text_key.parameters())
    master = [q.detach().float().clone() for q in queries]  # DeepSpeed's fp32 master starts from the bf16 weights
    ema = [k.detach().float().clone() for k in keys]
    start = [e.clone() for e in ema]
    g = torch.Generator().manual_seed(1)
    direction = [torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0) for x in master]
    for _ in range(steps):
        for x, d in zip(master, direction):
            x.add_(1e-4 * torch.where(torch.rand(x.shape, generator=g) < 0.7, d, -d))
        for q, x in zip(queries, master):
            q.data.copy_(x)  # DeepSpeed copies the updated fp32 master into the bf16 weights
        model.momentum_update()
        for e, x in zip(ema, master):
            e.mul_(m).add_(x, alpha=1 - m)
    return keys, ema, start, master


def test_bf16_key_encoders_track_the_fp32_ema_within_one_ulp(text_dir):
    model = _bf16_model(text_dir)
    keys, ema, start, master = _run(model, steps=100)
    assert all(k.dtype == torch.bfloat16 for k in keys)
    err = sum((k.float() - e).abs().sum() for k, e in zip(keys, ema))
    motion = sum((e - s).abs().sum() for e, s in zip(ema, start))
    assert err / motion < 0.15, f"bf16 keys are off the fp32 EMA by {100 * err / motion:.0f}% of its motion"
    unchanged = sum(int((k.float() == s).sum()) for k, s in zip(keys, start)) / sum(k.numel() for k in keys)
    assert unchanged < 0.05, f"{100 * unchanged:.0f}% of the bf16 key elements never moved"
    for k, e, x in zip(keys, ema, master):  # the ulp of the larger of the EMA and the weights it reads
        assert bool(((k.float() - e).abs() <= _ulp(torch.maximum(e.abs(), x.abs()))).all())


def test_the_fp32_shadow_survives_a_checkpoint_round_trip(text_dir):
    model = _bf16_model(text_dir)
    assert model.momentum_state() == {}  # nothing until the first update
    _run(model, steps=5)
    state = model.momentum_state()
    assert set(state) == {"video_key", "text_key"}
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for s in state.values() for t in s.values())
    assert list(state["video_key"]) == [n for n, _ in model.video_key.named_parameters()]

    resumed = _bf16_model(text_dir)  # a fresh process: keys from the checkpoint's bf16 weights, shadow from its client state
    resumed.load_state_dict(model.state_dict())
    resumed.load_momentum_state(state)
    for a, b in ((model, resumed),):
        for name, _, _ in a._momentum_pairs():
            for x, y in zip(a._key_shadow[name], b._key_shadow[name]):
                assert torch.equal(x, y)
    # the same next update as the run that never stopped
    for q, r in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(q, r)
    with torch.no_grad():
        for p in list(model.video.parameters()) + list(model.text.parameters()):
            p.add_(0.01)
        for p in list(resumed.video.parameters()) + list(resumed.text.parameters()):
            p.add_(0.01)
    model.momentum_update()
    resumed.momentum_update()
    for k, r in zip(model.video_key.parameters(), resumed.video_key.parameters()):
        assert torch.equal(k, r)


def test_fp32_keys_keep_no_shadow(text_dir):
    torch.manual_seed(0)
    model = build_model(_cfg(text_dir))
    with torch.no_grad():
        for p in model.video.parameters():
            p.add_(1.0)
    before = [k.clone() for k in model.video_key.parameters()]
    model.momentum_update()
    assert model.momentum_state() == {}
    for k, b, q in zip(model.video_key.parameters(), before, model.video.parameters()):
        torch.testing.assert_close(k, 0.995 * b + 0.005 * q)
