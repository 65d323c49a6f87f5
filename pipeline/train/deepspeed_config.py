"""Generate DeepSpeed's JSON config from ours (or take the user's own JSON).

One source of truth: batch size, ZeRO stage, precision, accumulation, clipping, AdamW and the
warmup + cosine LR schedule all come from `Config`; the generated dict is what
`deepspeed.initialize(config=...)` receives and is written next to the run for inspection.

The optimizer is PyTorch's AdamW, built here (`build_optimizer`) and handed to DeepSpeed, which
wraps it for ZeRO: fused kernels on CUDA, nothing to JIT-compile, so a fresh GPU node trains at
once. DeepSpeed's own FusedAdam (a JIT build of ~60 s per node, which fails where
TORCH_CUDA_ARCH_LIST carries a suffix such as `9.0a`) is an opt-in: `optimizer.impl=deepspeed`.

Owns: the DeepSpeed JSON built from the config.
Must not touch: launching DeepSpeed (launch/).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.config import Config, ConfigError


def use_bf16(cfg: Config) -> bool:
    """bf16 when asked, or on `auto` when a GPU that supports it is present (never on CPU by auto)."""
    if cfg.train.precision == "bf16":
        return True
    if cfg.train.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return False


def build_deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config dict for this run at `world_size` ranks."""
    if cfg.train.deepspeed_config:
        path = Path(cfg.train.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed_config={path} does not exist; give a DeepSpeed JSON file or null")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"train.deepspeed_config={path} is not valid JSON: {exc}") from exc
        ds.setdefault("train_micro_batch_size_per_gpu", cfg.data.batch_size)
        ds.setdefault("gradient_accumulation_steps", cfg.train.grad_accum)
        ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
        return ds

    opt = cfg.optimizer
    total = cfg.train.steps
    warmup = min(opt.warmup_steps, max(total - 1, 0))
    ds: dict = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "steps_per_print": 10**9,  # our own logging does this
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total,
                "warmup_num_steps": warmup,
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": opt.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
        "checkpoint": {"load_universal": False},
    }
    if opt.grad_clip > 0:
        ds["gradient_clipping"] = opt.grad_clip
    if opt.impl == "deepspeed":  # opt-in: DeepSpeed builds (JIT-compiles) its FusedAdam from this section
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": cfg.train.lr, "betas": list(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay,
            "torch_adam": False}}
    if use_bf16(cfg):
        ds["bf16"] = {"enabled": True}
    # train.activation_checkpointing is done by the encoders themselves (torch.utils.checkpoint),
    # not through DeepSpeed's `activation_checkpointing` section, which only configures its own API
    return ds


def build_optimizer(params, cfg: Config, device: torch.device, ds_config: dict) -> torch.optim.Optimizer | None:
    """PyTorch's AdamW for `params` (fused kernels on CUDA), or None when `ds_config` has an
    "optimizer" section (`optimizer.impl=deepspeed`, or a user's JSON that names one): DeepSpeed
    then builds that optimizer itself."""
    if "optimizer" in ds_config:
        return None
    opt = cfg.optimizer
    fused = True if device.type == "cuda" else None  # None: torch's default for the device (CPU: for-loop)
    return torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(opt.betas), eps=opt.eps,
                             weight_decay=opt.weight_decay, fused=fused)


def write_deepspeed_config(ds: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(ds, indent=2) + "\n")
