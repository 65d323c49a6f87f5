"""Benchmark: the ANN stage of `hiervl search` on a synthetic 1M-vector index, against brute force.

    .venv/bin/python bench/search.py                          # 1M x 512, IVF (what `auto` builds), 2 threads
    .venv/bin/python bench/search.py --n 200000 --dim 256 --hnsw

The index: N unit vectors of D dimensions (default 512, configs/base.yaml's model.embed_dim) in
planted clusters, so that nearest neighbours are meaningful: `--clusters` random unit centres,
each vector a centre plus Gaussian noise (`--noise` per dimension, so the noise norm is about
noise x sqrt(D)), renormalised. Queries are fresh draws from random clusters, so each has about
N / clusters true neighbours mixed among many near-misses.

Measured in one run, on the same vectors and queries:
- build time of the ANN index `hiervl.eval.ann.AnnIndex.build` (kind ivf: what `auto` picks
  above 65,536 vectors; and HNSW with --hnsw);
- query latency of the ANN stage, p50 / p95 of batch 1 (one query per call) and batch 64;
- the reference: exact brute force (FAISS IndexFlatIP, the `flat` kind `auto` uses for small
  indexes), same latencies, and its top 10 as the ground truth;
- recall@10 of the ANN stage: |ANN top 10 & exact top 10| / 10, averaged over the queries, for
  several nprobe values (the default 32 first).
Writes bench/out/search.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def planted(n: int, dim: int, clusters: int, noise: float, seed: int, chunk: int = 100_000):
    """(vectors [n, dim] float32 unit rows, centres [clusters, dim], a generator for queries)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x[s:e] = centres[rng.integers(0, clusters, e - s)] + noise * rng.standard_normal((e - s, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, centres, rng


def queries_from(centres: np.ndarray, count: int, noise: float, rng) -> np.ndarray:
    q = centres[rng.integers(0, len(centres), count)] + noise * rng.standard_normal((count, centres.shape[1]),
                                                                                   dtype=np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def latency_ms(search, queries: np.ndarray, batch: int, k: int, repeats: int) -> dict:
    """p50 / p95 wall milliseconds of `search(batch of queries, k)` over `repeats` calls."""
    times = []
    for r in range(repeats):
        s = (r * batch) % max(1, len(queries) - batch + 1)
        q = queries[s:s + batch]
        t0 = time.perf_counter()
        search(q, k)
        times.append((time.perf_counter() - t0) * 1000)
    return {"batch": batch, "calls": repeats, "p50_ms": float(np.percentile(times, 50)),
            "p95_ms": float(np.percentile(times, 95)), "per_query_p50_ms": float(np.percentile(times, 50)) / batch}


def recall_at(ann_rows: np.ndarray, exact_rows: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(a[:k]) & set(e[:k])) / k for a, e in zip(ann_rows, exact_rows)]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    p.add_argument("--dim", type=int, default=512, help="vector dimension (the model's global embed_dim)")
    p.add_argument("--clusters", type=int, default=10_000, help="planted clusters")
    p.add_argument("--noise", type=float, default=0.03, help="per-dimension Gaussian noise around a centre")
    p.add_argument("--queries", type=int, default=1000, help="queries for recall (and latency samples)")
    p.add_argument("--threads", type=int, default=2, help="FAISS OpenMP threads")
    p.add_argument("--nprobe", type=int, nargs="+", default=[32, 8, 64], help="IVF cells scanned (first = reported)")
    p.add_argument("--hnsw", action="store_true", help="also build and measure HNSW (long build)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import faiss
    from hiervl.eval.ann import AnnIndex

    faiss.omp_set_num_threads(args.threads)
    k = 10
    t0 = time.perf_counter()
    x, centres, rng = planted(args.n, args.dim, args.clusters, args.noise, args.seed)
    q = queries_from(centres, max(args.queries, 64 * 8), args.noise, rng)
    gen_s = time.perf_counter() - t0
    print(f"{args.n} x {args.dim} vectors in {args.clusters} clusters, {len(q)} queries: {gen_s:.1f}s", flush=True)

    rows = []
    t0 = time.perf_counter()
    exact = AnnIndex.build(x, "flat", threads=args.threads)
    flat_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, truth = exact.search(q[:args.queries], k)
    truth_s = time.perf_counter() - t0
    ref = {"kind": "flat (exact, reference)", "build_s": flat_build, "recall@10": 1.0,
           "batch1": latency_ms(exact.search, q, 1, k, 20), "batch64": latency_ms(exact.search, q, 64, k, 4),
           "truth_seconds": truth_s}
    rows.append(ref)
    print(json.dumps(ref), flush=True)
    del exact  # its copy of the vectors (N x D x 4 bytes): keep peak memory at two copies

    t0 = time.perf_counter()
    ivf = AnnIndex.build(x, "ivf", seed=args.seed, threads=args.threads)
    ivf_build = time.perf_counter() - t0
    for nprobe in args.nprobe:
        ivf.nprobe = nprobe
        _, got = ivf.search(q[:args.queries], k)
        row = {"kind": f"ivf nlist={ivf.index.nlist} nprobe={nprobe}", "build_s": ivf_build,
               "recall@10": recall_at(got, truth, k),
               "top1_agrees": float(np.mean(got[:, 0] == truth[:, 0])),
               "batch1": latency_ms(ivf.search, q, 1, k, 300), "batch64": latency_ms(ivf.search, q, 64, k, 30)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.hnsw:
        t0 = time.perf_counter()
        hnsw = AnnIndex.build(x, "hnsw", threads=args.threads)
        build = time.perf_counter() - t0
        _, got = hnsw.search(q[:args.queries], k)
        row = {"kind": f"hnsw M=32 efSearch={hnsw.ef}", "build_s": build, "recall@10": recall_at(got, truth, k),
               "top1_agrees": float(np.mean(got[:, 0] == truth[:, 0])),
               "batch1": latency_ms(hnsw.search, q, 1, k, 300), "batch64": latency_ms(hnsw.search, q, 64, k, 30)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n{'index':36} {'build s':>8} {'R@10':>6} {'b1 p50':>8} {'b1 p95':>8} {'b64 p50':>8} {'b64 p95':>8}  (ms)")
    for r in rows:
        print(f"{r['kind']:36} {r['build_s']:8.1f} {r['recall@10']:6.3f} {r['batch1']['p50_ms']:8.2f} "
              f"{r['batch1']['p95_ms']:8.2f} {r['batch64']['p50_ms']:8.2f} {r['batch64']['p95_ms']:8.2f}")
    out = ROOT / "bench" / "out" / "search.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "faiss": faiss.__version__, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
