"""Contrastive accumulation (pipeline/train/grad_cache.py): k micro-batches of b == one batch of k*b.

Per variant (queue on, wrap-around, a padded sample, pairs sharing a video), the same STEPS SGD steps
on the same 12 samples per step are taken three ways, each followed by momentum_update + enqueue:
  ref  1 rank, one batch of 12 (the plain forward/backward);
  acc1 1 rank, 3 micro-batches of 4 through embed_step + replay;
  acc2 2 gloo ranks, 3 micro-batches of 2 each (micro-batch m is the step's samples [4m, 4m+4),
       rank r takes its half: the sampler's layout), gradients averaged as DeepSpeed does.
The step's loss (mean over ranks), every parameter's gradient at every step (logit_scale included)
and the final queues (keys, ids, fill, pointer: the order the keys went in) must match ref.
Tolerance: float32, atol 2e-5 / rtol 1e-4 on gradients and losses (measured on 1 rank, 3 x 4 vs 12: max
|loss diff| 1.9e-6, max |grad diff| 1.1e-5, from the summation order alone); queue ids, fill and pointer exactly.
Plain accumulation (each micro-batch its own loss) is checked to differ, so the test can fail.
"""

from pathlib import Path

import pytest
import torch
from fixtures import assert_same_queues
from hiervl import distributed as D

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
STEP_BATCH, MICRO, STEPS = 12, 3, 2
VARIANTS = [
    ("hit", ["queue.objective=momentum"]),
    ("hit", ["queue.objective=symmetric", "model.learnable_temperature=true"]),
    ("hcmi", ["queue.objective=both", "model.label_denoise=true"]),
]
SMALL = ["data.num_frames=4", "data.max_words=12", "queue.enabled=true", "queue.size=16", "model.embed_dim=32",
         "model.vision.width=32", "model.vision.layers=1", "model.vision.heads=2", "model.text.num_layers=2",
         "model.num_clips=2", "model.num_phrases=3"]
ATOL, RTOL = 2e-5, 1e-4


def step_batch(step: int, n: int = STEP_BATCH) -> dict:
    g = torch.Generator().manual_seed(2000 + step)
    mask = torch.zeros(n, 12, dtype=torch.long)
    for i in range(n):
        mask[i, : 4 + (i * 5 + step) % 8] = 1
    valid = torch.ones(n, dtype=torch.bool)
    valid[5] = False  # a padded sample inside a micro-batch
    return {"video": torch.randn(n, 4, 3, 32, 32, generator=g),
            "input_ids": torch.randint(1000, 3000, (n, 12), generator=g) * mask, "attention_mask": mask,
            "video_ids": torch.tensor([(i // 2) + 10 * step for i in range(n)]), "valid": valid}


def _slice(batch: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] for k, v in batch.items()}


def run(preset: str, overrides: list, mode: str, rank: int = 0, world: int = 1) -> dict:
    """mode: big (one batch of 12 per step), cache (3 micro-batches, GradCache) or micro (plain accumulation)."""
    from hiervl.config import load_config
    from hiervl.model.hierarchical import build_model
    from hiervl.train.grad_cache import embed_step, replay

    cfg = load_config(TINY, [f"model.preset={preset}"] + SMALL + overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    losses, grads = [], []
    per_micro = STEP_BATCH // MICRO  # samples of one micro-batch over all ranks
    b = per_micro // world
    for step in range(STEPS):
        full = step_batch(step)
        if mode == "big":
            out = model(full)
            out["loss"].backward()
            loss = out["loss"].detach()
        else:
            micro = [_slice(full, m * per_micro + rank * b, m * per_micro + (rank + 1) * b) for m in range(MICRO)]
            if mode == "cache":
                cache = embed_step(model, micro, model.objective, rank, world,
                                   learn_scale=model.logit_scale.requires_grad)
                for m, batch in enumerate(micro):
                    replay(model, batch, cache, m).backward()
                out, loss = cache.out, cache.out["loss"]
            else:  # plain accumulation: the mean of the micro-batches' own losses
                outs = [model(batch) for batch in micro]
                for o in outs:
                    (o["loss"] / MICRO).backward()
                loss = sum(o["loss"].detach() for o in outs) / MICRO
                out = None
        for p in params:
            if p.grad is not None:
                p.grad.copy_(D.all_reduce_mean(p.grad))  # what DeepSpeed does with gradients
        grads.append({n: p.grad.clone() for n, p in zip(names, params) if p.grad is not None})
        opt.step()
        opt.zero_grad()
        model.momentum_update()
        if out is not None:
            model.enqueue(out)
        else:
            for o in outs:
                model.enqueue(o)
        losses.append(D.all_reduce_mean(loss.reshape(1)).item())
    queues = {name: {k: v.clone() for k, v in q.state_dict().items()} for name, q in model.queues.items()}
    return {"losses": losses, "grads": grads, "queues": queues}


def _job(rank, world):
    """Every variant, GradCache mode, on one of the session's two gloo ranks (conftest.py `gloo_pair`)."""
    torch.set_num_threads(1)
    return [run(preset, overrides, "cache", rank, world) for preset, overrides in VARIANTS]


@pytest.fixture(scope="module")
def two_ranks(gloo_pair):
    r0, r1 = gloo_pair.run(_job)
    return {(rank, i): res for rank, results in enumerate((r0, r1)) for i, res in enumerate(results)}


def _assert_same(ref: dict, got: dict, what: str) -> None:
    assert got["losses"] == pytest.approx(ref["losses"], rel=RTOL, abs=ATOL), what
    for step, (a, b) in enumerate(zip(ref["grads"], got["grads"])):
        assert set(a) == set(b), f"{what} step {step}: parameters with gradient differ"
        for name in a:
            torch.testing.assert_close(b[name], a[name], atol=ATOL, rtol=RTOL, msg=f"{what} step {step} grad {name}")
    assert_same_queues(ref["queues"], got["queues"], atol=ATOL, what=what)


@pytest.mark.parametrize("index", range(len(VARIANTS)), ids=["+".join([p] + o) for p, o in VARIANTS])
def test_cached_micro_batches_equal_one_big_batch_on_one_and_two_ranks(two_ranks, index):
    preset, overrides = VARIANTS[index]
    torch.set_num_threads(1)
    ref = run(preset, overrides, "big")
    assert ref["losses"][0] > 0.1
    learned = preset == "hcmi" or "model.learnable_temperature=true" in overrides
    assert ("logit_scale" in ref["grads"][0]) == learned  # the temperature's gradient is compared too
    _assert_same(ref, run(preset, overrides, "cache"), "1 rank, 3 x 4")
    r0, r1 = two_ranks[(0, index)], two_ranks[(1, index)]
    _assert_same(ref, r0, "2 ranks, 3 x 2, rank 0")
    _assert_same(ref, r1, "2 ranks, 3 x 2, rank 1")
    # the queue holds 2 steps x 11 valid keys in 16 slots: wrapped around, filled
    some = next(iter(ref["queues"].values()))
    assert int(some["ptr"]) == (STEPS * (STEP_BATCH - 1)) % 16 and bool(some["valid"].all())


def test_plain_accumulation_is_not_one_big_batch():
    """The reference the test above guards against: each micro-batch's loss over its own negatives."""
    torch.set_num_threads(1)
    preset, overrides = VARIANTS[0]
    ref, plain = run(preset, overrides, "big"), run(preset, overrides, "micro")
    assert abs(plain["losses"][0] - ref["losses"][0]) > 0.05, (plain["losses"], ref["losses"])
