"""Text-to-video search over exported embeddings, with a contact sheet of the hits.

An index directory is what `hiervl eval` writes next to eval.json: `embeddings.parquet`
(key, level, vector: one row per video and level, the vector flattened) and `index.json`
(shapes per level, the checkpoint, the dataset and split the videos came from).

    index = SearchIndex.load("runs/demo/train/eval-test")
    hits = search(model, index, "a red circle slides left", k=10)   # [Hit(key, score, levels)]
    contact_sheet(hits, index.data, index.split, "hits.png")

The query is encoded by the same model (the checkpoint named in index.json, or one given),
scored against every video with `model.similarity` (per level and fused, in blocks of videos
so the token-level scores stay small), and the top k by the fused score are returned.

Owns: the search index over exported embeddings, queries and contact sheets.
Must not touch: training or evaluation.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data.decode import decode_pyav
from pipeline.data.loader import DatasetIndex
from pipeline.data.sampler import frame_indices
from pipeline.errors import UserError
from pipeline.eval.evaluate import EMBEDDINGS_FILE, INDEX_FILE
from pipeline.model.text_model import load_tokenizer
from pipeline.run_paths import find_recorded


@dataclass
class Hit:
    key: str
    score: float  # fused similarity
    levels: dict  # level -> similarity


@dataclass
class SearchIndex:
    keys: list[str]  # [N]
    videos: dict[str, torch.Tensor]  # level -> [N, ...]
    meta: dict  # index.json

    @property
    def data(self) -> str | None:
        return self.meta.get("data")

    @property
    def split(self) -> str | None:
        return self.meta.get("split")

    @classmethod
    def load(cls, directory: str | Path) -> "SearchIndex":
        import pyarrow.parquet as pq

        directory = Path(directory)
        meta_path = directory / INDEX_FILE
        if not meta_path.is_file():
            raise UserError(f"{directory} is not a search index (no {INDEX_FILE}); make one with "
                            "`hiervl eval --checkpoint RUN --data SHARDS --split SPLIT --out DIR`")
        meta = json.loads(meta_path.read_text())
        meta["data"] = find_recorded(meta.get("data"), directory)  # a relative path of an older index
        table = pq.read_table(directory / meta.get("embeddings", EMBEDDINGS_FILE))
        keys_col = table.column("key").to_pylist()
        levels_col = np.array(table.column("level").to_pylist())
        vectors = table.column("vector").combine_chunks()
        values = vectors.flatten().to_numpy(zero_copy_only=False)  # all rows' floats, end to end
        offsets = vectors.offsets.to_numpy()
        videos, keys = {}, None
        for name, shape in meta["shapes"].items():
            rows = np.flatnonzero(levels_col == name)
            width = int(np.prod(shape)) if shape else 1
            flat = np.stack([values[offsets[r]:offsets[r] + width] for r in rows]) if len(rows) else \
                np.zeros((0, width), np.float32)
            x = torch.from_numpy(flat.astype(np.float32)).reshape(len(rows), *shape)
            dtype = meta.get("dtypes", {}).get(name, "float32")
            videos[name] = x.to(getattr(torch, dtype))
            level_keys = [keys_col[r] for r in rows]
            if keys is not None and level_keys != keys:
                raise UserError(f"{directory / EMBEDDINGS_FILE} lists other videos for level {name}; re-export it")
            keys = level_keys
        return cls(keys or [], videos, meta)


@torch.no_grad()
def search(model, index: SearchIndex, query: str, k: int = 10, block: int = 4096) -> list[Hit]:
    """The top `k` videos of `index` for the text `query`, by the fused similarity."""

    if not query.strip():
        raise UserError("the search query is empty; give a sentence, e.g. \"a red circle slides left\"")
    model.eval()
    tok = load_tokenizer(model.cfg.model.text.path)(
        [query], padding="max_length", truncation=True, max_length=model.cfg.data.max_words, return_tensors="pt")
    device = next(model.parameters()).device
    t = model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device))  # level -> [1, ...]
    n = len(index.keys)
    parts: dict[str, list] = {}
    for i in range(0, n, block):
        sims = model.similarity(t, {name: v[i:i + block].to(device) for name, v in index.videos.items()})
        for name, s in sims.items():
            parts.setdefault(name, []).append(s[0].float().cpu())  # [b]
    scores = {name: torch.cat(p) for name, p in parts.items()}  # level -> [N]
    top = torch.topk(scores["fused"], min(k, n)).indices.tolist()
    return [Hit(index.keys[i], float(scores["fused"][i]), {name: float(s[i]) for name, s in scores.items()
                                                            if name != "fused"}) for i in top]


def format_hits(hits: list[Hit]) -> str:
    levels = list(hits[0].levels) if hits else []
    head = f"{'rank':>4}  {'score':>7}  " + "".join(f"{name[:12]:>13}" for name in levels) + "  key"
    rows = [f"{i + 1:>4}  {h.score:7.4f}  " + "".join(f"{h.levels[n]:13.4f}" for n in levels) + f"  {h.key}"
            for i, h in enumerate(hits)]
    return "\n".join([head] + rows)


def load_frames(data: str | Path, split: str, keys: list[str], count: int = 4) -> dict[str, np.ndarray]:
    """`count` frames spread over each video, uint8 [count, H, W, 3], read from the dataset's tars."""

    ds = DatasetIndex(data, split)
    where = {key: i for i, key in enumerate(ds.keys)}
    out = {}
    try:
        for key in keys:
            i = where.get(key)
            if i is None:
                continue
            try:
                out[key] = decode_pyav(ds.read_video(i), frame_indices(int(ds.num_frames[i]), count, None))
            except Exception:  # noqa: BLE001 - a thumbnail must not fail the search
                continue
    finally:
        ds.close()
    return out


def contact_sheet(hits: list[Hit], frames: dict[str, np.ndarray], out_png: str | Path, query: str = "") -> Path:
    """A PNG grid: one row per hit (rank, score, key), its frames left to right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max([len(f) for f in frames.values()] + [1])
    rows = max(len(hits), 1)
    fig, axes = plt.subplots(rows, cols + 1, figsize=(1.6 * cols + 2.2, 1.4 * rows + 0.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1.3] + [1] * cols})
    for r in range(rows):
        for c in range(cols + 1):
            axes[r][c].axis("off")
        if r >= len(hits):
            continue
        hit = hits[r]
        axes[r][0].text(0.0, 0.5, f"#{r + 1}  {hit.score:.3f}\n" + "\n".join(textwrap.wrap(hit.key, 22)),
                        va="center", ha="left", fontsize=8, family="monospace")
        for c, frame in enumerate(frames.get(hit.key, [])):
            axes[r][c + 1].imshow(frame)
    if query:
        fig.suptitle(f'"{query}"', fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
