"""Text-to-video search: an ANN stage on the global level, re-ranked by every level, fused.

An index directory holds `embeddings.parquet` (key, level, vector: one row per video and level,
the vector flattened), `index.json` (shapes per level, the model fingerprint, the checkpoint, and
for an index `hiervl eval` wrote, the dataset and split), `catalog.parquet` (key, path,
captions: shown with each hit) and, for large indexes, `ann.faiss` (pipeline/eval/ann.py).
`hiervl eval` writes one for a prepared split; `hiervl search index` for any folder or manifest
of videos (pipeline/eval/video_index.py; captions optional).

    index = SearchIndex.load("runs/demo/train/eval-test")
    hits = search(model, index, "a red circle slides left", k=10)       # [Hit(key, score, levels, path, captions)]
    many = search_batch(model, index, ["query one", "query two"], k=10)  # one list of hits per query

A query is encoded once by the index's model (a batch of queries in one forward pass). Then:
1. ANN: the global level's query vector against the videos' global vectors (inner product of
   unit vectors = that level's cosine), top `candidates` (default 100) from FAISS: exact flat
   search below 65,536 videos, IVF-flat above (`hiervl search index --ann`).
2. Re-rank: `model.similarity` of the query against those candidates only, every level and
   "fused" exactly as eval computes them (the level_weights-weighted mean); the top k by fused.
With `candidates >= N` (or `exact=True`) every video is scored: the brute-force result. A video
outside the global level's top `candidates` cannot be returned even if its fine levels would
lift it: that is the approximation, measured by bench/search.py (recall of the ANN stage).

Owns: the search-index format (writing it: `write_index`, reading it: `SearchIndex.load`),
queries and contact sheets.
Must not touch: training or evaluation.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hiervl.atomic_write import atomic_output
from hiervl.data.decode import decode_pyav
from hiervl.data.loader import DatasetIndex, is_plain_name
from hiervl.data.preprocess import Preprocessing
from hiervl.data.sampler import frame_indices
from hiervl.data.video_file import decode_video_file, probe_video_file
from hiervl.errors import UserError
from hiervl.eval.ann import AnnIndex
from hiervl.log import get_logger
from hiervl.model.text_model import load_tokenizer
from hiervl.run_dir import find_recorded

log = get_logger(__name__)
EMBEDDINGS_FILE = "embeddings.parquet"
INDEX_FILE = "index.json"
CATALOG_FILE = "catalog.parquet"  # key, path, captions of every indexed video (shown with search hits)
ANN_FILE = "ann.faiss"
DEFAULT_CANDIDATES = 100
TEXT_CHUNK = 256  # queries encoded per forward pass


@dataclass
class Hit:
    key: str
    score: float  # fused similarity
    levels: dict  # level -> similarity
    path: str | None = None  # the video file (catalog), when the index knows it
    captions: list[str] = field(default_factory=list)  # the video's captions, when it has any


@dataclass
class SearchIndex:
    keys: list[str]  # [N]
    videos: dict[str, torch.Tensor]  # level -> [N, ...]
    meta: dict  # index.json
    directory: Path | None = None
    catalog: dict[str, tuple[str | None, list[str]]] = field(default_factory=dict)  # key -> (path, captions)
    _ann: dict = field(default_factory=dict, repr=False)  # level -> AnnIndex (built or read once)

    @property
    def data(self) -> str | None:
        return self.meta.get("data")

    @property
    def split(self) -> str | None:
        return self.meta.get("split")

    @property
    def fingerprint(self) -> dict | None:
        return self.meta.get("model")

    @classmethod
    def load(cls, directory: str | Path) -> "SearchIndex":
        import pyarrow.parquet as pq

        directory = Path(directory)
        meta_path = directory / INDEX_FILE
        if not meta_path.is_file():
            raise UserError(f"{directory} is not a search index (no {INDEX_FILE}); make one with "
                            "`hiervl search index --checkpoint RUN --videos DIR --out DIR` or "
                            "`hiervl eval --checkpoint RUN --data SHARDS --split SPLIT --out DIR`")
        meta = json.loads(meta_path.read_text())
        meta["data"] = find_recorded(meta.get("data"), directory)  # a relative path of an older index
        for what, name in (("embeddings", meta.get("embeddings", EMBEDDINGS_FILE)),
                           ("ann file", (meta.get("ann") or {}).get("file") or ANN_FILE)):
            if not is_plain_name(name):  # index.json is someone else's file: its names must stay in the folder
                raise UserError(f"{meta_path}: the {what} {name!r} is not a file name in the index folder; "
                                "refusing an index that points outside itself: make the index again")
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
            starts = offsets[rows]
            if len(rows) and np.all(offsets[rows + 1] - starts == width) and \
                    np.all(np.diff(starts) == width):  # contiguous rows (how export writes them): one slice
                flat = values[starts[0]:starts[0] + width * len(rows)].reshape(len(rows), width)
            else:
                flat = np.stack([values[o:o + width] for o in starts]) if len(rows) else \
                    np.zeros((0, width), np.float32)
            x = torch.from_numpy(np.array(flat, dtype=np.float32)).reshape(len(rows), *shape)  # a writable copy
            dtype = meta.get("dtypes", {}).get(name, "float32")
            videos[name] = x.to(getattr(torch, dtype))
            level_keys = [keys_col[r] for r in rows]
            if keys is not None and level_keys != keys:
                raise UserError(f"{directory / EMBEDDINGS_FILE} lists other videos for level {name}; re-export it")
            keys = level_keys
        catalog = {}
        if (directory / CATALOG_FILE).is_file():
            for r in pq.read_table(directory / CATALOG_FILE).to_pylist():
                catalog[r["key"]] = (r.get("path"), list(r.get("captions") or []))
        return cls(keys or [], videos, meta, directory, catalog)

    def ann(self, level: str) -> AnnIndex:
        """The ANN index of `level`: `ann.faiss` when it was built for that level, else built here
        (exact flat below EXACT_BELOW videos: instant; an IVF above, logged, kept for this process)."""
        if level not in self._ann:
            info = self.meta.get("ann") or {}
            path = self.directory / (info.get("file") or ANN_FILE) if self.directory else None
            if info.get("level") == level and info.get("file") and path is not None and path.is_file():
                ann = AnnIndex.load(path, info["kind"])
                if ann.ntotal != len(self.keys):
                    raise UserError(f"{path} holds {ann.ntotal} vectors but the index {len(self.keys)} videos; "
                                    "rebuild the index")
            else:
                ann = AnnIndex.build(self.videos[level].float().numpy())
                if ann.kind != "flat" and self.directory is not None:
                    self._keep_ann(ann, level)
            self._ann[level] = ann
        return self._ann[level]

    def _keep_ann(self, ann: AnnIndex, level: str) -> None:
        """Save an ANN index built at load (a large index `hiervl eval` exported) beside the embeddings,
        so the next search reads it instead of building it again; a read-only index just logs."""
        try:
            ann.save(self.directory / ANN_FILE)
            self.meta["ann"] = {"level": level, "kind": ann.kind, "file": ANN_FILE}
            write_meta(self.directory, self.meta)
            log.info("saved the %s ANN index of level %s to %s", ann.kind, level, self.directory / ANN_FILE)
        except OSError as exc:
            log.warning("could not save the ANN index to %s (%s): it is rebuilt at every search", self.directory, exc)

    def hit(self, i: int, score: float, levels: dict) -> Hit:
        path, captions = self.catalog.get(self.keys[i], (None, []))
        return Hit(self.keys[i], score, levels, path, captions)


def global_level(model) -> str | None:
    """The level the ANN stage searches: the preset's one global (vector) level."""
    names = [lv.name for lv in model.level_specs if lv.kind == "global"]
    return names[-1] if names else None


