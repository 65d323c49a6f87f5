"""Levels of the hierarchy: which embeddings each preset makes, and how a level scores a pair.

A level is either `global` (one L2-normalised vector per video / caption, cosine similarity) or
`token` (a set of L2-normalised tokens per side). A token level reduces its word x frame matrix by
`model.token_align`:
- `max` (default): DRL's unweighted token-wise interaction `ti` (not its learned-weight WTI): for
  every word the best frame, averaged over the words, and for every frame the best word, averaged
  over the frames; the two halves are averaged; padded words never count. Blind to the order of
  frames and of words.
- `monotonic`: the same two halves, but the words' chosen frames must not go back in time as the
  caption goes on (and the frames' chosen words must not go back in the caption): the best
  monotone alignment, a hard DTW with one partner per token, found by dynamic programming. A
  caption "A then B" then scores higher against the video where A happens before B. It assumes
  the words run in the order of time, which "B after A" does not.
- `directed`: `monotonic` either way: g * forward + (1 - g) * backward (the words' frames going
  back in time as the caption goes on), with g = sigmoid of a per-caption logit that the text
  head reads off the caption's mean top-layer state (`<level>_dir` [N] in the text embeddings;
  starts at g = 0.88). The gate is the caption's, not the pair's, so the level stays order-aware:
  a caption that reads forward still scores "A then B" against A->B above B->A.
`model.detach_token_levels` makes the token levels read detached encoder states: their losses then
train only their own heads (projections, cluster pools), never the shared encoders.

Presets (PAPERS.md):
- `hit`:   feature (token: frames vs words of a lower layer, `model.feature_layer`, default the
           middle one) and semantic (global: top layer, mean-pooled).
- `hcmi`:  frame_word (token, top layer), clip_phrase (token: frames adaptively clustered into
           `num_clips` clip tokens, words into `num_phrases` phrase tokens by learned cluster
           centres), video_sentence (global).
- `hanet`: individual (token: frame-word), local (token: `num_clips` contiguous temporal windows
           against context tokens clustered from the words), global (video-text).
- `flat`:  global only (mean-pooled frames against the mean-pooled caption): the baseline.

Embedding dicts map a level name to [N, D] (global) or [N, n_tokens, D] (token); text token
levels add `<level>_mask` [N, n_tokens] bool. Every entry has first dim N, so they slice.

Owns: the level heads and how a level scores a pair.
Must not touch: which levels a preset has (pipeline/presets.py).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from hiervl.config import Config
from hiervl.errors import UserError
from hiervl.presets import Level, level_names, preset_levels
from torch import nn


def model_levels(cfg: Config) -> tuple[Level, ...]:
    """The preset's levels with this config's token alignment (`model.token_align`) on the token levels."""
    return tuple(dataclasses.replace(lv, align=cfg.model.token_align) if lv.kind == "token" else lv
                 for lv in preset_levels(cfg.model.preset))


def feature_layers(cfg: Config, video_layers: int, text_layers: int) -> tuple[int, int]:
    """HiT's feature level: hidden-state index per tower (None = each tower's middle layer)."""
    f = cfg.model.feature_layer
    if f is None:
        return video_layers // 2, text_layers // 2
    if f < 0 or f > min(video_layers, text_layers):
        raise UserError(f"model.feature_layer={f} but the temporal transformer has {video_layers} layers and the "
                        f"text encoder {text_layers}; use 0..{min(video_layers, text_layers)} or null (middle)")
    return f, f


def token_count(level: Level, modality: str, cfg: Config) -> int | None:
    """Tokens per sample of a level's embedding (None for a global level): sizes the queues."""
    if level.kind == "global":
        return None
    source = level.video_source if modality == "video" else level.text_source
    if source in ("frames", "words", "feature"):
        return cfg.data.num_frames if modality == "video" else cfg.data.max_words
    if source == "windows":
        return cfg.model.num_clips
    return cfg.model.num_clips if modality == "video" else cfg.model.num_phrases


