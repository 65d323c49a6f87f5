"""Generate DeepSpeed's JSON config from ours (or take the user's own JSON).

One source of truth: batch size, ZeRO stage, precision, accumulation, clipping, AdamW and the
warmup + cosine LR schedule all come from `Config`; the generated dict is what
`deepspeed.initialize(config=...)` receives and is written next to the run for inspection.
A user's JSON (train.deepspeed_config) replaces the sections it names and must agree with the
config on batch sizes, accumulation, ZeRO stage and precision (`build_deepspeed_config`).

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
from hiervl.config import Config, ConfigError


def use_bf16(cfg: Config) -> bool:
    """bf16 when asked, or on `auto` when a GPU that supports it is present (never on CPU by auto)."""
    if cfg.train.precision == "bf16":
        return True
    if cfg.train.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return False


def _user_deepspeed_json(cfg: Config) -> dict:
    path = Path(cfg.train.deepspeed_config)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"train.deepspeed_config={path} {what}; give a DeepSpeed JSON file or null")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"train.deepspeed_config={path} is not valid JSON: {exc}") from exc
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed_config={path} must hold a JSON object of DeepSpeed settings")
    return ds


def _check_agrees(path, ds: dict, cfg: Config, world_size: int) -> None:
    """Refuse a user JSON whose batch, accumulation, ZeRO stage or precision differ from the config:
    the loader, the step loop, checkpoint resume and the input dtype follow the config."""
    d, t = cfg.data, cfg.train
    want = {"train_micro_batch_size_per_gpu": (d.batch_size, "data.batch_size"),
            "gradient_accumulation_steps": (t.grad_accum, "train.grad_accum"),
            "train_batch_size": (d.batch_size * t.grad_accum * world_size,
                                 f"data.batch_size x train.grad_accum x ranks = {d.batch_size} x {t.grad_accum} x "
                                 f"{world_size}")}
    for key, (value, source) in want.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"train.deepspeed_config={path} sets {key}={ds[key]!r} but {source} = {value}; "
                              f"remove {key} from the JSON (hiervl fills it in) or make them agree")
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage != t.zero_stage:
        raise ConfigError(f"train.deepspeed_config={path} sets zero_optimization.stage={stage} but "
                          f"train.zero_stage={t.zero_stage}; set train.zero_stage={stage} (checkpoints record it)")
    if (ds.get("fp16") or {}).get("enabled"):
        raise ConfigError(f"train.deepspeed_config={path} enables fp16, which hiervl does not train in; "
                          "remove it and use train.precision=bf16 or fp32")
    bf16 = bool((ds.get("bf16") or ds.get("bfloat16") or {}).get("enabled"))
    if bf16 != use_bf16(cfg):
        raise ConfigError(f"train.deepspeed_config={path} has bf16 {'on' if bf16 else 'off'} but train.precision="
                          f"{t.precision} means {'bf16' if use_bf16(cfg) else 'fp32'} here; remove the bf16 "
                          "section (hiervl fills it in) or set train.precision to match")


def build_deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config dict for this run at `world_size` ranks.

    With train.deepspeed_config, the user's JSON is laid over the generated dict: each top-level
    section it names (optimizer, scheduler, zero_optimization, ...) replaces ours, every other
    one comes from the config. Without an "optimizer" section PyTorch's AdamW is built from
    optimizer.* as usual. Batch sizes, accumulation, ZeRO stage and precision in the JSON must
    agree with the config (ConfigError otherwise), because the loader and the trainer follow it.
    """
    opt = cfg.optimizer
    total = cfg.train.steps
    # WarmupCosineLR refuses a warmup of 0 (a 1-step run would crash inside DeepSpeed): at least 1.
    warmup = max(1, min(opt.warmup_steps, total - 1))
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
    if cfg.train.deepspeed_config:
        user = _user_deepspeed_json(cfg)
        _check_agrees(cfg.train.deepspeed_config, user, cfg, world_size)
        ds = {**ds, **user}
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
