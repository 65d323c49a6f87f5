"""MomentumQueue: a ring buffer of momentum-encoder keys, replicated on every rank.

One queue per level and modality (HiT's memory banks). Each entry holds named tensors (the
key embedding `emb` [*shape], for text token levels also its `mask`), the entry's `video_ids`
(so keys from the query's own video can be masked out of the negatives), with `groups=True`
the entry's `group_ids` (-1 = no group; `queue.mask_same_group` masks the query's siblings) and
whether the slot was ever filled (`valid`: an empty slot is never a negative). `ptr` is the next
slot to write.

Everything is a registered buffer, so the queue is in `state_dict()` and every checkpoint.
The model all-gathers the keys of all ranks (no gradient, rank order), drops padded samples
identically everywhere and pushes the result: every rank holds the same queue, which is why a
resume at another world size can take any rank's copy.

Owns: `MomentumQueue`: buffers, pointer, push and state.
Must not touch: gathering (the objective does it) or losses.
"""

from __future__ import annotations

import torch
from hiervl.errors import UserError
from torch import nn


class MomentumQueue(nn.Module):
    """size K entries of `fields` {name: (shape, dtype)}; `groups`: also keep each entry's group id."""

    def __init__(self, size: int, fields: dict[str, tuple[tuple[int, ...], torch.dtype]], groups: bool = False):
        super().__init__()
        self.size = int(size)
        self.fields = tuple(fields)
        for name, (shape, dtype) in fields.items():
            if name in ("video_ids", "group_ids", "valid", "ptr"):
                raise ValueError(f"queue field name {name!r} is reserved")
            self.register_buffer(name, torch.zeros(self.size, *shape, dtype=dtype))  # [K, *shape]
        self.register_buffer("video_ids", torch.zeros(self.size, dtype=torch.int64))  # [K]
        self.register_buffer("valid", torch.zeros(self.size, dtype=torch.bool))  # [K]
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))
        # [K] group of each entry, -1 = none; only with groups=True, so checkpoints without it stay the same
        if groups:
            self.register_buffer("group_ids", torch.full((self.size,), -1, dtype=torch.int64))
        else:
            self.group_ids = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A checkpoint written with the other `groups` setting (queue.mask_same_group switched at a resume)
        loads: missing group ids read as -1 (no group: those entries are not group-masked until overwritten),
        group ids this queue does not keep are dropped."""
        key = prefix + "group_ids"
        if self.group_ids is None:
            state_dict.pop(key, None)
        elif key not in state_dict:
            state_dict[key] = torch.full_like(self.group_ids, -1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __len__(self) -> int:
        """Filled entries."""
        return int(self.valid.sum())

    @torch.no_grad()
    def push(self, entries: dict[str, torch.Tensor], video_ids: torch.Tensor,
             group_ids: torch.Tensor | None = None) -> None:
        """Write n entries at ptr, wrapping around; if n > K only the newest K are kept.

        entries: {field: [n, *shape]} (all fields), video_ids: [n], group_ids: [n] (-1 = none; kept only
        by a queue made with groups=True; None = no group). Same call on every rank.
        """
        n = int(video_ids.shape[0])
        if n == 0:
            return
        if set(entries) != set(self.fields):
            raise ValueError(f"queue push needs fields {self.fields}, got {sorted(entries)}")
        start = int(self.ptr)
        skip = max(0, n - self.size)  # entries that would be overwritten within this push
        idx = (start + skip + torch.arange(n - skip, device=self.valid.device)) % self.size  # [m]
        for name in self.fields:
            buf = getattr(self, name)
            value = entries[name][skip:]
            if tuple(value.shape[1:]) != tuple(buf.shape[1:]):
                raise UserError(f"queue entry field {name!r} has shape {tuple(value.shape[1:])} but the queue holds "
                                f"{tuple(buf.shape[1:])}; data.num_frames / data.max_words must stay as configured")
            buf[idx] = value.to(device=buf.device, dtype=buf.dtype)
        self.video_ids[idx] = video_ids[skip:].to(self.video_ids.device, torch.int64)
        if self.group_ids is not None:
            self.group_ids[idx] = (-1 if group_ids is None else group_ids[skip:].to(self.group_ids.device, torch.int64))
        self.valid[idx] = True
        self.ptr.fill_((start + n) % self.size)

    def snapshot(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """({field: [K, ...]}, video_ids [K], valid [K]) as the negatives of this step."""
        return {name: getattr(self, name) for name in self.fields}, self.video_ids, self.valid

    def extra_repr(self) -> str:
        return f"size={self.size}, fields={list(self.fields)}"
