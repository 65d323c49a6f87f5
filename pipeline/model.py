"""HierarchicalModel: dual-stream video/text encoders, level heads, momentum keys and queues.

    model = build_model(cfg)
    out = model(batch)          # {"loss", "losses", "keys"}; keys are already all-gathered
    ...backward, optimizer step...
    model.momentum_update()     # key encoders <- EMA of the query encoders
    model.enqueue(out)          # push this step's global keys into every queue (all ranks alike)

Momentum Cross-modal Contrast (HiT): for every level and direction, each query of this rank is
scored against (a) its own momentum key (the positive), (b) the momentum keys of the whole
global batch (all-gathered without gradient, `queue.batch_negatives`), (c) the queue of keys
from earlier steps, and optionally (d) the global batch's *query* embeddings with gradient
(`queue.gather_batch_with_grad`, open_clip style). Negatives from the query's own video and
padded / never-filled slots are masked. Every term is per sample and the batch mean uses the
global valid count (pipeline/losses.py), so W ranks of batch b train exactly like one rank of
batch W*b: same losses, same gradients (after DeepSpeed's averaging), same queues.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import distributed as dist
from pipeline import losses as L
from pipeline.config import Config
from pipeline.encoders import TextEncoder, VideoEncoder
from pipeline.errors import UserError
from pipeline.levels import LevelHeads, feature_layers, level_similarity, level_weights, preset_levels, token_count
from pipeline.queue import MomentumQueue


class VideoTower(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.encoder = VideoEncoder(cfg)
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


class HierarchicalModel(nn.Module):
    """See the module docstring; `levels` lists the preset's level names."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        mc, qc = cfg.model, cfg.queue
        self.level_specs = preset_levels(mc.preset)
        self.levels = [lv.name for lv in self.level_specs]
        self.fusion_weights = level_weights(cfg)
        if cfg.data.num_frames > mc.max_frames:
            raise UserError(f"data.num_frames={cfg.data.num_frames} exceeds model.max_frames={mc.max_frames}; "
                            "raise model.max_frames")

        self.video = VideoTower(cfg)
        self.text = TextTower(cfg)
        fv, ft = feature_layers(cfg, self.video.encoder.num_layers, self.text.encoder.num_layers)
        self.video.heads = LevelHeads(cfg, "video", self.video.encoder.width, fv)
        self.text.heads = LevelHeads(cfg, "text", self.text.encoder.width, ft)

        # key encoders: momentum copies, never trained by the optimizer
        self.video_key = copy.deepcopy(self.video)
        self.text_key = copy.deepcopy(self.text)
        for p in list(self.video_key.parameters()) + list(self.text_key.parameters()):
            p.requires_grad_(False)

        learnable = mc.learnable_temperature if mc.learnable_temperature is not None else mc.preset == "hcmi"
        learnable = learnable and mc.loss == "infonce"  # the hinge has no temperature: no unused parameter
        init = torch.full((len(self.levels),), math.log(1.0 / mc.temperature))
        if learnable:
            self.logit_scale = nn.Parameter(init)  # [n_levels], log of 1/temperature
        else:
            self.register_buffer("logit_scale", init, persistent=False)

        self.queues = nn.ModuleDict()
        if qc.enabled:
            for lv in self.level_specs:
                for modality in ("video", "text"):
                    n = token_count(lv, modality, cfg)
                    shape = (mc.embed_dim,) if n is None else (n, mc.embed_dim)
                    fields = {"emb": (shape, torch.float32)}
                    if n is not None and modality == "text":
                        fields["mask"] = ((n,), torch.bool)
                    self.queues[f"{lv.name}_{modality}"] = MomentumQueue(qc.size, fields)

    # ------------------------------------------------------------------ encoding / inference

    def encode_video(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """Query-encoder level embeddings of video [N, T, C, H, W]: {level: [N, D] | [N, T', D]}."""
        return self.video(video)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Query-encoder level embeddings of captions: {level: [N, D] | [N, L', D], level_mask: [N, L']}."""
        return self.text(input_ids, attention_mask)

    def similarity(self, t: dict, v: dict) -> dict[str, torch.Tensor]:
        """{level: [Nt, Nv]} plus "fused": the level_weights-weighted mean of the levels."""
        sims = {lv.name: level_similarity(lv, t, v).float() for lv in self.level_specs}
        total = sum(self.fusion_weights.values())
        sims["fused"] = sum(self.fusion_weights[n] * sims[n] for n in self.levels) / total
        return sims

    # ------------------------------------------------------------------ training

    def _scale(self, i: int) -> torch.Tensor:
        return self.logit_scale[i].float().exp().clamp(max=self.cfg.model.max_logit_scale)

    def _pad_text_tokens(self, keys: dict) -> dict:
        """Pad text token keys to the queue's length (data.max_words) so every rank's shape agrees."""
        for lv in self.level_specs:
            if lv.text_source not in ("words", "feature"):
                continue  # global or clustered: fixed size already
            n = token_count(lv, "text", self.cfg)
            emb, mask = keys[lv.name], keys[f"{lv.name}_mask"]
            if emb.shape[1] > n:
                raise UserError(f"captions have {emb.shape[1]} tokens but data.max_words={n}; "
                                "tokenize with max_length=data.max_words")
            if emb.shape[1] < n:
                keys[lv.name] = F.pad(emb, (0, 0, 0, n - emb.shape[1]))
                keys[f"{lv.name}_mask"] = F.pad(mask, (0, n - mask.shape[1]), value=False)
        return keys

    @torch.no_grad()
    def _gather_keys(self, k_v: dict, k_t: dict, video_ids: torch.Tensor, valid: torch.Tensor) -> dict:
        """All ranks' momentum keys in rank order, with two all-gathers (floats, then ints)."""
        b = video_ids.shape[0]
        parts, layout = [], []
        for lv in self.level_specs:
            for modality, keys in (("video", k_v), ("text", k_t)):
                fields = {"emb": keys[lv.name]}
                if f"{lv.name}_mask" in keys:
                    fields["mask"] = keys[f"{lv.name}_mask"]
                for field, x in fields.items():
                    layout.append((f"{lv.name}_{modality}", field, tuple(x.shape[1:]), x.dtype))
                    parts.append(x.reshape(b, -1).float())
        flat = dist.all_gather(torch.cat(parts, dim=1))  # [G, F]
        ints = dist.all_gather(torch.stack([video_ids.long(), valid.long()], dim=1))  # [G, 2]
        banks: dict[str, dict[str, torch.Tensor]] = {}
        offset = 0
        for name, field, shape, dtype in layout:
            width = math.prod(shape)
            x = flat[:, offset:offset + width].reshape(-1, *shape)
            banks.setdefault(name, {})[field] = x.bool() if dtype == torch.bool else x
            offset += width
        return {"banks": banks, "video_ids": ints[:, 0], "valid": ints[:, 1].bool()}

    def _bank(self, name: str, gathered: dict, with_queue: bool):
        """Candidates for one (level, modality): gathered keys then queue. Returns (fields, ids, valid)."""
        fields = dict(gathered["banks"][name])
        ids, valid = gathered["video_ids"], gathered["valid"]
        if with_queue and name in self.queues:
            q_fields, q_ids, q_valid = self.queues[name].snapshot()
            fields = {k: torch.cat([v.float() if v.is_floating_point() else v,
                                    q_fields[k].to(v.device, v.dtype)]) for k, v in fields.items()}
            ids = torch.cat([ids, q_ids.to(ids.device)])
            valid = torch.cat([valid, q_valid.to(valid.device)])
        return fields, ids, valid

    def _neg_mask(self, video_ids: torch.Tensor, bank_ids: torch.Tensor, bank_valid: torch.Tensor,
                  n_batch: int, batch_allowed: bool) -> torch.Tensor:
        """[B, N] allowed negatives: filled/valid, not the query's own video, batch part if allowed."""
        mask = bank_valid.unsqueeze(0).expand(video_ids.shape[0], -1).clone()  # [B, N]
        if not batch_allowed:
            mask[:, :n_batch] = False
        if self.cfg.queue.mask_same_video:
            mask &= bank_ids.unsqueeze(0) != video_ids.unsqueeze(1)
        return mask

    def _direction_loss(self, sim: torch.Tensor, target: torch.Tensor, neg: torch.Tensor, i: int,
                        valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        mc = self.cfg.model
        if mc.loss == "hinge":
            return L.hinge(sim, target, neg, mc.margin)
        enhance = mc.enhance_weight if mc.marginal_enhance else 0.0
        loss, p_pos = L.infonce(sim, target, neg, self._scale(i), enhance, mc.margin)
        if mc.label_denoise:
            loss = loss * L.denoise_weights(p_pos, valid, count, mc.denoise_gamma)
        return loss

    def forward(self, batch: dict) -> dict:
        video, ids, am = batch["video"], batch["input_ids"], batch["attention_mask"]
        b = video.shape[0]
        video_ids = batch["video_ids"].to(video.device).long()
        valid = batch.get("valid")
        valid = torch.ones(b, dtype=torch.bool, device=video.device) if valid is None else valid.to(video.device).bool()
        rank = dist.get_rank()

        q_v = self.video(video)  # {level: [B, D] | [B, T', D]}
        q_t = self.text(ids, am)
        with torch.no_grad():
            k_v = self.video_key(video)
            k_t = self._pad_text_tokens(self.text_key(ids, am))
            gathered = self._gather_keys(k_v, k_t, video_ids, valid)
        n_batch = gathered["video_ids"].shape[0]  # G = W * B
        target = rank * b + torch.arange(b, device=video.device)  # [B] column of each own key
        count = L.global_count(valid)
        qc = self.cfg.queue

        losses, total = {}, 0.0
        for i, lv in enumerate(self.level_specs):
            name = lv.name
            qv = {name: q_v[name].float()}
            qt = {name: q_t[name].float(), f"{name}_mask": q_t.get(f"{name}_mask")}
            bt_fields, bt_ids, bt_valid = self._bank(f"{name}_text", gathered, qc.enabled)
            bv_fields, bv_ids, bv_valid = self._bank(f"{name}_video", gathered, qc.enabled)
            bank_t = {name: bt_fields["emb"], f"{name}_mask": bt_fields.get("mask")}
            bank_v = {name: bv_fields["emb"]}
            sim_v2t = level_similarity(lv, bank_t, qv).transpose(0, 1)  # [B, G+K]
            sim_t2v = level_similarity(lv, qt, bank_v)  # [B, G+K]
            neg_v2t = self._neg_mask(video_ids, bt_ids, bt_valid, n_batch, qc.batch_negatives)
            neg_t2v = self._neg_mask(video_ids, bv_ids, bv_valid, n_batch, qc.batch_negatives)
            if qc.gather_batch_with_grad:  # the global batch's queries, with gradient, as extra negatives
                all_t = {name: dist.all_gather_with_grad(qt[name])}
                if lv.kind == "token":
                    all_t[f"{name}_mask"] = dist.all_gather(qt[f"{name}_mask"].long()).bool()
                all_v = {name: dist.all_gather_with_grad(qv[name])}
                extra = self._neg_mask(video_ids, gathered["video_ids"], gathered["valid"], n_batch, True)
                extra[torch.arange(b), target] = False  # the positive is the key column, not this one
                sim_v2t = torch.cat([sim_v2t, level_similarity(lv, all_t, qv).transpose(0, 1)], dim=1)
                sim_t2v = torch.cat([sim_t2v, level_similarity(lv, qt, all_v)], dim=1)
                neg_v2t = torch.cat([neg_v2t, extra], dim=1)
                neg_t2v = torch.cat([neg_t2v, extra], dim=1)
            l_v2t = self._direction_loss(sim_v2t, target, neg_v2t, i, valid, count)
            l_t2v = self._direction_loss(sim_t2v, target, neg_t2v, i, valid, count)
            level_loss = L.global_mean(0.5 * (l_v2t + l_t2v), valid, count)
            losses[name] = level_loss.detach()
            total = total + level_loss
        return {"loss": total, "losses": losses, "keys": gathered}

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k = m * theta_k + (1 - m) * theta_q for both key encoders (after optimizer.step)."""
        m = self.cfg.queue.momentum
        for query, key in ((self.video, self.video_key), (self.text, self.text_key)):
            q_params = [p.detach() for p in query.parameters()]
            k_params = [p.data for p in key.parameters()]
            if any(k.dtype != q.dtype for k, q in zip(k_params, q_params)):
                for k, q in zip(k_params, q_params):
                    k.mul_(m).add_(q.to(k.dtype), alpha=1.0 - m)
            else:
                torch._foreach_mul_(k_params, m)
                torch._foreach_add_(k_params, q_params, alpha=1.0 - m)

    @torch.no_grad()
    def enqueue(self, out: dict) -> None:
        """Push the step's all-gathered keys (padded samples dropped) into every queue, in rank order."""
        if not self.cfg.queue.enabled:
            return
        keys = out["keys"]
        keep = keys["valid"].nonzero().squeeze(1)  # identical on every rank
        ids = keys["video_ids"][keep]
        for name, queue in self.queues.items():
            queue.push({field: x[keep] for field, x in keys["banks"][name].items()}, ids)


def build_model(cfg: Config) -> HierarchicalModel:
    """The model for `cfg.model.preset`, with its queues (`cfg.queue`). Seed before calling."""
    return HierarchicalModel(cfg)
