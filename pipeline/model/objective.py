"""HierarchicalContrastiveLoss: the training objective, beside the model (which returns embeddings).

    objective = HierarchicalContrastiveLoss(cfg)
    out = objective(q_v, q_t, k_v, k_t, video_ids, valid, logit_scale, rank=r, world_size=w)
    # {"loss", "losses", "keys"}; keys are the step's all-gathered momentum keys
    objective.enqueue(out["keys"])  # after the optimizer step and the momentum update

It owns the level specs, one MomentumQueue per level and modality (HiT's banks: 2 levels x 2
modalities for `hit`), the negatives policy and the per-level losses. Like open_clip's ClipLoss
it takes `rank` and `world_size` as arguments and never asks torch.distributed for them; it only
runs the collectives (all-gathers of keys and queries, the global valid count).

Two recipes (`queue.objective`), for every level and both directions (text->video, video->text):

- `momentum` (HiT's Momentum Cross-modal Contrast, MoCo style): each query of this rank is scored
  against (a) its own momentum key, the positive, (b) the global batch's momentum keys
  (all-gathered without gradient, `queue.batch_negatives`), (c) the queue of keys from earlier
  steps. The positive is a detached key, so a tower gets gradient only as the query side of one
  direction. `queue.gather_batch_with_grad` adds (d) the global batch's *query* embeddings with
  gradient: then the row is the symmetric one below (balanced, the own query column is the
  positive) with the batch's momentum keys as extra negatives, the own key masked (queries scored
  only as negatives, against a key positive, would push every video from every caption with no
  matching pull).
- `symmetric` (CLIP's in-batch InfoNCE over the global batch, plus the queue as in ALBEF/BLIP's
  ITC): the positive and the in-batch negatives are the global batch's *query* embeddings,
  all-gathered with gradient (`dist.all_gather_with_grad`), so both towers get gradient from both
  directions; the queue's momentum keys are extra, detached negatives. The momentum encoders
  still run and their keys are still enqueued. (ALBEF scores queries against momentum keys; here
  only the queue is momentum-encoded.) Balanced: a row's query gets its gradient from the softmax
  over batch and queue, the batch columns theirs from the softmax over the batch alone (as in
  CLIP), because through the full row a column gets its positive's pull but only the batch's
  share of the push, a net pull of every video towards every caption. The loss value is the
  full row's; without a queue it is exactly CLIP's symmetric InfoNCE, value and gradient
  (tests/test_losses.py). `queue.batch_negatives=false` keeps only the queue's negatives.

- `both`: the sum of CLIP's in-batch rows (as `symmetric`, without the queue) and the `momentum`
  rows (query against its own momentum key, the batch's keys and the queue). The queue's negatives
  then sit only in rows whose positive is a momentum key too, so they are consistent with it. In
  `symmetric` a row's positive is a query and its queue negatives are momentum keys: the towers
  can lower that loss by moving away from where the (lagging) keys were rather than by telling
  samples apart.

What each of these guards against was seen in training runs: pipeline/model/FIDELITY.md, "The
objective: what was seen without each guard".

How the levels combine (`model.loss_on`): `levels` (default) trains one loss per level and sums
them with `model.loss_weights` (HiT/HCMI's per-level contrast; missing levels weigh 1); `fused`
trains one loss on the `model.level_weights` mean of the levels' similarity rows (HANet's
`fusion_loss`, pipeline/model/FIDELITY.md): every level's rows share one layout (batch columns,
queue columns, masks, targets), so the rows are averaged before the softmax / hinge.

In all three, negatives from the query's own video (`queue.mask_same_video`), padded samples and
never-filled queue slots are masked; with `queue.mask_same_group` also the queue entries of the
query's own group (its siblings: `group_ids`, from the manifest's `group` column). The global
batch's siblings stay negatives: `data.order=grouped` puts them there as the hard negatives, and
their keys are this step's; the queue's are older keys of the same videos, and on real data (clips
of one source video) the group's other clips are as likely to match the caption as not. Every term is per sample and the batch mean uses the global
valid count (pipeline/model/losses.py), so W ranks of batch b train exactly like one rank of batch W*b:
same losses, same gradients (after DeepSpeed's averaging), same queues.

Owns: `HierarchicalContrastiveLoss`: banks, queues, label denoising, marginal enhancement, with rank
and world size as arguments.
Must not touch: the encoders or the optimizer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hiervl import distributed as dist
from hiervl.config import Config
from hiervl.errors import UserError
from hiervl.model import losses as L
from hiervl.model.levels import level_similarity, level_weights, loss_weights, model_levels, token_count
from hiervl.model.queue import MomentumQueue
from torch import nn


def _text(name: str, fields: dict) -> dict:
    """A bank's or queue's text fields {emb, mask?, dir?} as a level's text embedding dict."""
    return {name: fields["emb"], f"{name}_mask": fields.get("mask"), f"{name}_dir": fields.get("dir")}


