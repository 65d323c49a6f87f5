"""Generate DeepSpeed's JSON config from ours (or take the user's own JSON).

One source of truth: batch size, ZeRO stage, precision, accumulation, clipping, AdamW and the
warmup + cosine LR schedule all come from `Config`; the generated dict is what
`deepspeed.initialize(config=...)` receives and is written next to the run for inspection.
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

    on_gpu = torch.cuda.is_available()
    opt = cfg.optimizer
    total = cfg.train.steps
    warmup = min(opt.warmup_steps, max(total - 1, 0))
    ds: dict = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "steps_per_print": 10**9,  # our own logging does this
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.train.lr,
                "betas": list(opt.betas),
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
                "torch_adam": not on_gpu,  # no fused kernels on CPU
            },
        },
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
    if use_bf16(cfg):
        ds["bf16"] = {"enabled": True}
    if cfg.train.activation_checkpointing:
        ds["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False}
    return ds


def write_deepspeed_config(ds: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(ds, indent=2) + "\n")
