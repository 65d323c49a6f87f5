"""Contrastive accumulation (`train.accum_mode=contrastive`): one loss over all of a step's micro-batches.

With plain accumulation each micro-batch's loss sees only its own negatives, so k micro-batches of b
are not a contrastive batch of k*b. Here (GradCache, Gao et al. 2021; open_clip's `--accum-freq`):

    cache = embed_step(forward, batches, objective, rank, world_size)  # 1. features, no gradient
    cache.out["loss"]                                                    # 2. the loss of the whole step
    for m in range(k): backward(replay(forward, cache, m))               # 3. each micro-batch again, with gradient
    objective.enqueue(cache.out["keys"])                                 # queue: once, all keys in order

1. Each micro-batch's query embeddings and momentum keys are computed without gradient, its RNG
   state recorded (a dropout mask is then the same in the replay).
2. The features of the k micro-batches are concatenated (this rank's k*b rows) and the objective
   scores them against all ranks' k*b*W features and the queue, exactly as one batch of k*b per
   rank; the gradient of that loss with respect to the cached features (and the temperature) is
   taken with `torch.autograd.grad`, stopping at the features.
3. Each micro-batch is run through the query towers again, with gradient, and the backward of
   <embedding, cached gradient> (plus <logit_scale, its gradient> on the last one) accumulates
   that micro-batch's share: the k backwards sum to the gradient of the step's loss (chain rule),
   so the caller must not divide by k (DeepSpeed: `backward(..., scale_wrt_gas=False)`).

The momentum keys of the step come from one key encoder (it is updated once per step), so the
cached keys are those of the big batch too. The objective gathers ranks in rank order, i.e. the
rows are (rank, micro-batch, slot); `cache.out["keys"]` is reordered to (micro-batch, rank, slot),
the sampler's order of the step's samples, so the queue receives the step's keys exactly as a
run with another split of the same global batch would (tests/test_grad_cache.py).
Cost: the query towers run twice (the key towers once); activation memory is one micro-batch's.

Owns: caching, the step's loss over the cache, the replay and the key order.
Must not touch: the optimizer, DeepSpeed or the loader.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepCache:
    """What step 1-2 leave for the replay: the objective's output over the whole step, the gradient
    of its loss per micro-batch ({"q_v": {level: grad}, "q_t": ..., "logit_scale"?}) and the RNG states."""

    out: dict
    grads: list[dict]
    rng: list[tuple]


def _rng_state() -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _cat(dicts: list[dict]) -> dict:
    return {k: torch.cat([d[k] for d in dicts]) for k in dicts[0]}


def micro_major(keys: dict, world_size: int, micro: int, batch: int) -> dict:
    """Gathered keys in rows (rank, micro-batch, slot) -> rows (micro-batch, rank, slot): the sampler's order."""
    idx = torch.arange(world_size * micro * batch).reshape(world_size, micro, batch).transpose(0, 1).reshape(-1)
    idx = idx.to(keys["video_ids"].device)
    return {"banks": {name: {f: x[idx] for f, x in fields.items()} for name, fields in keys["banks"].items()},
            "video_ids": keys["video_ids"][idx], "valid": keys["valid"][idx], "group_ids": keys["group_ids"][idx]}


def embed_step(forward, batches: list[dict], objective, rank: int, world_size: int,
               learn_scale: bool = True) -> StepCache:
    """Steps 1 and 2 (module docstring). forward: the engine or model (phases `embed` / `replay`);
    batches: the step's k micro-batches of b (on the device). learn_scale: whether logit_scale is trained."""
    rng, embs = [], []
    for batch in batches:
        rng.append(_rng_state())
        with torch.no_grad():
            embs.append(forward(batch, phase="embed"))
    end_state = _rng_state()
    sizes = [int(e["video_ids"].shape[0]) for e in embs]
    q_v = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in _cat([e["q_v"] for e in embs]).items()}
    q_t = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in _cat([e["q_t"] for e in embs]).items()}
    k_v, k_t = _cat([e["k_v"] for e in embs]), _cat([e["k_t"] for e in embs])
    ids = torch.cat([e["video_ids"] for e in embs])
    valid = torch.cat([e["valid"] for e in embs])
    groups = None if embs[0]["group_ids"] is None else torch.cat([e["group_ids"] for e in embs])
    scale = embs[0]["logit_scale"].detach().requires_grad_(learn_scale)
    out = objective(q_v, q_t, k_v, k_t, ids, valid, scale, rank=rank, world_size=world_size,
                    group_ids=groups)  # [k*b rows]
    leaves = [(side, name, x) for side, d in (("q_v", q_v), ("q_t", q_t)) for name, x in d.items() if x.requires_grad]
    targets = [x for _, _, x in leaves] + ([scale] if learn_scale else [])
    g = torch.autograd.grad(out["loss"], targets, allow_unused=True) if out["loss"].requires_grad else [None] * len(targets)
    bounds = torch.tensor([0] + sizes).cumsum(0).tolist()
    grads = []
    for m in range(len(batches)):
        lo, hi = bounds[m], bounds[m + 1]
        per = {"q_v": {}, "q_t": {}}
        for (side, name, _), grad in zip(leaves, g):
            per[side][name] = None if grad is None else grad[lo:hi]
        grads.append(per)
    if learn_scale and g[-1] is not None:
        grads[-1]["logit_scale"] = g[-1]  # once per step: the temperature's gradient of the whole loss
    _set_rng_state(end_state)
    out = {"loss": out["loss"].detach(), "losses": out["losses"],
           "keys": micro_major(out["keys"], world_size, len(batches), sizes[0])}
    return StepCache(out, grads, rng)


def replay(forward, batch: dict, cache: StepCache, m: int) -> torch.Tensor:
    """Step 3 for micro-batch m: the scalar whose backward adds its share of the step's gradient."""
    end_state = _rng_state()
    _set_rng_state(cache.rng[m])
    surrogate = forward(batch, phase="replay", grads=cache.grads[m])["loss"]
    _set_rng_state(end_state)
    return surrogate
