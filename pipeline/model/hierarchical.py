"""HierarchicalModel: dual-stream video/text encoders, level heads, momentum encoders and the objective.

    model = build_model(cfg)
    out = model(batch)          # {"loss", "losses", "keys"}; keys are already all-gathered
    ...backward, optimizer step...
    model.momentum_update()     # key encoders <- EMA of the query encoders
    model.enqueue(out)          # push this step's global keys into every queue (all ranks alike)

The model holds the query towers and their momentum copies and turns a batch into query and key
embeddings per level; the losses, negatives and queues live in `model.objective`
(pipeline/model/objective.py: HierarchicalContrastiveLoss, `queue.objective` momentum | symmetric),
which gets this process's rank and world size from here. W ranks of batch b train exactly like
one rank of batch W*b: same losses, same gradients (after DeepSpeed's averaging), same queues.

Owns: `QueryTowers` (the towers, heads and fused similarity: what inference and exports use),
`HierarchicalModel` (plus the momentum copies and the objective beside them) and `build_model`.
Must not touch: DeepSpeed, data loading or checkpoints.
"""

from __future__ import annotations

import copy
import math

import torch
from hiervl import compat
from hiervl import distributed as dist
from hiervl.config import Config
from hiervl.model.encoders import TextEncoder, VideoEncoder
from hiervl.model.levels import LevelHeads, feature_layers, level_similarity, level_weights, model_levels
from hiervl.model.objective import HierarchicalContrastiveLoss
from hiervl.presets import learns_temperature
from torch import nn


class VideoTower(nn.Module):
    def __init__(self, cfg: Config, vision_config=None):
        super().__init__()
        self.encoder = VideoEncoder(cfg, vision_config)
        self.heads: LevelHeads | None = None

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.encoder(video))


class TextTower(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.encoder = TextEncoder(cfg)
        self.heads: LevelHeads | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.encoder(input_ids, attention_mask), attention_mask.bool())