def encode_queries(model, queries: list[str]) -> dict[str, torch.Tensor]:
    """Query-encoder embeddings of `queries`: {level: [B, ...], level_mask: [B, L']} on the model's device."""
    for q in queries:
        if not isinstance(q, str) or not q.strip():
            raise UserError("a search query is empty; give a sentence, e.g. \"a red circle slides left\"")
    tokenizer = load_tokenizer(model.cfg.model.text.path)
    prep = Preprocessing.from_config(model.cfg)
    device = next(model.parameters()).device
    parts = []
    for i in range(0, len(queries), TEXT_CHUNK):
        tok = prep.tokenize(tokenizer, queries[i:i + TEXT_CHUNK])  # [b, L] each, as the eval loader's
        parts.append(model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _scores(model, t: dict, videos: dict, rows: torch.Tensor | None, block: int, device) -> dict:
    """{level and fused: [Bq, n]}: queries `t` against videos[rows] (all when rows is None), in blocks."""
    n = len(rows) if rows is not None else len(next(iter(videos.values())))
    parts: dict[str, list] = {}
    for i in range(0, n, block):
        sel = rows[i:i + block] if rows is not None else slice(i, i + block)
        sims = model.similarity(t, {name: v[sel].to(device) for name, v in videos.items()})
        for name, s in sims.items():
            parts.setdefault(name, []).append(s.float().cpu())  # [Bq, b]
    return {name: torch.cat(p, dim=1) for name, p in parts.items()}


@torch.no_grad()
def search_batch(model, index: SearchIndex, queries: list[str], k: int = 10, block: int = 4096,
                 candidates: int = DEFAULT_CANDIDATES, exact: bool = False) -> list[list[Hit]]:
    """The top `k` videos of `index` for each query, by the fused similarity (see the module docstring)."""
    model.eval()
    n = len(index.keys)
    if n == 0:
        raise UserError(f"index {index.directory} holds no videos")
    missing = [name for name in model.levels if name not in index.videos]
    if missing:
        raise UserError(f"index {index.directory} has no level {missing[0]!r} (it has {sorted(index.videos)}): "
                        "another preset's model made it; re-index with this checkpoint")
    t = encode_queries(model, queries)  # level -> [B, ...]
    device = next(model.parameters()).device
    g = global_level(model)
    shortlist = None  # [B, C] rows per query, or None: every video
    if g is not None and not exact and max(candidates, k) < n:
        _, rows = index.ann(g).search(t[g].float().cpu().numpy(), max(candidates, k))  # [B, C]
        shortlist = rows
    out = []
    if shortlist is None:  # brute force: every query against every video, a chunk of queries at a time
        for c in range(0, len(queries), TEXT_CHUNK):
            s = _scores(model, {name: x[c:c + TEXT_CHUNK] for name, x in t.items()}, index.videos, None, block,
                        device)  # name -> [b, N]
            top = torch.topk(s["fused"], min(k, n), dim=1).indices  # [b, k]
            out += [[index.hit(j, float(s["fused"][b, j]), {name: float(v[b, j]) for name, v in s.items()
                                                          if name != "fused"}) for j in top[b].tolist()]
                    for b in range(len(top))]
        return out
    for b in range(len(queries)):  # re-rank each query's shortlist by every level
        rows = torch.from_numpy(shortlist[b][shortlist[b] >= 0].astype(np.int64))  # [C]
        s = _scores(model, {name: x[b:b + 1] for name, x in t.items()}, index.videos, rows, block,
                    device)  # name -> [1, C]
        top = torch.topk(s["fused"][0], min(k, len(rows))).indices.tolist()
        out.append([index.hit(int(rows[j]), float(s["fused"][0, j]),
                              {name: float(v[0, j]) for name, v in s.items() if name != "fused"}) for j in top])
    return out


def search(model, index: SearchIndex, query: str, k: int = 10, block: int = 4096,
           candidates: int = DEFAULT_CANDIDATES, exact: bool = False) -> list[Hit]:
    """The top `k` videos of `index` for the text `query`, by the fused similarity."""
    return search_batch(model, index, [query], k, block, candidates, exact)[0]


def format_hits(hits: list[Hit], caption_width: int = 60) -> str:
    """A table: rank, fused score, each level's score, key, path and the first caption."""
    levels = list(hits[0].levels) if hits else []
    head = f"{'rank':>4}  {'score':>7}  " + "".join(f"{name[:12]:>13}" for name in levels) + "  key  path  caption"
    rows = []
    for i, h in enumerate(hits):
        cap = h.captions[0] if h.captions else "-"
        cap = cap if len(cap) <= caption_width else cap[:caption_width - 3] + "..."
        more = f" (+{len(h.captions) - 1})" if len(h.captions) > 1 else ""
        rows.append(f"{i + 1:>4}  {h.score:7.4f}  " + "".join(f"{h.levels[n]:13.4f}" for n in levels)
                    + f"  {h.key}  {h.path or '-'}  {cap}{more}")
    return "\n".join([head] + rows)


def hits_to_json(query: str, hits: list[Hit]) -> dict:
    return {"query": query, "hits": [{"rank": i + 1, "key": h.key, "score": h.score, "levels": h.levels,
                                      "path": h.path, "captions": h.captions} for i, h in enumerate(hits)]}


def build_video_index(checkpoint: str | Path, out: str | Path, videos: str | Path | None = None,
                      entries: list | None = None, source: str | Path | None = None, ann: str = "auto",
                      batch_size: int = 16, num_threads: int = 2, model=None) -> dict:
    """Embed a folder of videos, or `entries` (video_index.CatalogEntry: a manifest's rows, read by
    `hiervl search index` with dataprep/sources.py; `source` names the manifest) with `checkpoint`
    into a new index at `out`.

    Writes embeddings.parquet, catalog.parquet, index.json (with the model fingerprint) and, unless
    the ANN kind is exact flat (rebuilt at load in milliseconds), ann.faiss for the global level.
    Returns a summary {count, skipped, captioned, ann, level}.
    """
    from hiervl.eval.fingerprint import model_fingerprint
    from hiervl.eval.video_index import audio_files, embed_videos, list_videos
    from hiervl.run_dir import checkpoint_step, load_model_for_inference

    from_folder = videos is not None and entries is None  # audio files are reported for a --videos folder
    entries = list_videos(videos, entries)  # user errors before the model loads
    AnnIndex.choose_kind(len(entries), ann)
    if model is None:
        model, _ = load_model_for_inference(checkpoint)
    keys, embedded, skipped = embed_videos(model, entries, batch_size=batch_size, num_threads=num_threads)
    if not keys:
        raise UserError(f"none of the {len(entries)} videos could be decoded (first: {skipped[0][0]}: "
                        f"{skipped[0][1]}); nothing to index")
    out = Path(out)
    by_key = {e.key: e for e in entries}
    catalog = [{"key": k, "path": by_key[k].path, "captions": by_key[k].captions} for k in keys]
    g = global_level(model)
    meta = {"checkpoint": str(Path(checkpoint).resolve()), "model": model_fingerprint(model, checkpoint_step(checkpoint)),
            "source": str(Path(source or videos).resolve()), "skipped": len(skipped),
            "skipped_videos": [{"key": k, "reason": r} for k, r in skipped[:1000]]}
    kind = AnnIndex.choose_kind(len(keys), ann)
    if g is not None:
        meta["ann"] = {"level": g, "kind": kind, "file": ANN_FILE if kind != "flat" else None}
    write_index(out, keys, embedded, meta, catalog=catalog)
    if g is not None and kind != "flat":
        AnnIndex.build(embedded[g].numpy(), kind).save(out / ANN_FILE)
    elif (out / ANN_FILE).exists():
        (out / ANN_FILE).unlink()  # a stale file from an earlier, larger index in the same folder
    audio = audio_files(videos) if from_folder else []
    return {"count": len(keys), "skipped": len(skipped), "captioned": sum(1 for c in catalog if c["captions"]),
            "ann": kind, "level": g, "skipped_videos": skipped, "audio_files": audio}


def write_index(out_dir: str | Path, keys: list[str], videos: dict[str, torch.Tensor], meta: dict,
                catalog: list[dict] | None = None) -> Path:
    """Write an index: the video embeddings `videos` (level -> [N, ...], rows in `keys` order) as
    Parquet (key, level, vector), index.json (shapes, dtypes, `meta`) and, with `catalog` ({key,
    path, captions} per video), catalog.parquet (what search shows per hit). index.json is last."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(keys)
    row_keys = keys
    shapes, dtypes, keys, levels, offsets, values = {}, {}, [], [], [0], []
    for name, x in videos.items():
        flat = x.reshape(n, -1).float().numpy()  # [N, prod(shape)]
        shapes[name], dtypes[name] = list(x.shape[1:]), str(x.dtype).replace("torch.", "")
        keys += row_keys
        levels += [name] * n
        values.append(flat.ravel())
        offsets += (offsets[-1] + flat.shape[1] * np.arange(1, n + 1)).tolist()
    vector = pa.ListArray.from_arrays(pa.array(offsets, pa.int64() if offsets[-1] > 2**31 - 1 else pa.int32()),
                                      pa.array(np.concatenate(values), pa.float32()))
    table = pa.table({"key": pa.array(keys, pa.string()), "level": pa.array(levels, pa.string()), "vector": vector})
    path = out_dir / EMBEDDINGS_FILE
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp)
    if catalog is not None:
        cat = pa.table({"key": pa.array([c["key"] for c in catalog], pa.string()),
                        "path": pa.array([c.get("path") for c in catalog], pa.string()),
                        "captions": pa.array([list(c.get("captions") or []) for c in catalog], pa.list_(pa.string()))})
        with atomic_output(out_dir / CATALOG_FILE) as tmp:
            pq.write_table(cat, tmp)
    index = {"schema_version": 1, "count": n, "shapes": shapes, "dtypes": dtypes, "embeddings": EMBEDDINGS_FILE,
             **meta}
    write_meta(out_dir, index)
    return path


def write_meta(directory: Path, meta: dict) -> None:
    """index.json of the index at `directory` (replaced atomically)."""
    from hiervl.atomic_write import write_atomic

    write_atomic(Path(directory) / INDEX_FILE, json.dumps(meta, indent=2) + "\n")


def frames_for_hits(index: SearchIndex, hits: list[Hit], count: int = 4, data: str | None = None) -> dict:
    """Contact-sheet frames of each hit: from the dataset's tars (an eval index) or the video files."""
    data = data or index.data
    frames = load_frames(data, index.split, [h.key for h in hits], count=count) if data and index.split else {}
    for h in hits:
        if h.key not in frames and h.path and Path(h.path).is_file():
            try:
                raw = Path(h.path).read_bytes()
                info = probe_video_file(raw, h.path)
                frames[h.key] = decode_video_file(raw, frame_indices(info.frames, count, None), h.path, info.turns)
            except Exception:  # noqa: BLE001 - a thumbnail must not fail the search
                continue
    return frames


def load_frames(data: str | Path, split: str, keys: list[str], count: int = 4) -> dict[str, np.ndarray]:
    """`count` frames spread over each video, uint8 [count, H, W, 3], read from the dataset's tars."""

    try:
        ds = DatasetIndex(data, split)
    except (UserError, OSError):  # the dataset moved or is elsewhere: hits are shown without frames
        return {}
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