class HierarchicalContrastiveLoss(nn.Module):
    """See the module docstring. `queues` maps "<level>_<modality>" to its MomentumQueue."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        mc, qc = cfg.model, cfg.queue
        self.level_specs = model_levels(cfg)  # token alignment per model.token_align
        self.levels = [lv.name for lv in self.level_specs]
        self.fusion_weights = level_weights(cfg)  # loss_on=fused: the same fusion inference ranks by
        self.train_weights = loss_weights(cfg)  # loss_on=levels: each level loss's weight in the sum
        self.queues = nn.ModuleDict()
        if qc.enabled:
            for lv in self.level_specs:
                for modality in ("video", "text"):
                    n = token_count(lv, modality, cfg)
                    shape = (mc.embed_dim,) if n is None else (n, mc.embed_dim)
                    fields = {"emb": (shape, torch.float32)}
                    if n is not None and modality == "text":
                        fields["mask"] = ((n,), torch.bool)
                        if lv.align == "directed":
                            fields["dir"] = ((), torch.float32)  # the caption's direction logit
                    self.queues[f"{lv.name}_{modality}"] = MomentumQueue(qc.size, fields, groups=qc.mask_same_group)

    # ------------------------------------------------------------------ banks

    def _pad_text_tokens(self, emb: dict) -> dict:
        """Pad text token embeddings to data.max_words (the queue's length) so every rank's shape agrees."""
        emb = dict(emb)
        for lv in self.level_specs:
            if lv.text_source not in ("words", "feature"):
                continue  # global or clustered: fixed size already
            n = token_count(lv, "text", self.cfg)
            x, mask = emb[lv.name], emb[f"{lv.name}_mask"]
            if x.shape[1] > n:
                raise UserError(f"captions have {x.shape[1]} tokens but data.max_words={n}; "
                                "tokenize with max_length=data.max_words")
            if x.shape[1] < n:
                emb[lv.name] = F.pad(x, (0, 0, 0, n - x.shape[1]))  # keeps the gradient of a query
                emb[f"{lv.name}_mask"] = F.pad(mask, (0, n - mask.shape[1]), value=False)
        return emb

    @torch.no_grad()
    def _gather_keys(self, k_v: dict, k_t: dict, video_ids: torch.Tensor, valid: torch.Tensor,
                     group_ids: torch.Tensor | None = None) -> dict:
        """All ranks' momentum keys in rank order, with two all-gathers (floats, then ints).
        group_ids [B] (-1 = none; None = no groups) are gathered with the ids."""
        b = video_ids.shape[0]
        parts, layout = [], []
        for lv in self.level_specs:
            for modality, keys in (("video", k_v), ("text", k_t)):
                fields = {"emb": keys[lv.name]}
                if f"{lv.name}_mask" in keys:
                    fields["mask"] = keys[f"{lv.name}_mask"]
                if f"{lv.name}_dir" in keys:
                    fields["dir"] = keys[f"{lv.name}_dir"]  # [B]
                for field, x in fields.items():
                    layout.append((f"{lv.name}_{modality}", field, tuple(x.shape[1:]), x.dtype))
                    parts.append(x.reshape(b, -1).float())
        flat = dist.all_gather(torch.cat(parts, dim=1))  # [G, F]
        groups = torch.full_like(video_ids, -1) if group_ids is None else group_ids.to(video_ids.device)
        ints = dist.all_gather(torch.stack([video_ids.long(), valid.long(), groups.long()], dim=1))  # [G, 3]
        banks: dict[str, dict[str, torch.Tensor]] = {}
        offset = 0
        for name, field, shape, dtype in layout:
            width = math.prod(shape)
            x = flat[:, offset:offset + width].reshape(-1, *shape)
            banks.setdefault(name, {})[field] = x.bool() if dtype == torch.bool else x
            offset += width
        return {"banks": banks, "video_ids": ints[:, 0], "valid": ints[:, 1].bool(), "group_ids": ints[:, 2]}

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

    def _queue_bank(self, name: str, device: torch.device):
        """The queue of one (level, modality) alone: ({emb, mask?}, ids [K], valid [K]), or None."""
        if name not in self.queues:
            return None
        q_fields, q_ids, q_valid = self.queues[name].snapshot()
        return {k: v.to(device) for k, v in q_fields.items()}, q_ids.to(device), q_valid.to(device)

    def _neg_mask(self, video_ids: torch.Tensor, bank_ids: torch.Tensor, bank_valid: torch.Tensor,
                  n_batch: int, batch_allowed: bool, group_ids: torch.Tensor | None = None,
                  queue_groups: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N] allowed negatives: filled/valid, not the query's own video, batch part if allowed.

        The bank is n_batch batch columns then the queue; queue_groups [N - n_batch]: the queue
        entries' groups; with queue.mask_same_group the entries of the query's group (group_ids [B],
        -1 = none) are masked.
        """
        mask = bank_valid.unsqueeze(0).expand(video_ids.shape[0], -1).clone()  # [B, N]
        if not batch_allowed:
            mask[:, :n_batch] = False
        if self.cfg.queue.mask_same_video:
            mask &= bank_ids.unsqueeze(0) != video_ids.unsqueeze(1)
        if self.cfg.queue.mask_same_group and group_ids is not None and queue_groups is not None:
            g = group_ids.to(queue_groups.device)
            sibling = (queue_groups.unsqueeze(0) == g.unsqueeze(1)) & (g.unsqueeze(1) >= 0)  # [B, K]
            mask[:, n_batch:] &= ~sibling
        return mask

    def _queue_groups(self, name: str) -> torch.Tensor | None:
        """[K] group ids of a queue's entries (queue.mask_same_group), else None."""
        return self.queues[name].group_ids if name in self.queues else None

    # ------------------------------------------------------------------ rows of candidates

    def _momentum_rows(self, lv, qt: dict, qv: dict, gathered: dict, video_ids: torch.Tensor, local: torch.Tensor,
                       group_ids: torch.Tensor | None = None):
        """(sim_v2t, sim_t2v, neg_v2t, neg_t2v, target), each row [B, G+K]: own key, batch keys, queue."""
        name, qc = lv.name, self.cfg.queue
        n_batch = gathered["video_ids"].shape[0]
        bt_fields, bt_ids, bt_valid = self._bank(f"{name}_text", gathered, qc.enabled)
        bv_fields, bv_ids, bv_valid = self._bank(f"{name}_video", gathered, qc.enabled)
        bank_t = _text(name, bt_fields)
        bank_v = {name: bv_fields["emb"]}
        sim_v2t = level_similarity(lv, bank_t, qv).transpose(0, 1)  # [B, G+K]
        sim_t2v = level_similarity(lv, qt, bank_v)  # [B, G+K]
        qg = lambda m: self._queue_groups(f"{name}_{m}") if qc.enabled else None  # noqa: E731
        neg_v2t = self._neg_mask(video_ids, bt_ids, bt_valid, n_batch, qc.batch_negatives, group_ids, qg("text"))
        neg_t2v = self._neg_mask(video_ids, bv_ids, bv_valid, n_batch, qc.batch_negatives, group_ids, qg("video"))
        target = local  # [B] column of each own key
        return sim_v2t, sim_t2v, neg_v2t, neg_t2v, target

    def _symmetric_rows(self, lv, qt: dict, qv: dict, gathered: dict, video_ids: torch.Tensor,
                        local: torch.Tensor, with_keys: bool = False, with_queue: bool = True,
                        group_ids: torch.Tensor | None = None) -> list[dict]:
        """The rows of the balanced symmetric loss for (v2t, t2v): see `_symmetric_losses`.

        Per direction {"sim": [B, n] query rows (gradient to the queries), "target" [B], "neg" [B, n],
        "col_sim": [B, G] the same batch scores with gradient to the columns only, "col_neg" [B, G]}.
        Rows of different levels share their layout (columns, targets, masks), so `fused` averages them.
        """
        name, qc = lv.name, self.cfg.queue
        n_batch = gathered["video_ids"].shape[0]
        all_t = {name: dist.all_gather_with_grad(qt[name])}  # [G, ...], gradient back to each rank's slice
        if lv.kind == "token":
            all_t[f"{name}_mask"] = dist.all_gather(qt[f"{name}_mask"].long()).bool()
        if qt.get(f"{name}_dir") is not None:  # token_align=directed: the captions' direction, with gradient
            all_t[f"{name}_dir"] = dist.all_gather_with_grad(qt[f"{name}_dir"])
        all_v = {name: dist.all_gather_with_grad(qv[name])}
        # in-batch query negatives: switched by batch_negatives in symmetric; with_keys (momentum +
        # gather_batch_with_grad) they are always on and batch_negatives switches the key negatives
        allowed = lambda on: self._neg_mask(video_ids, gathered["video_ids"], gathered["valid"], n_batch, on)  # noqa: E731
        batch_neg = allowed(True if with_keys else qc.batch_negatives)  # [B, G]
        sg = lambda d: {k: (x.detach() if x is not None else None) for k, x in d.items()}  # noqa: E731
        out = []
        for query_is_text in (False, True):  # v2t, then t2v
            query, columns, modality = (qt, all_v, "video") if query_is_text else (qv, all_t, "text")

            def sim(q: dict, c: dict) -> torch.Tensor:  # [B, n]: rows are this rank's queries
                return level_similarity(lv, q, c) if query_is_text else level_similarity(lv, c, q).transpose(0, 1)

            sims, negs, target = [], [], local
            if with_keys:  # [B, G] momentum keys; the own key is the positive's pair, never a negative
                keys = gathered["banks"][f"{name}_{modality}"]
                key_neg = allowed(qc.batch_negatives)
                key_neg[torch.arange(local.shape[0], device=local.device), local] = False
                sims.append(sim(query, _text(name, keys)))
                negs.append(key_neg)
                target = n_batch + local
            sims.append(sim(query, sg(columns)))  # [B, G]: gradient to the queries only
            negs.append(batch_neg)
            bank = self._queue_bank(f"{name}_{modality}", qv[name].device) if with_queue else None
            if bank is not None:
                fields, ids, q_valid = bank
                sims.append(sim(query, _text(name, fields)))  # [B, K]
                negs.append(self._neg_mask(video_ids, ids, q_valid, 0, True, group_ids,
                                           self._queue_groups(f"{name}_{modality}")))
            out.append({"sim": torch.cat(sims, dim=1), "target": target, "neg": torch.cat(negs, dim=1),
                        "col_sim": sim(sg(query), columns), "col_neg": batch_neg})
        return out

    def _symmetric_losses(self, rows: list[dict], local: torch.Tensor, log_scale: torch.Tensor,
                          valid: torch.Tensor, count: torch.Tensor):
        """Per-sample (l_v2t, l_t2v), each [B], from `_symmetric_rows`: see the module docstring ("balanced").

        A row's candidates are (with_keys: the global batch's momentum keys of the other modality,
        the own one masked, then) the global batch's queries of the other modality (G columns, with
        gradient; its own pair is the positive) then that modality's queue (K, detached). The query
        side's gradient comes from the softmax over all G+K; the column side's from the softmax over
        the G batch columns alone, as in CLIP. (Through the full row the batch columns would get
        the pull of their positive but only a share of the push, the rest going to the queue: a
        net pull of every video towards every caption.) The value is the full-row loss.
        """
        out = []
        for r in rows:
            l_query = self._direction_loss(r["sim"], r["target"], r["neg"], log_scale, valid, count)
            # the temperature's gradient comes from l_query alone (as in CLIP), hence the detached scale
            l_column = self._direction_loss(r["col_sim"], local, r["col_neg"], log_scale.detach(), valid, count)
            out.append(l_query + (l_column - l_column.detach()))  # value: l_query; gradient: both sides
        return out[0], out[1]

    # ------------------------------------------------------------------ loss

    def _direction_loss(self, sim: torch.Tensor, target: torch.Tensor, neg: torch.Tensor, log_scale: torch.Tensor,
                        valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Per-sample loss [B] of one direction; log_scale: this level's log(1/temperature) (a scalar)."""
        mc = self.cfg.model
        if mc.loss == "hinge":
            return L.hinge(sim, target, neg, mc.margin)
        enhance = mc.enhance_weight if mc.marginal_enhance else 0.0
        scale = log_scale.float().exp().clamp(max=mc.max_logit_scale)
        loss, p_pos = L.infonce(sim, target, neg, scale, enhance, mc.margin)
        if mc.label_denoise:
            loss = loss * L.denoise_weights(p_pos, valid, count, mc.denoise_gamma)
        return loss

    def forward(self, q_v: dict, q_t: dict, k_v: dict, k_t: dict, video_ids: torch.Tensor, valid: torch.Tensor,
                logit_scale: torch.Tensor, rank: int, world_size: int, group_ids: torch.Tensor | None = None) -> dict:
        """Per-level losses of this rank's batch against the global batch and the queues.

        q_v / q_t: query embeddings (with gradient) {level: [B, D] | [B, n, D], text: level_mask [B, n]};
        k_v / k_t: momentum keys, same layout (no gradient); video_ids [B]; valid [B] bool (False = padded);
        logit_scale [n_levels]: log of 1/temperature per level (exp'd here, clamped at model.max_logit_scale);
        group_ids [B] int64 (-1 = no group; None = none known): queue.mask_same_group's groups.
        Returns {"loss": this rank's share of the global mean, "losses": {level: detached}, "keys": gathered}.
        `model.loss_on=levels`: loss = sum over levels of loss_weights[level] * level loss;
        `fused`: one loss on the level_weights mean of the levels' similarities ("losses" has "fused").
        """
        per_sample, gathered, count = self.direction_losses(q_v, q_t, k_v, k_t, video_ids, valid, logit_scale,
                                                            rank, world_size, group_ids)
        losses, total = {}, 0.0
        for name, (l_v2t, l_t2v) in per_sample.items():
            level_loss = L.global_mean(0.5 * (l_v2t + l_t2v), valid, count, world_size)
            losses[name] = level_loss.detach()
            total = total + self.train_weights.get(name, 1.0) * level_loss
        return {"loss": total, "losses": losses, "keys": gathered}

    def direction_losses(self, q_v: dict, q_t: dict, k_v: dict, k_t: dict, video_ids: torch.Tensor,
                         valid: torch.Tensor, logit_scale: torch.Tensor, rank: int, world_size: int,
                         group_ids: torch.Tensor | None = None):
        """The per-sample terms before the mean: ({level: (l_v2t [B], l_t2v [B])}, gathered keys, global count).

        Same arguments as `forward`; the two directions apart (tests check which tower each one reaches).
        With `model.loss_on=fused` the dict has one entry, "fused".
        """
        b = video_ids.shape[0]
        with torch.no_grad():
            gathered = self._gather_keys(k_v, self._pad_text_tokens(k_t), video_ids, valid, group_ids)
        if gathered["video_ids"].shape[0] != b * world_size:
            raise ValueError(f"gathered {gathered['video_ids'].shape[0]} keys but world_size={world_size} x batch {b}")
        local = rank * b + torch.arange(b, device=video_ids.device)  # [B] global column of each own sample
        count = L.global_count(valid)
        recipe = self.cfg.queue.objective
        symmetric = recipe in ("symmetric", "both")
        with_grad = symmetric or self.cfg.queue.gather_batch_with_grad  # the global batch's queries are columns
        q_t = self._pad_text_tokens(q_t) if with_grad else q_t  # same token count on every rank for the gather

        rows = {}  # level -> {"symmetric": [v2t, t2v] rows, "momentum": (sim_v2t, sim_t2v, neg_v2t, neg_t2v, target)}
        for lv in self.level_specs:
            name = lv.name
            qv = {name: q_v[name].float()}
            qt = {name: q_t[name].float(), f"{name}_mask": q_t.get(f"{name}_mask"), f"{name}_dir": q_t.get(f"{name}_dir")}
            rows[name] = {}
            if with_grad:  # "both": CLIP's in-batch rows alone; the queue serves the key term below
                rows[name]["symmetric"] = self._symmetric_rows(lv, qt, qv, gathered, video_ids, local,
                                                               with_keys=not symmetric, with_queue=recipe != "both",
                                                               group_ids=group_ids)
            if not with_grad or recipe == "both":
                rows[name]["momentum"] = self._momentum_rows(lv, qt, qv, gathered, video_ids, local, group_ids)
        scales = {lv.name: logit_scale[i] for i, lv in enumerate(self.level_specs)}
        if self.cfg.model.loss_on == "fused":  # HANet: one loss on the weighted mean of the level scores
            rows = {"fused": self._fuse_rows(rows)}
            scales = {"fused": logit_scale.mean()}  # one temperature for the one score (equal unless learned)

        out = {}
        for name, level_rows in rows.items():
            terms = []
            if "symmetric" in level_rows:
                terms.append(self._symmetric_losses(level_rows["symmetric"], local, scales[name], valid, count))
            if "momentum" in level_rows:
                sim_v2t, sim_t2v, neg_v2t, neg_t2v, target = level_rows["momentum"]
                terms.append((self._direction_loss(sim_v2t, target, neg_v2t, scales[name], valid, count),
                              self._direction_loss(sim_t2v, target, neg_t2v, scales[name], valid, count)))
            out[name] = (sum(t[0] for t in terms), sum(t[1] for t in terms))  # per sample [B] each
        return out, gathered, count

    def _fuse_rows(self, rows: dict) -> dict:
        """The level_weights mean of every level's rows (same layout in every level): one level's rows."""
        w = self.fusion_weights
        total = sum(w.values())
        mix = lambda xs: sum(w[n] * x for n, x in xs.items()) / total  # noqa: E731
        first = rows[self.levels[0]]
        fused = {}
        if "symmetric" in first:
            fused["symmetric"] = [
                {**first["symmetric"][d], "sim": mix({n: rows[n]["symmetric"][d]["sim"] for n in self.levels}),
                 "col_sim": mix({n: rows[n]["symmetric"][d]["col_sim"] for n in self.levels})} for d in (0, 1)]
        if "momentum" in first:
            _, _, neg_v2t, neg_t2v, target = first["momentum"]
            fused["momentum"] = (mix({n: rows[n]["momentum"][0] for n in self.levels}),
                                 mix({n: rows[n]["momentum"][1] for n in self.levels}), neg_v2t, neg_t2v, target)
        return fused

    @torch.no_grad()
    def enqueue(self, keys: dict) -> None:
        """Push the step's all-gathered keys (padded samples dropped) into every queue, in rank order."""
        if not self.cfg.queue.enabled:
            return
        keep = keys["valid"].nonzero().squeeze(1)  # identical on every rank
        ids = keys["video_ids"][keep]
        groups = keys["group_ids"][keep] if "group_ids" in keys else None
        for name, queue in self.queues.items():
            queue.push({field: x[keep] for field, x in keys["banks"][name].items()}, ids, groups)
