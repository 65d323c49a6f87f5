"""Retrieval metrics (R@1/5/10, MdR, MnR) exactly as PAPERS.md defines them, in bounded memory.

Definitions (the community reference is CLIP4Clip's `compute_metrics`):
- A similarity matrix `x` [queries x gallery]; each query has one ground-truth gallery item.
- rank (0-based) = number of gallery items scoring >= the ground truth, minus one. Ties are
  therefore broken *pessimistically* (a tie costs a place). On tie-free matrices this is
  identical to the reference; with ties the reference counts a row several times (a known bug),
  which we do not reproduce. Every result reports `tied_queries`: how many queries had another
  gallery item scoring exactly the ground truth's score.
- R@K = 100 * mean(rank < K); MdR = median(rank) + 1; MnR = mean(rank) + 1.
- Several captions per video (`caption_to_video[c]` = the video of caption c):
  t2v: every caption is a query over the videos; v2t: per video, the best rank among its
  captions in the caption gallery = the number of *other videos'* captions scoring >= the best
  of its own captions (so a video's own captions never push each other down). This is the
  dual-encoding / HANet protocol on MSR-VTT full; CLIP4Clip's multi-sentence v2t instead
  collapses each video's captions into one item by max, which ranks videos, not captions.
- DSL (dual softmax, an inference-time re-weighting that needs every query at once):
  DSL(x) = x * softmax(scale * x, axis=0) for x [queries x gallery], i.e. each gallery item's
  scores are normalised over all *queries* (CAMoE / CLIP4Clip+DSL / TS2-Net apply it to the
  logits, which carry CLIP's logit scale 100: our similarities are cosines, so `scale`
  plays that role, default 100). t2v softmaxes over captions per video; v2t (x.T) over videos
  per caption. Reported as separate rows marked DSL, never in place of the plain numbers.

Memory: `blocked_ranks` never holds more than `block_rows x gallery` scores per matrix: a block
of text rows against every video. Both directions come from row blocks in two passes: pass 1
ranks t2v (complete within a row) and records each video's best own-caption score (and the
column log-sum-exp DSL needs); pass 2 counts, per video, the other captions scoring >= it.
NaN scores count as -inf: a NaN ground truth lands last, a NaN competitor never wins.

Diagnostics (what R@k hides; ties and NaNs count as failures, as above):
- Order sensitivity (`order_sensitivity`): the share of captions that score their own video
  strictly above the same video with its frames reversed in time. 100% = always prefers the
  true order; about 50% = no consistent preference (order-blind in effect). A model that cannot
  see frame order at all (mean pooling, no positions) ties every pair, and a tie is a failure:
  0%, with `ties` = every caption, so it is never mistaken for a model that prefers the truth.
- Groups (`group_metrics`, for datasets whose videos come in groups of related videos, e.g.
  the synthetic corpus's siblings that differ only in event order or direction): group R@1 =
  the top-1 video is in the query's group (its best in-group score beats every other group's
  videos); sibling R@1 = among the query's own group, its own video scores highest. Chance:
  group size / gallery size and 1 / group size, averaged over the queries.

Owns: R@K, MdR, MnR, DSL and the diagnostics, as pure tensor functions.
Must not touch: models, files or collectives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from hiervl.data.sampler import group_codes

KS = (1, 5, 10)
DEFAULT_DSL_SCALE = 100.0


@dataclass
class Ranks:
    """0-based pessimistic ranks of every query, and whether its ground truth was tied."""

    ranks: np.ndarray  # int64 [Q]
    tied: np.ndarray  # bool [Q]


def metrics_from_ranks(ranks, tied=None) -> dict:
    """R1/R5/R10 (percent), MdR, MnR (1-based), number of queries and of tied queries."""
    ranks = np.asarray(ranks, dtype=np.int64)
    if ranks.size == 0:
        raise ValueError("no queries to rank: the similarity matrix is empty")
    out = {f"R{k}": float(100.0 * np.mean(ranks < k)) for k in KS}
    out["MdR"] = float(np.median(ranks) + 1)
    out["MnR"] = float(np.mean(ranks) + 1)
    out["queries"] = int(ranks.size)
    out["tied_queries"] = int(np.sum(tied)) if tied is not None else 0
    return out


def _as_tensor(sim) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(sim)) if isinstance(sim, np.ndarray) else sim.detach()
    if t.dim() != 2:
        raise ValueError(f"a similarity matrix must be 2-D [queries x gallery], got shape {tuple(t.shape)}")
    return t if t.is_floating_point() else t.double()


def _clean(x: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf, in place (score blocks are fresh tensors; `_matrix_rows` copies when needed)."""
    return x.nan_to_num_(nan=float("-inf")) if x.is_floating_point() else x


