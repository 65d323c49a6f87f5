"""The generated DeepSpeed config and optimizer: nothing to JIT-compile unless asked for."""

import json
from pathlib import Path

import pytest
import torch
from hiervl.config import ConfigError, load_config
from hiervl.train.deepspeed_config import build_deepspeed_config, build_optimizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", ["tiny.yaml", "base.yaml"])
def test_generated_config_leaves_the_optimizer_to_pytorch(config):
    """No "optimizer" section: DeepSpeed wraps the PyTorch AdamW we build, so it never compiles
    FusedAdam (a ~60 s JIT build per node that fails under TORCH_CUDA_ARCH_LIST=9.0a)."""
    cfg = load_config(ROOT / "configs" / config)
    ds = build_deepspeed_config(cfg, world_size=8)
    assert "optimizer" not in ds and "activation_checkpointing" not in ds
    assert ds["scheduler"]["params"]["total_num_steps"] == cfg.train.steps  # optimizer steps
    assert ds["gradient_accumulation_steps"] == cfg.train.grad_accum
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = build_optimizer(params, cfg, torch.device("cpu"), ds)
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert group["lr"] == cfg.train.lr and group["weight_decay"] == cfg.optimizer.weight_decay
    assert group["betas"] == tuple(cfg.optimizer.betas) and not group["fused"]


def test_fused_adamw_on_cuda_and_deepspeed_fused_adam_only_as_opt_in():
    cfg = load_config(ROOT / "configs/base.yaml")
    # fused=True is checked lazily (at the first step), so building it with a CUDA device works anywhere
    ds = build_deepspeed_config(cfg, world_size=1)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(3))], cfg, torch.device("cuda"), ds)
    assert opt.param_groups[0]["fused"] is True
    cfg = load_config(ROOT / "configs/base.yaml", ["optimizer.impl=deepspeed"])
    ds = build_deepspeed_config(cfg, world_size=1)
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is False
    assert build_optimizer([torch.nn.Parameter(torch.zeros(3))], cfg, torch.device("cuda"), ds) is None
    with pytest.raises(ConfigError, match="optimizer.impl"):
        load_config(ROOT / "configs/tiny.yaml", ["optimizer.impl=apex"])


def test_a_users_json_with_an_optimizer_keeps_it(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}))
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"train.deepspeed_config={path}"])
    ds = build_deepspeed_config(cfg, world_size=2)
    assert ds["optimizer"]["type"] == "Adam" and "train_batch_size" not in ds
    assert build_optimizer([torch.nn.Parameter(torch.zeros(3))], cfg, torch.device("cpu"), ds) is None


def test_a_one_step_run_gets_a_schedule_deepspeed_accepts_and_zero_warmup_is_refused():
    """train.steps=1 used to give warmup_num_steps=0, which WarmupCosineLR refuses (a crash in every
    rank); optimizer.warmup_steps=0 cannot be expressed by that scheduler and is refused at load."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    cfg = load_config("configs/tiny.yaml", ["train.steps=1"])
    params = build_deepspeed_config(cfg, 1)["scheduler"]["params"]
    assert params["warmup_num_steps"] == 1 and params["total_num_steps"] == 1
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    WarmupCosineLR(opt, **params)  # raised ValueError before
    assert build_deepspeed_config(load_config("configs/tiny.yaml", ["train.steps=5"]), 1)["scheduler"]["params"][
        "warmup_num_steps"] == 4
    with pytest.raises(ConfigError, match="warmup_steps must be an integer >= 1"):
        load_config("configs/tiny.yaml", ["optimizer.warmup_steps=0"])