class QueryTowers(nn.Module):
    """The query towers with their level heads and the fused similarity: all that inference needs.

    State dict keys `video.*` and `text.*`, the same as in `HierarchicalModel` (which extends it with
    the momentum copies and the objective), so an export (pipeline/export.py) holds exactly these.
    `vision_config` (a CLIPVisionConfig) builds the frame ViT from an export's architecture.
    """

    def __init__(self, cfg: Config, vision_config=None):
        super().__init__()
        self.cfg = cfg
        self.level_specs = model_levels(cfg)  # the preset's levels, token alignment per model.token_align
        self.levels = [lv.name for lv in self.level_specs]
        self.fusion_weights = level_weights(cfg)

        self.video = VideoTower(cfg, vision_config)
        self.text = TextTower(cfg)
        fv, ft = feature_layers(cfg, self.video.encoder.num_layers, self.text.encoder.num_layers)
        self.video.heads = LevelHeads(cfg, "video", self.video.encoder.width, fv)
        self.text.heads = LevelHeads(cfg, "text", self.text.encoder.width, ft)

    def encode_video(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """Query-encoder level embeddings of video [N, T, C, H, W]: {level: [N, D] | [N, T', D]}."""
        return self.video(video)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Query-encoder level embeddings of captions: {level: [N, D] | [N, L', D], level_mask: [N, L']}
        (token_align=directed: also level_dir [N], the caption's direction logit)."""
        return self.text(input_ids, attention_mask)

    def similarity(self, t: dict, v: dict) -> dict[str, torch.Tensor]:
        """{level: [Nt, Nv]} plus "fused": the level_weights-weighted mean of the levels."""
        sims = {lv.name: level_similarity(lv, t, v).float() for lv in self.level_specs}
        total = sum(self.fusion_weights.values())
        sims["fused"] = sum(self.fusion_weights[n] * sims[n] for n in self.levels) / total
        return sims


class HierarchicalModel(QueryTowers):
    """See the module docstring; `levels` lists the preset's level names."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)  # the query towers and heads
        mc = cfg.model

        # key encoders: momentum copies, never trained by the optimizer. Only `symmetric` without a
        # queue scores no key and keeps none: then they do not exist (None): neither built, run, updated,
        # kept on any rank nor saved (half the module state of the demo's checkpoints)
        self.uses_keys = cfg.queue.enabled or cfg.queue.objective != "symmetric"
        self.video_key: nn.Module | None = None
        self.text_key: nn.Module | None = None
        if self.uses_keys:
            self.video_key = copy.deepcopy(self.video)
            self.text_key = copy.deepcopy(self.text)
            for p in list(self.video_key.parameters()) + list(self.text_key.parameters()):
                p.requires_grad_(False)
        self._key_shadow: dict[str, list[torch.Tensor]] = {}  # fp32 EMA state of bf16 key weights (momentum_update)

        learnable = learns_temperature(mc.preset, mc.learnable_temperature)
        learnable = learnable and mc.loss == "infonce"  # the hinge has no temperature: no unused parameter
        init = torch.full((len(self.levels),), math.log(1.0 / mc.temperature))
        if learnable:
            self.logit_scale = nn.Parameter(init)  # [n_levels], log of 1/temperature
        else:
            self.register_buffer("logit_scale", init, persistent=False)

        self.objective = HierarchicalContrastiveLoss(cfg)  # owns the queues: objective.queues.<level>_<modality>
        self.register_load_state_dict_pre_hook(compat.rename_old_queue_keys)  # old checkpoints' queue names
        self.register_load_state_dict_pre_hook(_match_key_encoders)

    @property
    def queues(self) -> nn.ModuleDict:
        """The objective's MomentumQueues by "<level>_<modality>"."""
        return self.objective.queues

    # ------------------------------------------------------------------ training

    def forward(self, batch: dict, phase: str = "loss", grads: dict | None = None) -> dict:
        """phase `loss`: {"loss", "losses", "keys"} of this batch (the objective's output).

        The two phases of contrastive accumulation (pipeline/train/grad_cache.py), which go through
        the module's forward so that DeepSpeed's engine (ZeRO-3 gathering, hooks) runs them:
        `embed` (call under no_grad): the step's features of this micro-batch, {"q_v", "q_t", "k_v",
        "k_t", "video_ids", "valid", "group_ids", "logit_scale"}; `replay`: the query towers again, with gradient,
        and {"loss": sum of <query embedding, its cached gradient>} (plus <logit_scale, its gradient>
        when grads has "logit_scale"), whose backward gives this micro-batch's share of the gradient
        of the loss over the whole step. grads: {"q_v": {level: like q_v}, "q_t": {...}, "logit_scale"?}.
        """
        video, ids, am = batch["video"], batch["input_ids"], batch["attention_mask"]
        b = video.shape[0]
        video_ids = batch["video_ids"].to(video.device).long()
        valid = batch.get("valid")
        valid = torch.ones(b, dtype=torch.bool, device=video.device) if valid is None else valid.to(video.device).bool()
        group_ids = batch.get("group_ids")  # [B] int64, -1 = no group (queue.mask_same_group); None = unknown
        group_ids = None if group_ids is None else group_ids.to(video.device).long()

        q_v = self.video(video)  # {level: [B, D] | [B, T', D]}
        q_t = self.text(ids, am)  # {level: [B, D] | [B, L', D], level_mask: [B, L']}
        if phase == "replay":
            total = torch.zeros((), device=video.device, dtype=torch.float32)
            for side, emb in (("q_v", q_v), ("q_t", q_t)):
                for name, g in grads[side].items():
                    if g is not None:
                        total = total + (emb[name].float() * g.float()).sum()
            if grads.get("logit_scale") is not None:
                total = total + (self.logit_scale.float() * grads["logit_scale"].float()).sum()
            return {"loss": total}
        if not self.uses_keys:  # symmetric without a queue: no key is scored or kept, skip the key encoders
            k_v = {k: x.detach() for k, x in q_v.items()}
            k_t = {k: x.detach() for k, x in q_t.items()}
        else:
            with torch.no_grad():
                k_v = self.video_key(video)
                k_t = self.text_key(ids, am)
        if phase == "embed":
            return {"q_v": q_v, "q_t": q_t, "k_v": k_v, "k_t": k_t, "video_ids": video_ids, "valid": valid,
                    "group_ids": group_ids, "logit_scale": self.logit_scale.detach().clone()}
        if phase != "loss":
            raise ValueError(f"unknown forward phase {phase!r} (loss | embed | replay)")
        return self.objective(q_v, q_t, k_v, k_t, video_ids, valid, self.logit_scale,
                              rank=dist.get_rank(), world_size=dist.get_world_size(), group_ids=group_ids)

    def _momentum_pairs(self) -> list[tuple[str, nn.Module, nn.Module]]:
        """(key tower name, query tower, key tower) for both modalities."""
        if self.video_key is None:  # the objective uses no keys: no copies exist
            return []
        return [("video_key", self.video, self.video_key), ("text_key", self.text, self.text_key)]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k = m * theta_k + (1 - m) * theta_q for both key encoders (after optimizer.step).

        Key weights in bf16 (DeepSpeed's bf16 casts every parameter, the `requires_grad=False` key towers
        too, and keeps no fp32 master of them) would barely move: a step of (1 - m) * (q - k) = 0.005 *
        (q - k) is mostly under half a bf16 ulp of k, so after 100 steps 42% of the elements had never
        changed. So the EMA then runs on an fp32 shadow of the key weights (`momentum_state`, saved with
        the checkpoint) and the bf16 keys are the shadow rounded once: they stay within about one bf16
        ulp of the fp32 EMA (tests/test_momentum.py).
        """
        if not self.uses_keys:
            return
        m = self.cfg.queue.momentum
        for name, query, key in self._momentum_pairs():
            q_params = [p.detach() for p in query.parameters()]
            k_params = [p.data for p in key.parameters()]
            if any(k.dtype != torch.float32 for k in k_params):
                shadow = self._momentum_shadow(name, k_params)  # fp32, on the keys' device
                torch._foreach_lerp_(shadow, [q.float() for q in q_params], 1.0 - m)  # m * s + (1 - m) * q
                torch._foreach_copy_(k_params, shadow)  # rounded to the keys' dtype once
            elif any(k.dtype != q.dtype for k, q in zip(k_params, q_params)):
                for k, q in zip(k_params, q_params):
                    k.mul_(m).add_(q.to(k.dtype), alpha=1.0 - m)
            else:
                torch._foreach_mul_(k_params, m)
                torch._foreach_add_(k_params, q_params, alpha=1.0 - m)

    def _momentum_shadow(self, name: str, k_params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The fp32 shadow of key tower `name`, made from its weights the first time (then they are exact:
        the query's fp32 master starts from the same rounded weights); follows the keys to their device."""
        shadow = self._key_shadow.get(name)
        if shadow is None or len(shadow) != len(k_params):
            shadow = [k.detach().float().clone() for k in k_params]
        elif shadow[0].device != k_params[0].device:
            shadow = [s.to(k_params[0].device) for s in shadow]
        self._key_shadow[name] = shadow
        return shadow

    def momentum_state(self) -> dict:
        """{key tower name: {parameter name: fp32 CPU tensor}}: the fp32 shadows of low-precision key weights
        (empty when the keys are fp32: their weights are the whole state). For the checkpoint's client state."""
        state = {}
        for name, _, key in self._momentum_pairs():
            shadow = self._key_shadow.get(name)
            if shadow is not None:
                state[name] = {n: s.detach().cpu().clone() for (n, _), s in zip(key.named_parameters(), shadow)}
        return state

    @torch.no_grad()
    def load_momentum_state(self, state: dict) -> None:
        """Restore `momentum_state()`'s shadows (and set the key weights from them, as an update does)."""
        for name, _, key in self._momentum_pairs():
            saved = (state or {}).get(name)
            if saved is None:
                continue
            named = list(key.named_parameters())
            if [n for n, _ in named] != list(saved):
                raise RuntimeError(f"checkpoint momentum state of {name} does not match the model's parameters")
            k_params = [p.data for _, p in named]
            self._key_shadow[name] = [saved[n].to(device=p.device, dtype=torch.float32) for n, p in named]
            torch._foreach_copy_(k_params, self._key_shadow[name])

    @torch.no_grad()
    def enqueue(self, out: dict) -> None:
        """Push the step's all-gathered keys (padded samples dropped) into every queue, in rank order."""
        self.objective.enqueue(out["keys"])


KEY_PREFIXES = {"video_key.": "video.", "text_key.": "text."}  # momentum copy -> the query tower it copies


def _match_key_encoders(module, state_dict, prefix, *args) -> None:
    """A state dict from a run with the other objective: drop its momentum copies when this model has
    none (an old symmetric checkpoint), or start them as copies of the query towers when it has them
    and the state dict does not (what a fresh model does at build), so both load strictly."""
    for key_prefix, query_prefix in KEY_PREFIXES.items():
        mine, theirs = prefix + key_prefix, prefix + query_prefix
        have = [k for k in state_dict if k.startswith(mine)]
        if not module.uses_keys:
            for k in have:
                del state_dict[k]
        elif not have:
            for k in [k for k in state_dict if k.startswith(theirs)]:
                state_dict[mine + k[len(theirs):]] = state_dict[k].clone()


def compile_towers(model: HierarchicalModel) -> list[str]:
    """`train.compile`: torch.compile every tower, query and key (`nn.Module.compile`: in place, so the
    state dict, checkpoints and DeepSpeed see the same parameters and names). Returns what was compiled."""
    compiled = []
    for name in ("video", "text", "video_key", "text_key"):
        tower = getattr(model, name, None)
        if tower is not None:
            tower.compile()
            compiled.append(name)
    return compiled


def set_matmul_precision(cfg: Config, device: torch.device | str) -> str | None:
    """`train.tf32`: fp32 matmuls on TF32 tensor cores ("high") or full fp32 ("highest"), on CUDA only
    (CPU numerics stay as they are). Returns the precision set, None when nothing was set."""
    if torch.device(device).type != "cuda":
        return None
    precision = "high" if cfg.train.tf32 else "highest"
    torch.set_float32_matmul_precision(precision)
    return precision


def build_model(cfg: Config) -> HierarchicalModel:
    """The model for `cfg.model.preset`, with its queues (`cfg.queue`). Seed before calling."""
    return HierarchicalModel(cfg)
