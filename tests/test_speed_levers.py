"""The speed levers behind config keys (issue 23): each one changes what it says, and only that.

- `model.vision.act`: the random-init frame ViT's MLP activation (gelu: one kernel; quick_gelu: CLIP's);
- `train.tf32`: fp32 matmuls on TF32 tensor cores on a GPU ("high"), full fp32 when off; CPU untouched;
- `train.compile`: torch.compile of the towers, in place (same state-dict names), really compiled:
  dynamo captures graphs, and the compiled step gives the eager step's loss and gradients.
`train.activation_checkpointing` is tested in tests/test_encoders.py.
"""

from pathlib import Path

import pytest
import torch
from hiervl.config import ConfigError, load_config
from hiervl.model.hierarchical import build_model, compile_towers, set_matmul_precision

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.num_frames=4", "data.size=32", "data.max_words=8", "model.vision.width=32", "model.vision.heads=2",
         "model.vision.layers=2", "model.vision.patch_size=8", "model.temporal_layers=1", "model.text.pretrained=false",
         "data.batch_size=4"]


@pytest.fixture
def text_dir(small_text_dir):
    return small_text_dir  # conftest.py: the session's small random-init BERT config


def _cfg(text_dir, *extra):
    return load_config(ROOT / "configs" / "tiny.yaml", [*SMALL, f"model.text.path={text_dir}", *extra])


def _batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, n = cfg.data.batch_size, cfg.data.max_words
    mask = torch.ones(b, n, dtype=torch.long)
    mask[0, 5:] = 0
    return {"video": torch.randn(b, cfg.data.num_frames, 3, 32, 32, generator=g), "attention_mask": mask,
            "input_ids": torch.randint(5, 500, (b, n), generator=g) * mask, "video_ids": torch.arange(b),
            "valid": torch.ones(b, dtype=torch.bool)}


def test_vision_act_picks_the_frame_vits_mlp_activation(text_dir):
    from transformers.activations import GELUActivation, QuickGELUActivation

    acts = {}
    for act in ("quick_gelu", "gelu"):
        torch.manual_seed(0)
        model = build_model(_cfg(text_dir, f"model.vision.act={act}"))
        vit = model.video.encoder.vit
        assert vit.config.hidden_act == act
        acts[act] = type(vit.encoder.layers[0].mlp.activation_fn)
    assert acts == {"quick_gelu": QuickGELUActivation, "gelu": GELUActivation}
    assert load_config(ROOT / "configs" / "base.yaml").model.vision.act == "gelu"
    with pytest.raises(ConfigError, match="model.vision.act='relu'"):
        _cfg(text_dir, "model.vision.act=relu")


def test_tf32_sets_the_fp32_matmul_precision_on_cuda_only(text_dir):
    before = torch.get_float32_matmul_precision()
    try:
        assert set_matmul_precision(_cfg(text_dir), "cpu") is None
        assert torch.get_float32_matmul_precision() == before
        assert set_matmul_precision(_cfg(text_dir), "cuda:0") == "high"
        assert torch.get_float32_matmul_precision() == "high"
        assert set_matmul_precision(_cfg(text_dir, "train.tf32=false"), "cuda") == "highest"
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.slow  # inductor compiles on CPU: ~1.5 min of CPU (11 min wall at load 38)
def test_compile_compiles_the_towers_and_keeps_the_step(text_dir):
    from torch._dynamo.utils import counters

    cfg = _cfg(text_dir, "queue.enabled=true", "queue.objective=both", "queue.size=8")
    torch.manual_seed(0)
    eager = build_model(cfg)
    torch.manual_seed(0)
    compiled = build_model(cfg)
    names = list(compiled.state_dict())
    torch._dynamo.reset()
    counters.clear()
    assert compile_towers(compiled) == ["video", "text", "video_key", "text_key"]
    assert list(compiled.state_dict()) == names  # checkpoints and DeepSpeed see the same parameters
    batch = _batch(cfg)
    losses, grads = [], []
    for model in (eager, compiled):
        out = model(batch)
        out["loss"].backward()
        losses.append(out["loss"].detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert counters["stats"]["unique_graphs"] >= 4, dict(counters["stats"])  # every tower went through dynamo
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-3, atol=1e-5, msg=n)
