"""The order of samples in an epoch, and which slots of it each rank takes.

Everything here is a pure function of (seed, epoch, dataset, world size, batch size): no
state, no randomness outside `numpy.random.default_rng([seed, epoch, ...])`, no decoding. That
is what makes the loader exactly-once, resumable and elastic:

- `epoch_order(...)` is the epoch's sequence of sample indices (a permutation of 0..N-1).
  `global`: a full permutation. `block`: shards shuffled, then taken `window` at a time and
  their samples interleaved at random while each shard is still read front to back (cheap
  sequential reads on object stores).
- A *position* p is the number of global samples consumed in the epoch. The rest of the epoch
  is `order[p:]`. It is cut into global batches of G = B * W slots; global batch k gives rank r
  the slots `[k*G + r*B, k*G + (r+1)*B)` of the rest (so a global batch is the ranks' batches
  concatenated in rank order: W ranks of batch B see what 1 rank of batch W*B sees).
- The rest rarely divides by G. `drop`: the last partial global batch is not yielded (those
  samples are unseen this epoch; the next epoch's permutation differs). `pad`: it is filled with
  padding slots (index -1, flagged invalid, the loss ignores them). Either way every rank yields
  the same number of batches, so no collective ever waits on a rank that ran out.
- After global batch k the position is `min(p + (k+1)*G, N)`: a resumed loader, at any world
  size, continues with `order[position:]`: no repeat and no gap.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

PAD = -1  # sample index of a padding slot


def stable_hash(text: str, bits: int = 63) -> int:
    """A process-independent non-negative integer hash of `text` (Python's hash() is salted)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << bits) - 1)


def epoch_order(num_samples: int, seed: int, epoch: int, mode: str = "global",
                shard_ids: np.ndarray | None = None, window: int = 4) -> np.ndarray:
    """The epoch's sample order: a permutation of range(num_samples), int64 [N].

    `shard_ids` [N] (block mode only) names each sample's shard; samples of one shard are
    taken in their given (in-shard) order.
    """
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    if mode == "global":
        return rng.permutation(num_samples).astype(np.int64)
    if mode != "block":
        raise ValueError(f"unknown order mode {mode!r} (global | block)")
    if shard_ids is None or len(shard_ids) != num_samples:
        raise ValueError("block order needs shard_ids with one entry per sample")
    shard_ids = np.asarray(shard_ids)
    shards = np.unique(shard_ids)
    members = {s: np.flatnonzero(shard_ids == s) for s in shards}  # in-shard order kept
    shard_perm = shards[rng.permutation(len(shards))]
    out = []
    for start in range(0, len(shard_perm), window):
        group = shard_perm[start:start + window]
        # a random interleave that keeps each shard's own order: shuffle the shard labels
        labels = np.concatenate([np.full(len(members[s]), i) for i, s in enumerate(group)])
        labels = labels[rng.permutation(len(labels))]
        chunk = np.empty(len(labels), dtype=np.int64)
        # the j-th slot labelled s gets shard s's j-th sample: a stable sort lists each label's slots in order
        chunk[np.argsort(labels, kind="stable")] = np.concatenate([members[s] for s in group])
        out.append(chunk)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class RankPlan:
    """What one rank yields for the rest of an epoch, starting at global `start` position."""

    batches: list[np.ndarray]  # per batch: [B] sample indices (PAD = padding slot)
    positions: list[int]  # global position after each batch (same on every rank)

    def __len__(self) -> int:
        return len(self.batches)


def num_batches(remaining: int, batch_size: int, world_size: int, remainder: str) -> int:
    """Batches every rank yields for `remaining` global samples (identical on all ranks)."""
    g = batch_size * world_size
    return remaining // g if remainder == "drop" else -(-remaining // g)


def rank_plan(order: np.ndarray, position: int, batch_size: int, rank: int, world_size: int,
              remainder: str = "drop") -> RankPlan:
    """Rank `rank`'s batches for `order[position:]` (see the module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    n = len(order)
    if not 0 <= position <= n:
        raise ValueError(f"position {position} is outside the epoch [0, {n}]")
    g = batch_size * world_size
    rest = order[position:]
    count = num_batches(len(rest), batch_size, world_size, remainder)
    if remainder == "pad" and count * g > len(rest):
        rest = np.concatenate([rest, np.full(count * g - len(rest), PAD, dtype=np.int64)])
    batches, positions = [], []
    for k in range(count):
        lo = k * g + rank * batch_size
        batches.append(np.asarray(rest[lo:lo + batch_size], dtype=np.int64))
        positions.append(min(position + (k + 1) * g, n))
    return RankPlan(batches, positions)


def frame_indices(num_frames: int, count: int, rng: np.random.Generator | None) -> np.ndarray:
    """`count` frame indices spread uniformly over a clip of `num_frames` frames, int32 [count].

    The clip is cut into `count` equal segments; training (`rng` given) takes a random frame in
    each segment, evaluation (`rng=None`) the centre of each. Short clips repeat frames.
    """
    n = max(int(num_frames), 1)
    seg = n / count
    offsets = rng.random(count) if rng is not None else np.full(count, 0.5)
    idx = np.floor((np.arange(count) + offsets) * seg).astype(np.int64)
    return np.clip(idx, 0, n - 1).astype(np.int32)


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The augmentation RNG of one sample in one epoch: same draw on any rank, thread or resume."""
    return np.random.default_rng([seed, epoch, stable_hash(key)])


def choose_caption(captions: list[str], seed: int, epoch: int, key: str) -> str:
    """One caption per sample per epoch, a pure function of (seed, epoch, key)."""
    if len(captions) == 0:
        return ""
    return captions[stable_hash(f"{seed}:{epoch}:{key}") % len(captions)]