# ------------------------------------------------------------------------------- pooling


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of x [B, N, W], counting only mask [B, N] True entries."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)  # [B, N, 1]
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # [B, W]


class ClusterPool(nn.Module):
    """Adaptive clustering of tokens into `num` cluster tokens (learned centres, soft assignment).

    Each centre attends over the (unmasked) tokens; a cluster token is the attention-weighted
    mean of the tokens it gathers, so correlated frames (words) land in the same clip (phrase).
    """

    def __init__(self, width: int, num: int):
        super().__init__()
        self.centres = nn.Parameter(torch.randn(num, width) * width ** -0.5)  # [C, W]
        self.norm = nn.LayerNorm(width)
        self.scale = width ** -0.5

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        att = torch.einsum("cw,bnw->bcn", self.centres, self.norm(x)) * self.scale  # [B, C, N]
        if mask is not None:
            att = att.masked_fill(~mask.bool().unsqueeze(1), float("-inf"))
        return att.softmax(dim=-1) @ x  # [B, C, W]


def temporal_windows(x: torch.Tensor, num: int) -> torch.Tensor:
    """Means over `num` contiguous windows of frames: x [B, T, W] -> [B, num, W]."""
    return F.adaptive_avg_pool1d(x.transpose(1, 2), num).transpose(1, 2)


# ------------------------------------------------------------------------------- heads