def rows_for_budget(num_gallery: int, num_matrices: int = 1, budget_mb: float = 256.0) -> int:
    """Rows per block so that the blocks (float32 scores plus boolean temporaries) fit `budget_mb`."""
    per_row = max(1, num_gallery) * (4 * num_matrices + 8)  # bytes: scores, plus compare/DSL temporaries
    return max(1, int(budget_mb * 2**20 // per_row))


def dual_softmax(sim, scale: float = DEFAULT_DSL_SCALE):
    """DSL(x) = x * softmax(scale * x, axis=0) for x [queries x gallery] (NumPy in, NumPy out)."""
    t = _clean(_as_tensor(sim).clone())
    out = t * torch.softmax(scale * t, dim=0)
    return out.numpy() if isinstance(sim, np.ndarray) else out


# ---------------------------------------------------------------------------- blocked core


def blocked_ranks(score_rows: Callable[[int, int], dict], num_texts: int, num_videos: int,
                  caption_to_video, block_rows: int, directions: tuple = ("t2v", "v2t"),
                  dsl_scale: float | None = None, progress: Callable[[int], None] | None = None,
                  replace_nan: bool = True) -> dict:
    """Ranks of every named matrix without ever holding more than one block of rows.

    score_rows(i, j) -> {name: [j-i, num_videos] tensor}: text rows i..j-1 against all videos
    (the same values every time it is called with the same i, j; with `replace_nan` NaNs are
    replaced in place, so return fresh tensors, not views of data you keep). caption_to_video [num_texts]
    int: each text row's ground-truth video. Returns {name: {"t2v": Ranks, "v2t": Ranks,
    and with dsl_scale "t2v_dsl", "v2t_dsl"}} for the directions asked; v2t ranks cover the
    videos that have at least one caption, in video order.
    """
    c2v = torch.as_tensor(np.asarray(caption_to_video), dtype=torch.long)
    if c2v.shape != (num_texts,):
        raise ValueError(f"caption_to_video has shape {tuple(c2v.shape)}, expected ({num_texts},)")
    if num_texts and (int(c2v.min()) < 0 or int(c2v.max()) >= num_videos):
        raise ValueError(f"caption_to_video holds video indices outside 0..{num_videos - 1}")
    want_v2t = "v2t" in directions
    dsl = dsl_scale is not None
    blocks = [(i, min(i + block_rows, num_texts)) for i in range(0, num_texts, max(1, block_rows))]
    t2v: dict = {}  # name -> (ranks list, tied list)
    t2v_dsl: dict = {}
    best: dict = {}  # name -> [Nv] best own-caption score (v2t ground truth)
    best_dsl: dict = {}
    col_lse: dict = {}  # name -> [Nv] log-sum-exp of scale*x over all text rows (t2v DSL)

    def rank_rows(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gt = x.gather(1, g[:, None])  # [b, 1] ground-truth scores
        ge = torch.sum(x >= gt, dim=1, dtype=torch.int32)  # [b] items at least as good, ground truth included
        gt_strict = torch.sum(x > gt, dim=1, dtype=torch.int32)
        return ge - 1, (ge - gt_strict) > 1

    def v2t_dsl_rows(x: torch.Tensor) -> torch.Tensor:
        return x * torch.softmax(dsl_scale * x, dim=1)  # softmax over videos per caption = DSL(x.T).T

    # pass 1: t2v ranks; each video's best own-caption score; DSL column normaliser
    for i, j in blocks:
        for name, x in score_rows(i, j).items():
            x = _clean(x) if replace_nan else x
            g = c2v[i:j].to(x.device)
            r, tie = rank_rows(x, g)
            t2v.setdefault(name, ([], []))
            t2v[name][0].append(r.cpu())
            t2v[name][1].append(tie.cpu())
            if want_v2t:
                gt = x.gather(1, g[:, None])[:, 0]
                best.setdefault(name, torch.full((num_videos,), float("-inf"), dtype=x.dtype, device=x.device))
                best[name].scatter_reduce_(0, g, gt, reduce="amax")
            if dsl:
                lse = torch.logsumexp(dsl_scale * x, dim=0)  # [Nv]
                prev = col_lse.get(name)
                col_lse[name] = lse if prev is None else torch.logaddexp(prev, lse)
                if want_v2t:
                    y = _clean(v2t_dsl_rows(x))
                    best_dsl.setdefault(name, torch.full((num_videos,), float("-inf"), dtype=x.dtype, device=x.device))
                    best_dsl[name].scatter_reduce_(0, g, y.gather(1, g[:, None])[:, 0], reduce="amax")
        if progress:
            progress(j - i)

    out = {name: {"t2v": Ranks(torch.cat(r).long().numpy(), torch.cat(t).numpy())} for name, (r, t) in t2v.items()}
    if not (want_v2t or dsl):
        return out

    # pass 2: v2t counts (other captions scoring >= the video's best), DSL t2v ranks
    ge_cnt: dict = {}
    eq_cnt: dict = {}
    ge_dsl: dict = {}
    eq_dsl: dict = {}

    def count_columns(x: torch.Tensor, g: torch.Tensor, ref: torch.Tensor, ge_acc: dict, eq_acc: dict, name: str):
        ge = torch.sum(x >= ref[None, :], dim=0, dtype=torch.int32)  # [Nv] every caption of the block, own included
        eq = torch.sum(x == ref[None, :], dim=0, dtype=torch.int32)
        # own captions reach the best only when they are it (ref = their max): take them back out
        own = x.gather(1, g[:, None])[:, 0] >= ref[g]  # [b]
        own_cnt = torch.zeros_like(ge).scatter_add_(0, g, own.to(ge.dtype))
        ge_acc[name] = ge_acc.get(name, 0) + ge - own_cnt
        eq_acc[name] = eq_acc.get(name, 0) + eq - own_cnt

    for i, j in blocks:
        for name, x in score_rows(i, j).items():
            x = _clean(x) if replace_nan else x
            g = c2v[i:j].to(x.device)
            if want_v2t:
                count_columns(x, g, best[name], ge_cnt, eq_cnt, name)
            if dsl:
                z = x * torch.exp(dsl_scale * x - col_lse[name][None, :])  # DSL(x) rows, t2v
                r, tie = rank_rows(_clean(z), g)
                t2v_dsl.setdefault(name, ([], []))
                t2v_dsl[name][0].append(r.cpu())
                t2v_dsl[name][1].append(tie.cpu())
                if want_v2t:
                    count_columns(_clean(v2t_dsl_rows(x)), g, best_dsl[name], ge_dsl, eq_dsl, name)
        if progress:
            progress(j - i)

    has_caption = torch.zeros(num_videos, dtype=torch.bool)
    has_caption[c2v] = True
    for name in out:
        if want_v2t:
            ge_cnt[name], eq_cnt[name] = ge_cnt[name].cpu(), eq_cnt[name].cpu()
            out[name]["v2t"] = Ranks(ge_cnt[name][has_caption].long().numpy(), (eq_cnt[name][has_caption] > 0).numpy())
        if dsl:
            r, t = t2v_dsl[name]
            out[name]["t2v_dsl"] = Ranks(torch.cat(r).long().numpy(), torch.cat(t).numpy())
            if want_v2t:
                ge, eq = ge_dsl[name].cpu(), eq_dsl[name].cpu()
                out[name]["v2t_dsl"] = Ranks(ge[has_caption].long().numpy(), (eq[has_caption] > 0).numpy())
    return out


# ---------------------------------------------------------------------------- in-memory API


def _matrix_rows(t: torch.Tensor) -> tuple[Callable[[int, int], dict], bool]:
    """Row blocks of an in-memory matrix: views, or copies when NaNs must be replaced (the
    caller's matrix is never written); returns (score_rows, replace_nan)."""
    if bool(torch.isnan(t).any()):
        return (lambda i, j: {"sim": t[i:j].clone()}), True
    return (lambda i, j: {"sim": t[i:j]}), False


def retrieval_metrics(sim, block_rows: int | None = None) -> dict:
    """Metrics of `sim` [queries x gallery] (NumPy or torch), ground truth on the diagonal.

    Rows are the queries: pass `x` for text-to-video and `x.T` for video-to-text. Returns
    {"R1", "R5", "R10" (percent), "MdR", "MnR", "queries", "tied_queries"}.
    """
    t = _as_tensor(sim)
    q, g = t.shape
    if q > g:
        raise ValueError(f"{q} queries but only {g} gallery items: the ground truth must lie on the diagonal")
    rows = block_rows or rows_for_budget(g)
    score_rows, has_nan = _matrix_rows(t)
    ranks = blocked_ranks(score_rows, q, g, np.arange(q), rows, directions=("t2v",), replace_nan=has_nan)["sim"]["t2v"]
    return metrics_from_ranks(ranks.ranks, ranks.tied)


def multi_caption_metrics(sim, caption_to_video, block_rows: int | None = None,
                          dsl_scale: float | None = None) -> dict:
    """Multi-caption protocol on `sim` [captions x videos]: {"t2v": metrics, "v2t": metrics}.

    caption_to_video [captions] int gives each caption's video (column). With `dsl_scale`,
    "t2v_dsl" and "v2t_dsl" are added (separate entries; the plain ones are unchanged).
    """
    t = _as_tensor(sim)
    rows = block_rows or rows_for_budget(t.shape[1])
    score_rows, has_nan = _matrix_rows(t)
    res = blocked_ranks(score_rows, t.shape[0], t.shape[1], caption_to_video, rows, dsl_scale=dsl_scale,
                        replace_nan=has_nan)["sim"]
    return {k: metrics_from_ranks(r.ranks, r.tied) for k, r in res.items()}


# ---------------------------------------------------------------------------- diagnostics


def order_sensitivity(forward, backward) -> dict:
    """How often a caption prefers its video played forward: {"order", "queries", "ties"}.

    forward [Q], backward [Q]: each caption's similarity to its own video, and to the same
    video with its frames reversed in time. "order" = 100 * mean(forward > backward): a tie
    (or a NaN on either side) is a failure, so a model whose preference is noise scores about
    50, and one exactly blind to frame order 0 (with "ties" = "queries").
    """
    f = np.asarray(forward, dtype=np.float64)
    b = np.asarray(backward, dtype=np.float64)
    if f.shape != b.shape or f.ndim != 1:
        raise ValueError(f"forward and backward scores must be 1-D of one length, got {f.shape} and {b.shape}")
    if f.size == 0:
        raise ValueError("no captions to score: order sensitivity needs at least one")
    wins = f > b  # NaN compares False: a failure
    return {"order": float(100.0 * wins.mean()), "queries": int(f.size), "ties": int(np.sum(f == b))}


def blocked_group_hits(score_rows: Callable[[int, int], dict], num_texts: int, caption_to_video,
                       video_group, block_rows: int) -> tuple[np.ndarray, dict]:
    """Group and sibling top-1 hits of every text row whose video has a group, one block at a time.

    score_rows as in `blocked_ranks` (fresh tensors: NaNs are replaced in place). video_group
    [Nv]: group names or codes (None / "" / -1 = none). Returns (rows [Q] int64: the text rows
    with a group, {name: {"group": bool [Q], "sibling": bool [Q]}}). Pessimistic: a hit needs a
    strictly higher score (the best in-group score above every other group's videos; the own
    video above every sibling).
    """
    gid = group_codes(video_group)
    gid_t = torch.as_tensor(gid, dtype=torch.long)  # [Nv]
    c2v = torch.as_tensor(np.asarray(caption_to_video), dtype=torch.long)  # [Nt]
    keep = gid_t[c2v] >= 0  # [Nt] text rows whose video has a group
    rows = keep.nonzero()[:, 0]
    hits: dict = {}
    for i in range(0, num_texts, max(1, block_rows)):
        j = min(i + block_rows, num_texts)
        sel = keep[i:j]
        if not bool(sel.any()):
            continue
        for name, x in score_rows(i, j).items():
            x = _clean(x)[sel.to(x.device)]  # [b, Nv] grouped rows only
            g = c2v[i:j][sel].to(x.device)  # [b] own video
            gv = gid_t.to(x.device)
            same = gv[None, :] == gv[g][:, None]  # [b, Nv] the query's group, own video included
            neg_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
            best_in = torch.where(same, x, neg_inf).amax(dim=1)  # [b]
            best_out = torch.where(same, neg_inf, x).amax(dim=1)  # [b] (-inf: one group fills the gallery)
            own = x.gather(1, g[:, None])[:, 0]  # [b]
            sib = same.clone()
            sib[torch.arange(len(g), device=x.device), g] = False
            best_sib = torch.where(sib, x, neg_inf).amax(dim=1)  # [b] (-inf: a group of one)
            h = hits.setdefault(name, {"group": [], "sibling": []})
            h["group"].append((best_in > best_out).cpu())
            h["sibling"].append((own > best_sib).cpu())
    out = {name: {k: torch.cat(v).numpy() for k, v in h.items()} for name, h in hits.items()}
    return rows.numpy(), out


def group_chance(caption_to_video, video_group) -> dict:
    """Chance group and sibling R@1 (percent) of the grouped text rows, and their counts."""
    gid = group_codes(video_group)
    c2v = np.asarray(caption_to_video, dtype=np.int64)
    g = gid[c2v]
    g = g[g >= 0]
    if g.size == 0:
        return {"group_R1": float("nan"), "sibling_R1": float("nan"), "queries": 0, "groups": 0}
    size = np.bincount(gid[gid >= 0])  # videos per group in the gallery
    return {"group_R1": float(100.0 * np.mean(size[g] / len(gid))), "sibling_R1": float(100.0 * np.mean(1.0 / size[g])),
            "queries": int(g.size), "groups": int(len(np.unique(g)))}


def group_metrics(sim, caption_to_video, video_group, block_rows: int | None = None) -> dict:
    """Group and sibling R@1 of `sim` [captions x videos] (NumPy or torch), pessimistic on ties.

    Returns {"group_R1", "sibling_R1" (percent over the captions whose video has a group),
    "chance": {"group_R1", "sibling_R1"}, "queries", "groups"}; None when no video has a group.
    """
    t = _as_tensor(sim)
    score_rows, _ = _matrix_rows(t)  # copies when NaNs must be replaced: the caller's matrix is never written
    rows, hits = blocked_group_hits(score_rows, t.shape[0], caption_to_video, video_group,
                                    block_rows or rows_for_budget(t.shape[1]))
    if len(rows) == 0:
        return None
    chance = group_chance(caption_to_video, video_group)
    h = hits["sim"]
    return {"group_R1": float(100.0 * h["group"].mean()), "sibling_R1": float(100.0 * h["sibling"].mean()),
            "chance": {"group_R1": chance["group_R1"], "sibling_R1": chance["sibling_R1"]},
            "queries": int(len(rows)), "groups": chance["groups"]}
