"""Per-sample contrastive losses over a bank of keys, and the split-independent batch mean.

A query's row of similarities `sim` [B, N] covers a bank of N candidates: its own positive
(column `target`: its momentum key, or its pair's query embedding in the symmetric recipe) and
possible negatives; `neg_mask` [B, N] says which columns are real negatives (filled queue slots
and valid in-batch keys or queries from other videos). Every loss here is
per sample and depends only on the query's row, so it cannot depend on how the global batch is
split across ranks.

`global_mean` turns per-sample losses into this rank's share of the global mean:
    loss_rank = sum_{local valid i} l_i * W / N_valid_global
Averaging that over the W ranks (what DeepSpeed does with gradients, and what the trainer does
when it logs) gives sum_{all valid i} l_i / N_valid_global: exactly the loss one rank would
compute on the whole global batch, padded samples and uneven valid counts included.

Owns: per-sample InfoNCE and hinge losses and the batch mean.
Must not touch: queues, levels or collectives beyond hiervl.distributed.
"""

from __future__ import annotations

import math

import torch
from hiervl import distributed as dist


def infonce(sim: torch.Tensor, target: torch.Tensor, neg_mask: torch.Tensor, scale: torch.Tensor,
            enhance_weight: float = 0.0, margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """-log softmax of the positive among itself and the allowed negatives.

    sim [B, N] raw similarities; target [B] column of each positive; neg_mask [B, N] bool;
    scale: the logit scale (1/temperature). With `enhance_weight` > 0 (HCMI's marginal sample
    enhancement), negatives within `margin` of the positive count (1 + enhance_weight) times.
    Returns (loss [B], probability of the positive [B], detached).
    """
    rows = torch.arange(sim.shape[0], device=sim.device)
    is_pos = torch.zeros_like(neg_mask)
    is_pos[rows, target] = True
    neg_mask = neg_mask & ~is_pos
    allowed = neg_mask | is_pos
    sim = sim.masked_fill(~allowed, 0.0)  # masked columns (e.g. empty slots) must not reach the scale's grad
    logits = sim * scale  # [B, N]
    if enhance_weight > 0:
        s_pos = sim[rows, target].detach().unsqueeze(1)  # [B, 1]
        hard = neg_mask & (sim.detach() > s_pos - margin)  # [B, N]
        logits = logits + hard.to(logits.dtype) * math.log1p(enhance_weight)
    logits = logits.masked_fill(~allowed, float("-inf"))
    log_prob = logits[rows, target] - torch.logsumexp(logits, dim=1)  # [B]
    return -log_prob, log_prob.detach().exp()


def hinge(sim: torch.Tensor, target: torch.Tensor, neg_mask: torch.Tensor, margin: float) -> torch.Tensor:
    """VSE++ max-of-hinges: relu(margin - s_pos + max allowed negative); 0 without negatives. [B]"""
    rows = torch.arange(sim.shape[0], device=sim.device)
    neg_mask = neg_mask.clone()
    neg_mask[rows, target] = False
    s_pos = sim[rows, target]  # [B]
    hardest = sim.masked_fill(~neg_mask, float("-inf")).max(dim=1).values  # [B]
    has_neg = neg_mask.any(dim=1)
    return torch.where(has_neg, (margin - s_pos + hardest.clamp(min=-1e4)).clamp(min=0), torch.zeros_like(s_pos))


def global_count(valid: torch.Tensor) -> torch.Tensor:
    """Valid samples over all ranks (a float scalar, at least 1)."""
    return dist.all_reduce_sum(valid.float().sum().reshape(1)).reshape(()).clamp(min=1.0)


def global_mean(per_sample: torch.Tensor, valid: torch.Tensor, count: torch.Tensor,
                world_size: int | None = None) -> torch.Tensor:
    """This rank's share of the global mean over valid samples (see the module docstring).

    world_size: W (None = ask torch.distributed; the objective passes its own argument).
    """
    world = dist.get_world_size() if world_size is None else world_size
    local = torch.where(valid, per_sample, torch.zeros_like(per_sample)).sum()
    return local * world / count


def denoise_weights(p_pos: torch.Tensor, valid: torch.Tensor, count: torch.Tensor, gamma: float) -> torch.Tensor:
    """HCMI-style adaptive label denoising: weight_i = p_i^gamma / (global mean of p^gamma).

    A pair whose positive the model finds implausible (low p) looks like a noisy label and is
    down-weighted; the global normalisation keeps the loss scale and is split-independent.
    """
    w = p_pos.detach().clamp(min=1e-12) ** gamma  # [B]
    total = dist.all_reduce_sum(torch.where(valid, w, torch.zeros_like(w)).sum().reshape(1)).reshape(())
    return w / (total / count).clamp(min=1e-12)