class LevelHeads(nn.Module):
    """One modality's level embeddings from its encoder's hidden states (projection per level)."""

    def __init__(self, cfg: Config, modality: str, width: int, feature_layer: int):
        super().__init__()
        self.modality = modality
        self.levels = preset_levels(cfg.model.preset)
        self.feature_layer = feature_layer
        self.detach_tokens = cfg.model.detach_token_levels
        self.proj = nn.ModuleDict({lv.name: nn.Linear(width, cfg.model.embed_dim) for lv in self.levels})
        self.pools = nn.ModuleDict()
        for lv in self.levels:
            source = lv.video_source if modality == "video" else lv.text_source
            if source == "clusters":
                num = cfg.model.num_clips if modality == "video" else cfg.model.num_phrases
                self.pools[lv.name] = ClusterPool(width, num)
        # token_align=directed: per text token level, the caption's direction logit (forward = positive)
        self.gates = nn.ModuleDict()
        if modality == "text" and cfg.model.token_align == "directed":
            for lv in self.levels:
                if lv.kind == "token":
                    gate = nn.Linear(width, 1)
                    nn.init.zeros_(gate.weight)
                    nn.init.constant_(gate.bias, 2.0)  # sigmoid(2) = 0.88: forward, the usual caption order
                    self.gates[lv.name] = gate
        self.num_windows = cfg.model.num_clips

    def forward(self, states: list[torch.Tensor], mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """states: hidden states, each [B, N, W]; mask [B, N] (text) or None (video)."""
        out: dict[str, torch.Tensor] = {}
        for lv in self.levels:
            source = lv.video_source if self.modality == "video" else lv.text_source
            tok_mask = mask
            top = states[-1]  # [B, N, W]
            level_states = states
            if lv.kind == "token" and self.detach_tokens:  # this level's loss stops at its own head
                top = top.detach()
                level_states = [s.detach() for s in states]
            if source == "pooled":
                x = masked_mean(top, mask)  # [B, W]
            elif source in ("frames", "words"):
                x = top  # [B, N, W]
            elif source == "feature":
                x = level_states[self.feature_layer]  # [B, N, W]
            elif source == "clusters":
                x = self.pools[lv.name](top, mask)  # [B, C, W]
                tok_mask = None
            elif source == "windows":
                x = temporal_windows(top, self.num_windows)  # [B, C, W]
                tok_mask = None
            else:  # pragma: no cover - PRESETS is fixed
                raise ValueError(source)
            out[lv.name] = F.normalize(self.proj[lv.name](x), dim=-1)  # [B, D] or [B, n, D]
            if lv.kind == "token" and self.modality == "text":
                if tok_mask is None:
                    tok_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
                out[f"{lv.name}_mask"] = tok_mask.bool()  # [B, n]
            if lv.name in self.gates:
                out[f"{lv.name}_dir"] = self.gates[lv.name](masked_mean(top, mask)).squeeze(-1).float()  # [B]
        return out


# ------------------------------------------------------------------------------- similarity


def global_similarity(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of unit vectors: t [Nt, D], v [Nv, D] -> [Nt, Nv]."""
    return t @ v.transpose(0, 1)


def _blocked_similarity(halves, t: torch.Tensor, t_mask: torch.Tensor | None, v: torch.Tensor,
                        max_elements: int) -> torch.Tensor:
    """The token-wise scores' one driver: t [Nt, L, D] with t_mask [Nt, L], v [Nv, T, D] -> [Nt, Nv].

    Videos go in blocks so the scores s [Nt, block, L, T] stay under `max_elements`;
    `halves(s, t_mask, words)` -> (t2v, v2t) [Nt, Nb] each is the alignment; the result is their
    average, with v2t 0 for a caption without a valid word (e.g. empty queue slots).
    """
    nt, nl = t.shape[:2]
    if t_mask is None:
        t_mask = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
    t_mask = t_mask.bool()
    words = t_mask.to(t.dtype).sum(dim=1).clamp(min=1.0)  # [Nt]
    block = max(1, max_elements // max(1, nt * nl * v.shape[1]))
    parts = []
    for start in range(0, v.shape[0], block):
        s = torch.einsum("ald,btd->ablt", t, v[start:start + block])  # [Nt, Nb, L, T]
        t2v, v2t = halves(s, t_mask, words)  # [Nt, Nb] each; v2t -inf where a caption has no valid word
        v2t = torch.where(t_mask.any(dim=1)[:, None], v2t, torch.zeros_like(v2t))
        parts.append(0.5 * (t2v + v2t))
    return torch.cat(parts, dim=1) if parts else t.new_zeros(nt, 0)


def _max_halves(s: torch.Tensor, t_mask: torch.Tensor, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """WTI: every valid word's best frame, mean over valid words; every frame's best valid word, mean over frames."""
    word_best = s.max(dim=3).values  # [Nt, Nb, L]
    t2v = (word_best * t_mask[:, None, :].to(s.dtype)).sum(dim=2) / words[:, None]  # [Nt, Nb]
    s = s.masked_fill(~t_mask[:, None, :, None], float("-inf"))
    return t2v, s.max(dim=2).values.mean(dim=2)  # [Nt, Nb] each


def token_similarity(t: torch.Tensor, t_mask: torch.Tensor | None, v: torch.Tensor,
                     max_elements: int = 1 << 25) -> torch.Tensor:
    """Token-wise aggregation (WTI): t [Nt, L, D] with t_mask [Nt, L], v [Nv, T, D] -> [Nt, Nv].

    t2v half: every valid word takes its best frame, mean over valid words.
    v2t half: every frame takes its best valid word, mean over frames. Result: the average.
    Computed in blocks of videos so [Nt, block, L, T] stays under `max_elements`.
    """
    return _blocked_similarity(_max_halves, t, t_mask, v, max_elements)


def _monotone_best(s: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Best monotone alignment score of rows to columns: s [..., R, C], valid [..., R] bool -> [...].

    Each valid row takes one column; the columns taken never decrease down the rows (a row may take
    the same column as the row before). Invalid rows are skipped. Dynamic programming over the rows:
    best[..., c] = the best sum of the rows so far with the last valid one at column c.
    """
    best = torch.zeros_like(s[..., 0, :])  # [..., C]
    for r in range(s.shape[-2]):
        step = best.cummax(dim=-1).values + s[..., r, :]  # [..., C]: last column <= c, then this row at c
        best = torch.where(valid[..., r, None], step, best)
    return best.max(dim=-1).values  # [...]


def _monotone_halves(s: torch.Tensor, t_mask: torch.Tensor, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order-aware: the best monotone word->frame alignment over the valid words, and frame->word over the frames."""
    nt, nb, nl, nf = s.shape
    word_valid = t_mask[:, None, :].expand(nt, nb, nl)  # [Nt, Nb, L]
    t2v = _monotone_best(s, word_valid) / words[:, None]  # [Nt, Nb]
    st = s.masked_fill(~t_mask[:, None, :, None], float("-inf")).transpose(2, 3)  # [Nt, Nb, T, L]
    frame_valid = torch.ones(nt, nb, nf, dtype=torch.bool, device=s.device)
    return t2v, _monotone_best(st, frame_valid) / nf  # [Nt, Nb] each


def monotonic_token_similarity(t: torch.Tensor, t_mask: torch.Tensor | None, v: torch.Tensor,
                               max_elements: int = 1 << 24) -> torch.Tensor:
    """Order-aware token similarity: t [Nt, L, D] with t_mask [Nt, L], v [Nv, T, D] -> [Nt, Nv].

    t2v half: the valid words in caption order each take a frame, frames non-decreasing; the best
    such alignment's summed similarity over the valid words. v2t half: the frames in time order
    each take a valid word, word positions non-decreasing; the best sum over the frames. The two
    halves are averaged. Without the order constraint this is `token_similarity` (the `max` align).
    """
    return _blocked_similarity(_monotone_halves, t, t_mask, v, max_elements)


def directed_token_similarity(t: torch.Tensor, t_mask: torch.Tensor | None, direction: torch.Tensor,
                              v: torch.Tensor) -> torch.Tensor:
    """`token_align=directed`: t [Nt, L, D], t_mask [Nt, L], direction [Nt] logits, v [Nv, T, D] -> [Nt, Nv].

    g * monotonic(forward) + (1 - g) * monotonic(frames reversed), g = sigmoid(direction): a caption
    whose words run backward in time ("B after A") can align backward; the caption decides, not the pair.
    """
    g = torch.sigmoid(direction.float()).to(t.dtype)[:, None]  # [Nt, 1]
    forward = monotonic_token_similarity(t, t_mask, v)
    backward = monotonic_token_similarity(t, t_mask, v.flip(1))
    return g * forward + (1 - g) * backward


def level_similarity(level: Level, t_emb: dict, v_emb: dict) -> torch.Tensor:
    """[Nt, Nv] similarity of one level from text and video embedding dicts (see module doc)."""
    if level.kind == "global":
        return global_similarity(t_emb[level.name], v_emb[level.name])
    t, t_mask = t_emb[level.name], t_emb.get(f"{level.name}_mask")
    if level.align == "directed":
        direction = t_emb.get(f"{level.name}_dir")
        if direction is None:
            raise ValueError(f"level {level.name!r} aligns `directed` but the text embeddings have no "
                             f"'{level.name}_dir' (the text head of model.token_align=directed makes it)")
        return directed_token_similarity(t, t_mask, direction, v_emb[level.name])
    score = monotonic_token_similarity if level.align == "monotonic" else token_similarity
    return score(t, t_mask, v_emb[level.name])


def level_weights(cfg: Config) -> dict[str, float]:
    """Inference fusion weights per level (model.level_weights; missing levels weigh 1)."""
    # names and an all-zero sum are refused at load (ModelConfig.__post_init__)
    return {n: float(cfg.model.level_weights.get(n, 1.0)) for n in level_names(cfg.model.preset)}


def loss_weights(cfg: Config) -> dict[str, float]:
    """Training weights of the per-level losses (model.loss_weights; missing levels weigh 1)."""
    return {n: float(cfg.model.loss_weights.get(n, 1.0)) for n in level_names(cfg.model.preset)}
