"""`train.global_batch`: clips per optimizer step, held constant whatever the world size.

    b, k = split_global_batch(G, world_size, max_micro)   # per-rank micro-batch, accumulation steps
    cfg_w = for_world(cfg, world_size)                     # cfg with data.batch_size=b, train.grad_accum=k
    cfg = hold_global_batch(cfg, saved_config)             # a resume keeps the checkpoint's G

Why: `data.batch_size` is per rank, so a resume on half the ranks halves the global batch and
changes the LR per sample, the contrastive batch and the loss curve. With `train.global_batch=G`
the run is defined by G: each optimizer step consumes `order[s*G:(s+1)*G]` of the epoch's order
(micro-batches in order, each cut into the ranks' slots in rank order; pipeline/data/sampler.py),
the DeepSpeed train batch stays G (so the LR schedule, counted in optimizer steps, is the same),
and the momentum queue receives the same G keys per step in the same order. With
`train.accum_mode=contrastive` even the loss is the same (it is over the whole step's G samples).

The split: b * k * W = G with b <= data.batch_size (the memory bound per rank), k as small as
possible (fewest micro-batches). G must be a multiple of W: the ranks' micro-batches have one
shape for the collectives; otherwise the run is refused in one line naming the rank counts that work.

A resume keeps the global batch it was started with (`hold_global_batch`): `hiervl train` applies
it before writing the run's config.yaml, the ranks again from the checkpoint they load.

Owns: the split, the derived config and the held global batch. Must not touch: the loader or the trainer's loop.
"""

from __future__ import annotations

import copy

from hiervl.config import Config, ConfigError
from hiervl.errors import UserError
from hiervl.log import get_logger

log = get_logger(__name__)


def split_global_batch(global_batch: int, world_size: int, max_micro: int, held_from: str | None = None) -> tuple[int, int]:
    """(per-rank micro-batch b, accumulation steps k) with b * k * world_size == global_batch,
    b <= max_micro and k smallest; ConfigError (one line) when global_batch is not a multiple of world_size.
    `held_from`: the checkpoint a resume took global_batch from (its fix is another rank count only)."""
    if global_batch < world_size or global_batch % world_size:
        ok = ", ".join(str(w) for w in range(1, min(global_batch, 64) + 1) if global_batch % w == 0)
        if held_from:
            raise ConfigError(f"train.global_batch={global_batch} (the checkpoint's, {held_from}) cannot be split over "
                              f"{world_size} ranks (each rank's micro-batches must be equal); resume on {ok} ranks "
                              "(a resume keeps its global batch; train.resume=never and a new train.out_dir start over)")
        raise ConfigError(f"train.global_batch={global_batch} cannot be split over {world_size} ranks (each rank's "
                          f"micro-batches must be equal); run on {ok} ranks or set "
                          f"train.global_batch to a multiple of {world_size}")
    per_rank = global_batch // world_size
    k = next(k for k in range(1, per_rank + 1) if per_rank % k == 0 and per_rank // k <= max_micro)
    return per_rank // k, k


def for_world(cfg: Config, world_size: int, held_from: str | None = None) -> Config:
    """`cfg` as it runs on `world_size` ranks: with train.global_batch set, data.batch_size and
    train.grad_accum replaced by the derived split (a copy; the dataclasses are not re-validated,
    since global_batch together with grad_accum > 1 is refused for user configs only)."""
    g = cfg.train.global_batch
    if not g:
        return cfg
    b, k = split_global_batch(g, world_size, cfg.data.batch_size, held_from)
    out = copy.deepcopy(cfg)
    out.data.batch_size, out.train.grad_accum = b, k
    return out


def global_batch(cfg: Config, world_size: int) -> int:
    """Clips per optimizer step of `cfg` (already `for_world`) on `world_size` ranks."""
    return cfg.data.batch_size * cfg.train.grad_accum * world_size


def hold_global_batch(cfg: Config, saved_config: dict | None) -> Config:
    """`cfg` resuming a checkpoint written with `saved_config` (its meta.json's `config`, or None): a
    config that leaves train.global_batch unset takes the checkpoint's (a copy); one that sets another
    value is refused in one line (UserError); otherwise `cfg` itself."""
    saved = int(((saved_config or {}).get("train") or {}).get("global_batch", 0) or 0)
    if not saved or cfg.train.global_batch == saved:
        return cfg
    if cfg.train.global_batch:
        raise UserError(f"the checkpoint in {cfg.train.out_dir} was trained with train.global_batch={saved}, the config "
                        f"says {cfg.train.global_batch}; set train.global_batch={saved} (or train.resume=never and a "
                        "new train.out_dir)")
    log.info("resuming with the checkpoint's train.global_batch=%d", saved)
    cfg = copy.deepcopy(cfg)
    cfg.train.global_batch = saved
    return cfg
