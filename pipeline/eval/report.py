"""The run report a person reads: `<out>/report.md` with plots, tables and contact sheets.

`write_report` gathers what the stages left on disk — the resolved config (config.yaml), the
dataset summary (dataset.json from `hiervl prep`), the training log (metrics.jsonl from the
trainer), the retrieval metrics (eval.json from `hiervl eval`) and the search results — and
writes one Markdown file with PNG figures beside it (matplotlib, Agg backend: no display).

Every retrieval figure is printed beside its chance level: a random ranking of the same
gallery (`chance_levels`), so a reader can tell "R@1 30" on 120 videos from noise at a glance.
The diagnostics `hiervl eval` adds (order sensitivity; group and sibling R@1 on grouped data,
pipeline/eval/metrics.py) get their own table with their chance row (`diagnostics_table`).

Owns: `report.md` and its plots and tables.
Must not touch: training or metric computation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from hiervl.data.manifest import MANIFEST_FILE
from hiervl.eval.evaluate import diagnostics_note, format_diagnostics
from hiervl.eval.search import SearchIndex, contact_sheet, format_hits, load_frames, search
from hiervl.log import get_logger
from hiervl.run_dir import load_model_for_inference

log = get_logger(__name__)

KS = (1, 5, 10)
METRICS = ("R1", "R5", "R10", "MdR", "MnR")


@dataclass
class SearchResult:
    """One demo search: the sentence, the hits (key, fused score, captions) and the sheet PNG."""

    query: str
    hits: list[dict] = field(default_factory=list)  # {"key", "score", "captions", "match"}
    sheet: str | None = None  # path to the contact sheet PNG
    expected: str | None = None  # key of the video the query was taken from, if any


# ---------------------------------------------------------------------------- chance levels


def _median_rank(survival) -> float:
    """1-based median rank from P(rank >= r) (0-based r), evaluated lazily."""
    r = 0
    while survival(r + 1) > 0.5:
        r += 1
    return float(r + 1)


def chance_levels(num_videos: int, num_captions: int) -> dict:
    """R@1/5/10 (percent), MdR and MnR of a random ranking, per direction.

    t2v: each caption ranks `num_videos` videos; its video lands uniformly, so R@k = k/N and
    MnR = (N+1)/2. v2t (best own caption among the other videos' captions, see metrics.py):
    with c = captions per video and M = N*c captions in all, the best of the c own captions
    is preceded by r others with P(r >= k) = C(M-c, k) / C(M, k), so E[r] = (M-c)/(c+1).
    """
    n = max(int(num_videos), 1)
    t2v = {f"R{k}": 100.0 * min(k, n) / n for k in KS}
    t2v["MdR"] = (n + 1) / 2.0  # median of a uniform rank over 1..N
    t2v["MnR"] = (n + 1) / 2.0
    c = max(int(round(num_captions / n)), 1)
    m = n * c

    def survival(k: int) -> float:  # P(rank >= k): the k best-scoring captions are all others'
        if k > m - c:
            return 0.0
        return math.exp(math.lgamma(m - c + 1) - math.lgamma(m - c - k + 1) + math.lgamma(m - k + 1)
                        - math.lgamma(m + 1))

    v2t = {f"R{k}": 100.0 * (1.0 - survival(k)) for k in KS}
    v2t["MdR"] = _median_rank(survival)
    v2t["MnR"] = (m - c) / (c + 1) + 1.0
    return {"t2v": t2v, "v2t": v2t, "captions_per_video": c}


# ---------------------------------------------------------------------------- training curves


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl (one JSON object per logged step); bad lines are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: skipping a line that is not JSON: %.60s", path, line)
    return records


def plot_training_curves(records: list[dict], out_dir: str | Path) -> dict[str, Path]:
    """Write loss.png (total + one line per level) and throughput.png (samples/s, data wait share).

    Returns {"loss": path, "throughput": path}; empty when there are no records.
    """
    if not records:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in records]
    levels = sorted({name for r in records for name in (r.get("losses") or {})})

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.plot(steps, [r["loss"] for r in records], color="black", linewidth=2, label="total")
    for name in levels:
        ax.plot(steps, [(r.get("losses") or {}).get(name, float("nan")) for r in records], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("training loss per level")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    loss_png = out / "loss.png"
    fig.savefig(loss_png)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(steps, [r.get("samples_per_s", float("nan")) for r in records], color="tab:blue", label="samples/s")
    ax.set_xlabel("step")
    ax.set_ylabel("samples/s (global)", color="tab:blue")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [100.0 * r.get("data_wait_share", float("nan")) for r in records], color="tab:orange",
             linestyle="--", label="data wait %")
    ax2.set_ylabel("time waiting for data (%)", color="tab:orange")
    ax2.set_ylim(0, 100)
    ax.set_title("training throughput")
    fig.tight_layout()
    tput_png = out / "throughput.png"
    fig.savefig(tput_png)
    plt.close(fig)
    return {"loss": loss_png, "throughput": tput_png}


# ---------------------------------------------------------------------------- tables


def retrieval_table(result: dict, levels: bool = True) -> str:
    """Markdown: t2v and v2t rows (fused first, then each level) with the chance row beside."""
    chance = chance_levels(result["num_videos"], result["num_captions"])
    head = ("| direction | level | R@1 | R@5 | R@10 | MdR | MnR |\n"
            "|---|---|---|---|---|---|---|\n")
    rows = []
    for direction in ("t2v", "v2t"):
        per_level = result.get(direction, {})
        names = ["fused"] + ([n for n in per_level if n != "fused"] if levels else [])
        for name in names:
            if name not in per_level:
                continue
            m = per_level[name]
            rows.append(f"| {direction} | {name} | " + " | ".join(f"{m[k]:.1f}" for k in METRICS) + " |")
        ch = chance[direction]
        rows.append(f"| {direction} | *chance* | " + " | ".join(f"*{ch[k]:.1f}*" for k in METRICS) + " |")
    return head + "\n".join(rows) + "\n"


def diagnostics_table(result: dict) -> str:
    """Markdown: order sensitivity and group / sibling R@1, fused first then each level, with the
    chance row (the table `hiervl eval` prints); empty when the eval result has no diagnostics
    (an eval.json from before them)."""

    return format_diagnostics(result)


def summary_row(result: dict) -> dict:
    """The headline figures: fused t2v/v2t R@1 and the chance level beside them, and the fused
    diagnostics when the eval result has them (None otherwise)."""
    chance = chance_levels(result["num_videos"], result["num_captions"])
    fused_order = (result.get("order") or {}).get("fused")
    groups = result.get("groups")
    g = groups["levels"].get("fused") if groups else None
    return {"t2v_R1": result["t2v"]["fused"]["R1"], "t2v_R1_chance": chance["t2v"]["R1"],
            "v2t_R1": result["v2t"]["fused"]["R1"], "v2t_R1_chance": chance["v2t"]["R1"],
            "t2v_R5": result["t2v"]["fused"]["R5"], "t2v_MdR": result["t2v"]["fused"]["MdR"],
            "num_videos": result["num_videos"], "num_captions": result["num_captions"],
            "order": fused_order["order"] if fused_order else None,
            "group_R1": g["group_R1"] if g else None, "group_R1_chance": groups["chance"]["group_R1"] if g else None,
            "sibling_R1": g["sibling_R1"] if g else None,
            "sibling_R1_chance": groups["chance"]["sibling_R1"] if g else None}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)


def _dataset_section(dataset: dict) -> str:
    counts = dataset.get("counts", {})
    total = sum(counts.values())
    split_txt = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    return (f"- samples: **{total}** ({split_txt})\n"
            f"- quarantined: **{dataset.get('quarantined', 0)}**\n"
            f"- hours of video: **{float(dataset.get('hours', 0.0)):.3f}**\n"
            f"- codec {dataset.get('codec', '?')}, {dataset.get('fps', '?')} fps, "
            f"short side {dataset.get('short_side', '?')} px\n")


def _training_section(records: list[dict], status: dict | None, figures: dict, rel) -> str:
    if not records:
        return "No metrics.jsonl records were found.\n"
    first, last = records[0], records[-1]
    tail = records[-max(1, len(records) // 10):]  # the last tenth of the logs: a steadier "final"
    peak = max(records, key=lambda r: r["loss"])
    sps = [r["samples_per_s"] for r in records[1:] or records if "samples_per_s" in r]
    wait = [r["data_wait_share"] for r in records if "data_wait_share" in r]
    loader_cpu = [r["loader_cpu_share"] for r in records if "loader_cpu_share" in r]
    lines = [f"- steps: **{last['step']}**; total loss {first['loss']:.3f} at step {first['step']}, peak "
             f"{peak['loss']:.3f} at step {peak['step']} (it rises while the momentum queues fill with "
             f"negatives), final **{_mean(r['loss'] for r in tail):.3f}** (mean of the last {len(tail)} logs)"]
    for name in (last.get("losses") or {}):
        lines.append(f"  - {name}: peak {max((r.get('losses') or {}).get(name, float('-inf')) for r in records):.3f}"
                     f" -> final {_mean((r.get('losses') or {}).get(name, float('nan')) for r in tail):.3f}")
    if sps:
        lines.append(f"- throughput: median **{sorted(sps)[len(sps) // 2]:.1f} samples/s** (global), "
                     f"waiting for data {100 * sum(wait) / max(len(wait), 1):.0f}% of the time")
    if loader_cpu:
        lines.append(f"- loader CPU share: **{100 * _mean(loader_cpu):.0f}%** of the CPU the ranks and their decode "
                     "workers used went to loading (decode, transform, assembly; all ranks), beside the "
                     "data-wait share above")
    lines.append(f"- skipped samples: {last.get('skipped_samples', 0)}")
    if status:
        lines.append(f"- status: {status.get('state')} ({status.get('reason')}), checkpoint {status.get('checkpoint')}")
    text = "\n".join(lines) + "\n\n"
    for name in ("loss", "throughput"):
        if name in figures:
            text += f"![{name}]({rel(figures[name])})\n\n"
    return text


def _search_section(searches: list[SearchResult], rel) -> str:
    if not searches:
        return "No searches were run.\n"
    parts = []
    for s in searches:
        parts.append(f"### \"{s.query}\"\n")
        if s.expected:
            rank = next((i + 1 for i, h in enumerate(s.hits) if h["key"] == s.expected), None)
            parts.append(f"A caption of `{s.expected}` (held out): " + (f"found at rank {rank}.\n" if rank else
                         f"not in the top {len(s.hits)}.\n"))
        if s.hits:
            parts.append("| rank | score | key | match | captions |\n|---|---|---|---|---|")
            for i, h in enumerate(s.hits):
                caps = "; ".join(h.get("captions", [])[:2]).replace("|", "/")
                mark = "yes" if h.get("match") else ""
                parts.append(f"| {i + 1} | {h['score']:.3f} | `{h['key']}` | {mark} | {caps} |")
            parts.append("")
        if s.sheet:
            parts.append(f"![contact sheet]({rel(s.sheet)})\n")
    return "\n".join(parts) + "\n"


def write_report(out_dir: str | Path, *, eval_json: str | Path, dataset_json: str | Path | None = None,
                 metrics_jsonl: str | Path | None = None, config_yaml: str | Path | None = None,
                 status_json: str | Path | None = None, searches: list[SearchResult] | None = None,
                 timings: dict | None = None, title: str = "hiervl demo report",
                 notes: list[str] | None = None) -> Path:
    """Write `<out_dir>/report.md` (and figures/ PNGs); returns the report path.

    `notes`: Markdown sections the caller adds after the searches (the demo: which preset, as measured).
    Paths in the report are relative to `out_dir`, so the folder can be moved or browsed.
    Missing optional inputs become a line saying so; eval.json is required.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def rel(p) -> str:
        p = Path(p)
        try:
            return str(p.resolve().relative_to(out.resolve()))
        except ValueError:
            return str(p.resolve())

    result = json.loads(Path(eval_json).read_text())
    dataset = json.loads(Path(dataset_json).read_text()) if dataset_json and Path(dataset_json).is_file() else None
    status = json.loads(Path(status_json).read_text()) if status_json and Path(status_json).is_file() else None
    records = read_metrics(metrics_jsonl) if metrics_jsonl else []
    figures = plot_training_curves(records, out / "figures")
    head = summary_row(result)

    text = [f"# {title}\n"]
    text.append(f"Text-to-video R@1 (fused) on the held-out `{result.get('split', 'test')}` split: "
                f"**{head['t2v_R1']:.1f}%** vs chance {head['t2v_R1_chance']:.2f}% "
                f"({head['num_videos']} videos, {head['num_captions']} captions); video-to-text R@1 "
                f"**{head['v2t_R1']:.1f}%** vs chance {head['v2t_R1_chance']:.2f}%.\n")
    if timings:
        text.append("Stage wall times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + "\n")
    text.append("## Dataset\n")
    text.append(_dataset_section(dataset) if dataset else "No dataset.json was found.\n")
    text.append("## Training\n")
    text.append(_training_section(records, status, figures, rel))
    text.append("## Retrieval\n")
    text.append("R@k in percent, MdR/MnR 1-based (lower is better); ties ranked pessimistically. *chance* is "
                "a random ranking of the same gallery. t2v ranks every caption; v2t takes each video's best "
                "caption.\n\n")
    text.append(retrieval_table(result))
    diag = diagnostics_table(result)
    if diag:

        text.append("\n### What the model tells apart\n")
        text.append(diagnostics_note(result) + "\n" + diag)
        if head["sibling_R1"] is not None:
            text.append(f"Fused: right group {head['group_R1']:.1f}% (chance {head['group_R1_chance']:.1f}%), right "
                        f"video within it {head['sibling_R1']:.1f}% (chance {head['sibling_R1_chance']:.1f}%)"
                        + (f", true order preferred {head['order']:.1f}%" if head["order"] is not None else "")
                        + ".\n")
    text.append("\n## Searches\n")
    text.append(_search_section(searches or [], rel))
    text.extend(n.rstrip() + "\n" for n in notes or [])
    if config_yaml and Path(config_yaml).is_file():
        text.append("## Configuration\n\n```yaml\n" + Path(config_yaml).read_text().rstrip() + "\n```\n")
    path = out / "report.md"
    path.write_text("\n".join(text))
    log.info("report: %s", path)
    return path


# ---------------------------------------------------------------------------- demo searches


def pick_queries(data: str | Path, split: str = "test", count: int = 3, seed: int = 0) -> list[tuple[str, str]]:
    """`count` (caption, key) pairs from `split` of a prepared dataset: queries whose answer is known."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(Path(data) / MANIFEST_FILE, columns=["key", "split", "captions"]).to_pylist()
    rows = [r for r in table if r["split"] == split and r["captions"]]
    if not rows:
        return []
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(rows), size=min(count, len(rows)), replace=False)
    return [(rows[i]["captions"][int(rng.integers(len(rows[i]["captions"])))], rows[i]["key"]) for i in picked]


def run_searches(index_dir: str | Path, queries: list[tuple[str, str | None]], out_dir: str | Path, k: int = 5,
                 frames: int = 4) -> list[SearchResult]:
    """Search each (sentence, expected key or None) in an exported index with its checkpoint,
    draw a contact sheet per query into `out_dir`, and return the hits with their captions."""
    import re

    import pyarrow.parquet as pq


    index = SearchIndex.load(index_dir)
    model, _ = load_model_for_inference(index.meta["checkpoint"])
    captions = {}
    if index.data and (Path(index.data) / MANIFEST_FILE).is_file():
        for r in pq.read_table(Path(index.data) / MANIFEST_FILE, columns=["key", "captions"]).to_pylist():
            captions[r["key"]] = list(r["captions"] or [])
    out = Path(out_dir)
    results = []
    for i, (query, expected) in enumerate(queries):
        hits = search(model, index, query, k=k)
        print(f'search "{query}"' + (f" (its video: {expected})" if expected else ""))
        print(format_hits(hits))
        slug = re.sub(r"[^a-z0-9]+", "-", query.lower()).strip("-")[:40] or "query"
        imgs = load_frames(index.data, index.split, [h.key for h in hits], count=frames) if index.data else {}
        sheet = contact_sheet(hits, imgs, out / f"search-{i + 1}-{slug}.png", query=query)
        results.append(SearchResult(query, [{"key": h.key, "score": h.score, "captions": captions.get(h.key, []),
                                             "match": h.key == expected} for h in hits], str(sheet), expected))
    return results
