"""The approximate nearest-neighbour stage of search: FAISS over one level's unit vectors.

    ann = AnnIndex.build(vectors)          # float32 [N, D], rows L2-normalised
    scores, rows = ann.search(queries, 100)  # [B, 100] inner products and row numbers (-1 = none)
    ann.save(path); AnnIndex.load(path)

Inner product on normalised vectors is the cosine the global level scores with
(`hiervl.model.levels.global_similarity`), so the ANN stage ranks exactly like eval would on
that level, up to the approximation. Kinds:
- `flat`: exact (`IndexFlatIP`), brute force; what `auto` picks below `EXACT_BELOW` vectors,
  where a scan of every vector costs a few milliseconds and an approximation buys nothing.
- `ivf`: `IndexIVFFlat` with `nlist` ~ sqrt(N) k-means cells (trained on a sample of 64
  vectors per cell); a query scans the `nprobe` (default 32) nearest cells, ~3% of the vectors
  at 1M. What `auto` picks above the threshold (build time and recall: bench/search.py).
- `hnsw`: `IndexHNSWFlat` (M=32, efConstruction=80, efSearch=`ef`): no training, faster queries,
  a much longer build (graph insertion).

Owns: building, saving, loading and querying the FAISS index of one level.
Must not touch: models, the fine levels or fusion (pipeline/eval/search.py re-ranks).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from hiervl.errors import UserError
from hiervl.log import get_logger

log = get_logger(__name__)

KINDS = ("auto", "flat", "ivf", "hnsw")
EXACT_BELOW = 65_536  # `auto`: exact flat search below this many vectors
DEFAULT_NPROBE = 32
TRAIN_PER_CELL = 64  # k-means training vectors per IVF cell
DEFAULT_EF = 128


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a pinned dependency
        raise UserError("search needs faiss: pip install faiss-cpu (pinned in requirements.txt)") from exc
    return faiss


def _as_matrix(x) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"expected [N, D] vectors, got shape {x.shape}")
    return x


class AnnIndex:
    """A FAISS inner-product index over N unit vectors; row numbers are positions in the index."""

    def __init__(self, index, kind: str):
        self.index, self.kind = index, kind
        self.nprobe, self.ef = DEFAULT_NPROBE, DEFAULT_EF

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @staticmethod
    def choose_kind(n: int, kind: str = "auto") -> str:
        if kind not in KINDS:
            raise UserError(f"ANN kind {kind!r}: use one of {', '.join(KINDS)}")
        if kind == "auto":
            return "flat" if n < EXACT_BELOW else "ivf"
        return kind

    @classmethod
    def build(cls, vectors, kind: str = "auto", nlist: int | None = None, seed: int = 0,
              threads: int | None = None) -> "AnnIndex":
        """An index over `vectors` [N, D] (normalised by the caller). `nlist` only for ivf."""
        faiss = _faiss()
        if threads:
            faiss.omp_set_num_threads(int(threads))
        x = _as_matrix(vectors)
        n, d = x.shape
        kind = cls.choose_kind(n, kind)
        t0 = time.perf_counter()
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
        else:
            nlist = int(nlist or max(1, min(round(math.sqrt(n)), n // 39 or 1)))  # >= 39 training points per cell
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = x
            if n > TRAIN_PER_CELL * nlist:  # k-means on a sample (FAISS asks for 39-256 points per cell)
                sample = x[np.sort(np.random.default_rng(seed).choice(n, TRAIN_PER_CELL * nlist, replace=False))]
            index.cp.seed = seed
            index.train(sample)
        index.add(x)
        out = cls(index, kind)
        log.info("ANN index: %s over %d x %d vectors in %.1fs", kind, n, d, time.perf_counter() - t0)
        return out

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top `k` rows per query by inner product: (scores [B, k] float32, rows [B, k] int64, -1 = none)."""
        faiss = _faiss()
        q = _as_matrix(queries)
        k = max(1, min(int(k), self.ntotal))
        if self.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=min(self.nprobe, self.index.nlist))
            return self.index.search(q, k, params=params)
        if self.kind == "hnsw":
            return self.index.search(q, k, params=faiss.SearchParametersHNSW(efSearch=max(self.ef, k)))
        return self.index.search(q, k)

    def save(self, path: str | Path) -> Path:
        from hiervl.atomic_write import atomic_output

        path = Path(path)
        with atomic_output(path) as tmp:
            _faiss().write_index(self.index, str(tmp))
        return path

    @classmethod
    def load(cls, path: str | Path, kind: str) -> "AnnIndex":
        return cls(_faiss().read_index(str(path)), kind)


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, block: int = 65_536) -> np.ndarray:
    """Brute-force top-k rows [B, k] by inner product in blocks of `block` vectors (the reference
    the ANN stage's recall is measured against; numpy only, no FAISS)."""
    q = _as_matrix(queries)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for start in range(0, len(vectors), block):
        s = q @ vectors[start:start + block].T  # [B, b]
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], axis=1)
        best_i = np.concatenate([best_i, part + start], axis=1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i
