"""`hiervl demo` end to end with tiny sizes: every stage for real (synth, Ray prep, DeepSpeed
training on 2 CPU ranks, eval, search), then the report. Slow (~2-3 minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(900)
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "hiervl.launch.cli", "demo", "--out", str(out), "--num-videos", "48", "--searches", "2",
           "train.steps=12", "checkpoint.every_steps=0", "queue.size=64", "data.batch_size=8",
           "optimizer.warmup_steps=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    # every stage announced itself, and the end names the report and the R@1 figure
    for n, stage in enumerate(("synth", "prep", "train", "eval", "search", "report"), start=1):
        assert f"[demo {n}/6] {stage}" in proc.stdout
    assert f"report: {out / 'report.md'}" in proc.stdout
    m = re.search(r"text-to-video R@1 ([0-9.]+)% \(chance ([0-9.]+)%\) on (\d+) held-out videos", proc.stdout)
    assert m, proc.stdout[-2000:]

    result = json.loads((out / "eval" / "eval.json").read_text())
    dataset = json.loads((out / "shards" / "dataset.json").read_text())
    assert sum(dataset["counts"].values()) == 48
    assert int(m.group(3)) == result["num_videos"] == dataset["counts"]["test"]
    assert float(m.group(1)) == pytest.approx(result["t2v"]["fused"]["R1"], abs=0.05)
    assert float(m.group(2)) == pytest.approx(100.0 / result["num_videos"], abs=0.005)

    # the trained run: 12 steps, 2 ranks, the flat preset (configs/demo.yaml: the measured winner)
    status = json.loads((out / "train" / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 12
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in metrics]
    assert steps[-1] == 12 and steps == sorted(set(steps))

    report = (out / "report.md").read_text()
    assert f"**{result['t2v']['fused']['R1']:.1f}%** vs chance" in report
    assert "samples: **48**" in report
    assert "preset: flat" in report and "ranks: 2" in report
    assert "## Which preset, as measured" in report and "This demo trains `flat` with the momentum queue off" in report
    for png in ("figures/loss.png", "figures/throughput.png"):
        assert (out / png).stat().st_size > 2000 and f"]({png})" in report
    sheets = sorted((out / "searches").glob("search-*.png"))
    assert len(sheets) == 2
    for sheet in sheets:
        assert f"](searches/{sheet.name})" in report
