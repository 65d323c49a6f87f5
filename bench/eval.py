"""Benchmark: videos/s embedded by the tiny model, and time + peak memory of blocked ranking.

    .venv/bin/python bench/eval.py                      # 10k x 10k and 100k x 100k, both directions
    .venv/bin/python bench/eval.py --sizes 10000 --dsl  # also the DSL rows

Embedding: the tiny config's model (configs/tiny.yaml: ViT 2 layers width 128 on 8 frames of
32x32, MiniLM cut to 2 layers) encoding random clips and 12-word captions, batch 64, no decoding
(the loader has its own benchmark). Ranking: N captions x N videos of unit vectors (D=128, one
caption per video, a planted match so ranks are realistic), the global level, through
`hiervl.eval.metrics.blocked_ranks` exactly as `hiervl eval` runs it: pass 1 (t2v ranks, each
video's best caption), pass 2 (v2t counts). Each size runs in a fresh subprocess; its peak
resident memory during ranking is VmHWM after resetting it just before (Linux clear_refs), next
to the RSS before ranking (torch + embeddings) and the size the full N x N matrix would have.
Writes bench/out/eval.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hiervl.launch.processes import child_env  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def proc_status_mb(field: str) -> float | None:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, MiB (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: echo 5 > /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def bench_embed(batches: int, batch_size: int) -> dict:
    import torch
    from hiervl.config import load_config
    from hiervl.model.hierarchical import build_model

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.text.pretrained=false"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    t, s, words = cfg.data.num_frames, cfg.data.size, 12
    video = torch.randn(batch_size, t, 3, s, s)
    ids = torch.randint(1000, 3000, (batch_size, cfg.data.max_words))
    mask = torch.zeros_like(ids)
    mask[:, :words] = 1
    with torch.no_grad():
        model.encode_video(video)  # warm-up
        t0 = time.perf_counter()
        for _ in range(batches):
            model.encode_video(video)
        video_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(batches):
            model.encode_text(ids, mask)
        text_s = time.perf_counter() - t0
    n = batches * batch_size
    return {"videos_per_s": round(n / video_s, 1), "captions_per_s": round(n / text_s, 1), "batch_size": batch_size,
            "frames": t, "size": s, "threads": torch.get_num_threads()}


def bench_rank(n: int, dim: int, budget_mb: int, dsl: bool) -> dict:
    """One size, in this process: returns time and peak RSS."""
    import numpy as np
    import torch
    from hiervl.config import EvalConfig
    from hiervl.eval.evaluate import block_rows_for
    from hiervl.eval.metrics import blocked_ranks, metrics_from_ranks

    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)  # [N, D]
    t = torch.nn.functional.normalize(v + 4.0 * torch.randn(n, dim, generator=g) / dim ** 0.5, dim=1)  # [N, D]
    base = proc_status_mb("VmRSS")  # imports + embeddings, before ranking
    reset = reset_peak()
    rows = block_rows_for(n, 1, EvalConfig(block_mb=budget_mb))
    t0 = time.perf_counter()
    ranks = blocked_ranks(lambda i, j: {"global": t[i:j] @ v.T}, n, n, np.arange(n), rows,
                          dsl_scale=100.0 if dsl else None)["global"]
    seconds = time.perf_counter() - t0
    out = {"n": n, "dim": dim, "block_rows": rows, "block_mb": budget_mb, "dsl": dsl, "seconds": round(seconds, 2),
           "peak_rss_mb": round(proc_status_mb("VmHWM") if reset else peak_rss_mb(), 1),
           "rss_before_ranking_mb": round(base, 1) if base else None,
           "embeddings_mb": round(2 * n * dim * 4 / 2**20, 1), "full_matrix_mb": round(n * n * 4 / 2**20, 1),
           "pairs_per_s": round(2 * n * n / seconds / 1e6, 1) if not dsl else None}
    for direction, r in ranks.items():
        out[direction] = metrics_from_ranks(r.ranks, r.tied)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block-mb", type=int, default=512, help="eval.block_mb (memory of one block)")
    parser.add_argument("--dsl", action="store_true", help="also the DSL rows (one more exp per score)")
    parser.add_argument("--embed-batches", type=int, default=10)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one ranking size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(bench_rank(args.one, args.dim, args.block_mb, args.dsl)))
        return 0
    env = child_env()
    results = {"embed": bench_embed(args.embed_batches, 64), "rank": []}
    print(f"embed (tiny model, batch 64): {results['embed']['videos_per_s']} videos/s, "
          f"{results['embed']['captions_per_s']} captions/s")
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(n), "--dim", str(args.dim), "--block-mb", str(args.block_mb)]
        proc = subprocess.run(cmd + (["--dsl"] if args.dsl else []), capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results["rank"].append(r)
        print(f"rank {n} x {n}{' +DSL' if args.dsl else ''}: {r['seconds']} s, peak RSS {r['peak_rss_mb']} MiB "
              f"(before ranking {r['rss_before_ranking_mb']} MiB) "
              f"(embeddings {r['embeddings_mb']} MiB, full matrix would be {r['full_matrix_mb']} MiB), "
              f"{r['block_rows']} rows/block; t2v R@1 {r['t2v']['R1']:.1f}, v2t R@1 {r['v2t']['R1']:.1f}")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
