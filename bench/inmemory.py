"""In-memory trials: the real model and objective on pre-rendered frames, one process, no loader.

Why: an arm x seed x task grid of `hiervl train` runs (DeepSpeed start, PyAV decode, shards) does
not fit 2 shared CPU cores. Here the synthetic corpus (hiervl.dataprep.synth) is rendered once,
straight to the model's input (`transform_clip`: short side, centre crop, normalisation, the same
function the loader applies), cached as float16, and each run trains `build_model(cfg)` with the
objective, momentum update and queue exactly as the trainer calls them (forward -> backward ->
AdamW step -> momentum_update -> enqueue), then evaluates with hiervl.eval.metrics.

What differs from `hiervl train` (the same for every arm, so paired comparisons stay fair):
frames are rendered, not encoded and decoded (no VP9 artefacts); no crop jitter; one rank;
torch AdamW with linear warmup then cosine (DeepSpeed's WarmupCosineLR shape), grad clip as
configured. Same seed = same initial weights, same batches, same captions, same frame draws: arms
are paired.

    data = corpus_tensors("events", 600, corpus_seed=0, cfg=cfg, cache=Path("/tmp/x"))
    row = train_and_eval(cfg, data, seed=0, steps=600, batch=32)

Tasks (`evaluate`): sentence -> video (each caption a query; t2v R@1 over the test videos),
paragraph -> video (one query per test video: all its captions joined in order, DiDeMo /
ActivityNet style; R@1 over the test videos), sibling R@1 (within the query's group of four).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
from hiervl.config import Config
from hiervl.data.decode import transform_clip
from hiervl.data.sampler import frame_indices
from hiervl.dataprep import synth
from hiervl.eval.metrics import group_metrics, multi_caption_metrics, order_sensitivity
from hiervl.model.hierarchical import build_model
from hiervl.model.text_model import load_tokenizer

RENDER_SIZE = 64  # hiervl synth's default frame size
FRAMES = {"pairs": 16, "events": 24}  # frames per video at 8 fps (2 s, 3 s)


def corpus_tensors(kind: str, num_videos: int, corpus_seed: int, cfg: Config, cache: Path) -> dict:
    """The corpus as model inputs: {"frames": float16 [N, F, 3, S, S], "captions": [N][str],
    "split": [N] str, "group": int64 [N]}. Cached under `cache` (rendering is deterministic)."""
    dc = cfg.data
    path = cache / f"{kind}-{num_videos}-s{corpus_seed}-{dc.short_side}-{dc.size}.pt"
    if path.is_file():
        return torch.load(path)
    frames, captions, split = [], [], []
    for i in range(num_videos):
        if kind == "pairs":
            raw = synth.render_frames(corpus_seed, i, RENDER_SIZE, FRAMES[kind])
            rng = np.random.default_rng([corpus_seed, i // synth.GROUP, 100 + i % synth.GROUP])
            captions.append(synth.make_captions(rng, synth.video_events(corpus_seed, i)))
        else:
            raw = synth.render_event_frames(corpus_seed, i, RENDER_SIZE, FRAMES[kind])
            captions.append([c["text"] for c in synth.event_captions(corpus_seed, i)])
        frames.append(transform_clip(raw, dc.short_side, dc.size, (0.5, 0.5), False, dc.mean, dc.std).half())
        split.append(synth.split_of(corpus_seed, i // synth.GROUP, 0.2))
    data = {"frames": torch.stack(frames), "captions": captions, "split": split,
            "group": torch.arange(num_videos) // synth.GROUP}
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data


def _lr(step: int, cfg: Config) -> float:
    """Linear warmup to train.lr, then cosine down to lr * min_lr_ratio (WarmupCosineLR's shape)."""
    oc, steps = cfg.optimizer, cfg.train.steps
    warm = max(1, min(oc.warmup_steps, steps - 1))
    if step < warm:
        return cfg.train.lr * (step + 1) / warm
    p = (step - warm) / max(1, steps - warm)
    return cfg.train.lr * (oc.min_lr_ratio + (1 - oc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def _batches(train_idx: np.ndarray, groups: np.ndarray, batch: int, seed: int, grouped: bool):
    """Endless batches of video indices; grouped: whole groups of siblings kept in one batch."""
    rng = np.random.default_rng([seed, 7])
    while True:
        if grouped:
            gs = np.unique(groups[train_idx])
            rng.shuffle(gs)
            order = np.concatenate([train_idx[groups[train_idx] == g] for g in gs])
        else:
            order = rng.permutation(train_idx)
        for s in range(0, len(order) - batch + 1, batch):
            yield order[s:s + batch]


def _tokens(tok, texts: list[str], max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_words, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _clip(frames: torch.Tensor, count: int, rng: np.random.Generator | None) -> torch.Tensor:
    """frames [F, 3, S, S] -> [count, 3, S, S] float32 (train: a random frame per segment; eval: centres)."""
    return frames[torch.as_tensor(frame_indices(frames.shape[0], count, rng), dtype=torch.long)].float()


def train(cfg: Config, data: dict, seed: int, log_every: int = 0) -> tuple[torch.nn.Module, dict]:
    """Train build_model(cfg) for cfg.train.steps steps of cfg.data.batch_size; returns (model, info)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.train()
    tok = load_tokenizer(cfg.model.text.path)
    params = [p for p in model.parameters() if p.requires_grad]
    oc = cfg.optimizer
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(oc.betas), eps=oc.eps, weight_decay=oc.weight_decay)
    split = np.array(data["split"])
    train_idx = np.flatnonzero(split == "train")
    groups = data["group"].numpy()
    batches = _batches(train_idx, groups, cfg.data.batch_size, seed, cfg.data.order == "grouped")
    rng = np.random.default_rng([seed, 11])
    t0, c0, losses = time.perf_counter(), time.process_time(), []
    for step in range(cfg.train.steps):
        idx = next(batches)
        video = torch.stack([_clip(data["frames"][i], cfg.data.num_frames, rng) for i in idx])  # [B, T, 3, S, S]
        texts = [data["captions"][i][int(rng.integers(len(data["captions"][i])))] for i in idx]
        ids, am = _tokens(tok, texts, cfg.data.max_words)
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        out = model({"video": video, "input_ids": ids, "attention_mask": am,
                     "video_ids": torch.as_tensor(idx, dtype=torch.long), "group_ids": data["group"][idx]})
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if oc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, oc.grad_clip)
        opt.step()
        model.momentum_update()
        model.enqueue(out)
        losses.append(float(out["loss"].detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}: loss {np.mean(losses[-log_every:]):.3f}", flush=True)
    # cpu_s: this process's CPU seconds, the figure to plan a grid by on a shared machine (wall is load)
    return model, {"train_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                   "final_loss": float(np.mean(losses[-20:]))}


@torch.no_grad()
def evaluate(model, cfg: Config, data: dict, split: str = "test") -> dict:
    """Sentence -> video and paragraph -> video R@1 (fused and per level), sibling R@1, order %."""
    model.eval()
    tok = load_tokenizer(cfg.model.text.path)
    idx = np.flatnonzero(np.array(data["split"]) == split)
    videos = torch.stack([_clip(data["frames"][i], cfg.data.num_frames, None) for i in idx])  # [N, T, 3, S, S]

    def embed_videos(x: torch.Tensor) -> dict:
        parts = [model.encode_video(x[s:s + 64]) for s in range(0, len(x), 64)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def embed_texts(texts: list[str], max_words: int) -> dict:
        parts = []
        for s in range(0, len(texts), 128):
            ids, am = _tokens(tok, texts[s:s + 128], max_words)
            parts.append(model.encode_text(ids, am))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    v = embed_videos(videos)
    v_rev = embed_videos(videos.flip(1))  # time-reversed: the order diagnostic
    captions = [c for i in idx for c in data["captions"][i]]
    cap_video = np.array([j for j, i in enumerate(idx) for _ in data["captions"][i]])
    t = embed_texts(captions, cfg.data.max_words)
    sims = model.similarity(t, v)  # {level: [captions, videos], fused}
    sims_rev = model.similarity(t, v_rev)
    # paragraph: every caption of the video in its listed order, as one query (room for all of them)
    paragraphs = [" ".join(data["captions"][i]) for i in idx]
    p = embed_texts(paragraphs, cfg.data.max_words * max(len(c) for c in data["captions"]))
    psims = model.similarity(p, v)
    res = {"num_videos": len(idx), "num_captions": len(captions), "sentence": {}, "paragraph": {}}
    for name, s in sims.items():
        res["sentence"][name] = multi_caption_metrics(s, cap_video)["t2v"]["R1"]
        res["paragraph"][name] = multi_caption_metrics(psims[name], np.arange(len(idx)))["t2v"]["R1"]
    video_group = data["group"][idx].tolist()
    gm = group_metrics(sims["fused"], cap_video, video_group)
    rows = torch.arange(len(captions))
    own, own_rev = sims["fused"][rows, cap_video], sims_rev["fused"][rows, cap_video]
    res.update(sibling_R1=gm["sibling_R1"], group_R1=gm["group_R1"], sibling_chance=gm["chance"]["sibling_R1"],
               order=order_sensitivity(own.numpy(), own_rev.numpy())["order"],
               v2t_R1=multi_caption_metrics(sims["fused"], cap_video)["v2t"]["R1"])
    return res


def train_and_eval(cfg: Config, data: dict, seed: int, log_every: int = 0) -> dict:
    """One paired run: train with `seed` (weights, batches, captions, frames), evaluate on test."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
    model, info = train(cfg, data, seed, log_every)
    return {**info, **evaluate(model, cfg, data)}
