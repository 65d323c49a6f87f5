"""The order of samples in an epoch, and which slots of it each rank takes.

Everything here is a pure function of (seed, epoch, dataset, world size, batch size): no
state, no randomness outside `numpy.random.default_rng([seed, epoch, ...])`, no decoding. That
is what makes the loader exactly-once, resumable and elastic:

- `epoch_order(...)` is the epoch's sequence of sample indices (a permutation of 0..N-1).
  `global`: a full permutation. `block`: shards shuffled, then taken `window` at a time and
  their samples interleaved at random while each shard is still read front to back (cheap
  sequential reads on object stores). `grouped`: hard negatives; the members of a group
  (`DatasetIndex.group_ids`, e.g. the synthetic siblings or the clips of one source video) are
  contiguous, so they share a global batch; see `grouped_order` for how groups are kept from
  straddling a batch boundary without making the order depend on the world or batch size.
- A *position* p is the number of global samples consumed in the epoch. The rest of the epoch
  is `order[p:]`. It is cut into global batches of G = B * W slots; global batch k gives rank r
  the slots `[k*G + r*B, k*G + (r+1)*B)` of the rest (so a global batch is the ranks' batches
  concatenated in rank order: W ranks of batch B see what 1 rank of batch W*B sees).
- The rest rarely divides by G. `drop`: the last partial global batch is not yielded (those
  samples are unseen this epoch; the next epoch's permutation differs). `pad`: it is filled with
  padding slots (index -1, flagged invalid, the loss ignores them). Either way every rank yields
  the same number of batches, so no collective ever waits on a rank that ran out.
- With gradient accumulation over `accum` batches (`train.global_batch`), the epoch is cut into whole
  optimizer steps of accum * G samples (`num_batches`): a step is `order[s*accum*G:(s+1)*accum*G]`
  whatever the split into ranks and micro-batches, and never straddles two epochs.
- After global batch k the position is `min(p + (k+1)*G, N)`: a resumed loader, at any world
  size, continues with `order[position:]`: no repeat and no gap.

Owns: epoch order, rank slots, frame indices and caption choice, all pure functions.
Must not touch: files, decoding or torch.distributed.
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


def group_codes(groups) -> np.ndarray:
    """Group names (str, or None / "" / NaN for no group) -> int64 [N] codes, -1 = no group; an integer
    array of codes passes through (negative = no group). The one definition: the sampler and eval use it.

    Codes number the groups in order of first appearance, so they depend only on the dataset
    (its sample order and names), not on Python's hash salt or the process.
    """
    if isinstance(groups, np.ndarray) and groups.dtype.kind in "iu":  # codes already: negative = no group
        return np.where(groups >= 0, groups, -1).astype(np.int64)
    codes: dict[str, int] = {}
    out = np.full(len(groups), -1, dtype=np.int64)
    for i, g in enumerate(groups):
        if g is not None and g != "" and not (isinstance(g, float) and g != g):  # None, "" and NaN: no group
            out[i] = codes.setdefault(g, len(codes))
    return out


def grouped_order(group_ids: np.ndarray, rng: np.random.Generator, chunk: int = 16) -> np.ndarray:
    """A permutation of range(N), int64 [N], in which each group's members are contiguous.

    `group_ids` [N] int64, -1 = no group (a sample alone, a group of one). Members are shuffled
    within their group, groups come in random order.

    Batch boundaries. A global batch is the contiguous slice `order[k*G:(k+1)*G]` (G = B * W), so
    a contiguous group shares a batch unless it straddles a multiple of G. The order must not
    depend on G (a resume at another world size or batch size continues the same order with no
    repeat and no gap), so groups are packed into *chunks* of exactly `chunk` (C) slots, a fixed
    grid that knows nothing of B and W: the groups of >= 2 members, largest first (random order
    among equal sizes), each go into the open chunk whose free space fits them most tightly (best
    fit decreasing; a new chunk when none fits; a group larger than C opens ceil(size / C) * C
    slots), then the holes are filled with the ungrouped samples, and the rest of those make whole
    chunks. The full chunks come first, in random order, then the chunks that stayed short (no
    ungrouped samples left to fill them), in random order. When G is a multiple of C, every global
    batch boundary lies on the chunk grid (positions are multiples of G from 0, also after a resume
    at another world size with a G that is a multiple of C), so a group of <= C members straddles
    two global batches only if it sits in the short-chunk tail at the end of the epoch. Hence the
    default C = 16: the global batches of the configs (16, 64, 256 per rank) are multiples of it.
    Which groups share a batch still changes every epoch (the chunks are re-packed per epoch).

    Share of groups split across two global batches, 2002 samples, mean of 5 epochs (G=16 / G=32),
    packed with C=16 vs unpacked (C=1: groups contiguous, nothing else):
      groups of 4 (synthetic siblings) and one of 2     0.000 / 0.000   vs  0.101 / 0.050
      groups of 2..6, 35% of samples ungrouped          0.000 / 0.000   vs  0.104 / 0.050
      groups of 2..8, none ungrouped (holes stay open)   0.047 / 0.021   vs  0.265 / 0.130
      groups of 2..20, none ungrouped                   0.285 / 0.168   vs  0.635 / 0.319
    (groups larger than G must straddle.) Costs: a Python loop over the groups of >= 2 members,
    about 2 s per epoch for 1M samples in groups of 1..8, once per epoch on each rank.
    Caveat: with data.remainder=drop the dropped tail of an epoch (< G samples) comes from the
    short chunks, i.e. from groups whose sizes pack badly; which of them changes per epoch.
    """
    group_ids = np.asarray(group_ids, dtype=np.int64)
    n = len(group_ids)
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    # members of each group, shuffled: sort by (group, random key); ungrouped samples in random order
    grouped = np.flatnonzero(group_ids >= 0)
    members = grouped[np.lexsort((rng.random(len(grouped)), group_ids[grouped]))]
    _, starts, sizes = np.unique(group_ids[members], return_index=True, return_counts=True)
    alone = np.concatenate([np.flatnonzero(group_ids < 0), members[starts[sizes == 1]]])  # groups of one
    alone = alone[rng.permutation(len(alone))]
    multi = np.flatnonzero(sizes >= 2)
    multi = multi[rng.permutation(len(multi))]  # groups in random order
    multi = multi[np.argsort(-sizes[multi], kind="stable")]  # largest first (random among equal sizes)
    # best fit into chunks of C slots; open_[f] = the chunks with f free slots (0 < f < C)
    chunks: list[list[np.ndarray]] = []
    free: list[int] = []
    open_: list[list[int]] = [[] for _ in range(chunk)]
    for g in multi.tolist():
        size = int(sizes[g])
        part = members[starts[g]:starts[g] + size]
        fit = next((f for f in range(size, chunk) if open_[f]), None) if size < chunk else None
        if fit is None:
            c = len(chunks)
            chunks.append([part])
            free.append(-size % chunk)
        else:
            c = open_[fit].pop()
            chunks[c].append(part)
            free[c] -= size
        if free[c]:
            open_[free[c]].append(c)
    # holes filled by ungrouped samples, in chunk order
    used = 0
    for c in range(len(chunks)):
        take = min(free[c], len(alone) - used)
        if take:
            chunks[c].append(alone[used:used + take])
            free[c] -= take
            used += take
    rest = alone[used:]
    full = [np.concatenate(parts) for c, parts in enumerate(chunks) if free[c] == 0]
    full += [rest[i:i + chunk] for i in range(0, len(rest) - len(rest) % chunk, chunk)]
    short = [np.concatenate(parts) for c, parts in enumerate(chunks) if free[c] > 0]
    if len(rest) % chunk:
        short.append(rest[len(rest) - len(rest) % chunk:])
    full = [full[i] for i in rng.permutation(len(full))]
    short = [short[i] for i in rng.permutation(len(short))]
    out = np.concatenate(full + short) if n else np.zeros(0, dtype=np.int64)
    return out.astype(np.int64)


def epoch_order(num_samples: int, seed: int, epoch: int, mode: str = "global",
                shard_ids: np.ndarray | None = None, window: int = 4,
                group_ids: np.ndarray | None = None, group_chunk: int = 16) -> np.ndarray:
    """The epoch's sample order: a permutation of range(num_samples), int64 [N].

    `shard_ids` [N] (block mode only) names each sample's shard; samples of one shard are
    taken in their given (in-shard) order. `group_ids` [N] (grouped mode only, see
    `group_codes`) names each sample's group, -1 = none; `group_chunk` is `grouped_order`'s C.
    """
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    if mode == "global":
        return rng.permutation(num_samples).astype(np.int64)
    if mode == "grouped":
        if group_ids is None or len(group_ids) != num_samples:
            raise ValueError("grouped order needs group_ids with one entry per sample")
        return grouped_order(group_ids, rng, group_chunk)
    if mode != "block":
        raise ValueError(f"unknown order mode {mode!r} (global | block | grouped)")
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


def num_batches(remaining: int, batch_size: int, world_size: int, remainder: str, accum: int = 1) -> int:
    """Batches every rank yields for `remaining` global samples (identical on all ranks).

    `accum`: batches per optimizer step; the epoch is then cut into whole steps of
    G = batch_size * world_size * accum samples (drop: a partial last step is not yielded; pad: it is
    padded), so a step never straddles two epochs and the same G gives the same steps at any split.
    """
    g = batch_size * world_size * accum
    steps = remaining // g if remainder == "drop" else -(-remaining // g)
    return steps * accum


def rank_plan(order: np.ndarray, position: int, batch_size: int, rank: int, world_size: int,
              remainder: str = "drop", accum: int = 1) -> RankPlan:
    """Rank `rank`'s batches for `order[position:]` (see the module docstring; `accum`: see `num_batches`)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    n = len(order)
    if not 0 <= position <= n:
        raise ValueError(f"position {position} is outside the epoch [0, {n}]")
    g = batch_size * world_size
    rest = order[position:]
    count = num_batches(len(rest), batch_size, world_size, remainder, accum)
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
