"""Which model made an embedding: a fingerprint stored in every search index, checked at search.

Embeddings of two models live in two unrelated spaces: a query encoded by one checkpoint scored
against videos embedded by another (another run of the same preset, or another step of the same
run) gives plausible-looking nonsense. So an index records

    {"preset", "levels", "config_sha", "weights_sha", "step"}

- `config_sha`: sha256 of what shapes the embeddings besides the weights: the resolved `model`
  section (less where its initial weights and tokenizer files came from: `pretrained`, `clip_path`,
  `text.path`; an export of a checkpoint carries its own copy of the tokenizer, and is the same
  model) and the data settings a clip and a caption are preprocessed with (frames, size, short
  side, mean/std, max words).
- `weights_sha`: sha256 of the level heads' weights (both towers): the last layers every
  embedding passes through, so two runs, or two steps of one run, never share it, while the same
  checkpoint loaded anywhere (CPU or GPU, another directory) always does.
- `step`: the checkpoint's step when known (shown, not compared).

`check_fingerprint` refuses another preset, other levels or other weights in one line that names
what differs and how to fix it; the same weights under another config hash (the same checkpoint read
by a hiervl whose config gained a key) only warn, since the embedding space is the weights'.

Owns: computing and comparing model fingerprints.
Must not touch: loading models or indexes.
"""

from __future__ import annotations

import hashlib
import json

import torch
from hiervl.config import to_dict
from hiervl.data.preprocess import Preprocessing
from hiervl.errors import UserError

INIT_ONLY_KEYS = ("pretrained", "clip_path")  # where the initial weights came from: not the embedding space


def _without_init_keys(tree):
    if isinstance(tree, dict):
        return {k: _without_init_keys(v) for k, v in tree.items() if k not in INIT_ONLY_KEYS}
    return tree


def config_sha(cfg) -> str:
    d = to_dict(cfg)
    model = _without_init_keys(d["model"])
    model.get("text", {}).pop("path", None)  # where the tokenizer files are: a checkpoint's run, or its export
    what = {"model": model, "data": {k: d["data"][k] for k in Preprocessing.fields()}}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def weights_sha(model) -> str:
    h = hashlib.sha256()
    heads = [("video", model.video.heads), ("text", model.text.heads)]
    tensors = [(f"{tower}.{name}", t) for tower, m in heads for name, t in m.state_dict().items()]
    if not tensors:  # heads without parameters: every query-tower weight instead
        tensors = [(n, t) for n, t in model.state_dict().items() if n.startswith(("video.", "text."))]
    for name, t in sorted(tensors, key=lambda item: item[0]):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model, step: int | None = None) -> dict:
    cfg = model.cfg
    return {"preset": cfg.model.preset, "levels": list(model.levels), "config_sha": config_sha(cfg),
            "weights_sha": weights_sha(model), "step": step}


def describe(fp: dict) -> str:
    step = f"step {fp['step']}, " if fp.get("step") is not None else ""
    return f"preset {fp.get('preset')} ({step}weights {fp.get('weights_sha')}, config {fp.get('config_sha')})"


def check_fingerprint(index_fp: dict | None, index_levels: list[str], model, checkpoint: str, index_dir: str,
                      step: int | None = None) -> str | None:
    """Raise UserError when the index was not embedded by `model`; a warning string when it cannot tell."""
    fix = (f"search with the checkpoint that made the index (its index.json names it), or re-index with "
           f"`hiervl search index --checkpoint {checkpoint} ...`")
    if sorted(index_levels) != sorted(model.levels):
        raise UserError(f"index {index_dir} has levels {sorted(index_levels)} but checkpoint {checkpoint} "
                        f"({model.cfg.model.preset}) has {sorted(model.levels)}: another model made it; {fix}")
    if not index_fp:
        return (f"index {index_dir} has no model fingerprint (made before fingerprints): cannot check it was "
                f"embedded by {checkpoint}")
    mine = model_fingerprint(model, step)
    for key in ("preset", "weights_sha"):
        if index_fp.get(key) != mine[key]:
            raise UserError(f"index {index_dir} was embedded by another model ({describe(index_fp)}) than "
                            f"checkpoint {checkpoint} ({describe(mine)}): its scores would mix two embedding "
                            f"spaces; {fix}")
    if index_fp.get("config_sha") != mine["config_sha"]:  # same weights: e.g. a newer hiervl's config defaults
        return (f"index {index_dir} was embedded by the same weights as {checkpoint} but under another resolved "
                f"config (config {index_fp.get('config_sha')} vs {mine['config_sha']}); re-index if its "
                "preprocessing (frames, size, words) changed")
    return None
