"""The report writer on small hand-made metrics / eval / dataset files (no training, no Ray)."""

from __future__ import annotations

import json
import math

import pytest
from hiervl.eval.report import SearchResult, chance_levels, read_metrics, retrieval_table, summary_row, write_report


def _metrics(r1, r5, r10, mdr, mnr):
    return {"R1": r1, "R5": r5, "R10": r10, "MdR": mdr, "MnR": mnr, "queries": 10, "tied_queries": 0}


@pytest.fixture
def run_dir(tmp_path):
    records = [{"step": s, "loss": 5.0 - s / 10, "losses": {"clip": 2.0 - s / 40, "event": 3.0 - s / 20},
                "lr": 1e-4, "samples_per_s": 30.0 + s, "data_wait_share": 0.1, "skipped_samples": 0,
                "loader_cpu_share": s / 100}
               for s in (10, 20, 30)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    result = {"split": "test", "num_videos": 40, "num_captions": 160, "skipped": 0,
              "t2v": {"fused": _metrics(37.5, 71.25, 88.0, 2.0, 3.4), "clip": _metrics(20.0, 50.0, 60.0, 5.0, 7.0)},
              "v2t": {"fused": _metrics(42.5, 80.0, 92.5, 2.0, 2.9)}}
    (tmp_path / "eval.json").write_text(json.dumps(result))
    (tmp_path / "dataset.json").write_text(json.dumps({"counts": {"train": 160, "test": 40}, "quarantined": 3,
                                                       "hours": 0.1111, "codec": "vp9", "fps": 8,
                                                       "short_side": 48}))
    (tmp_path / "config.yaml").write_text("model:\n  preset: hit\n")
    return tmp_path


def test_chance_levels_match_closed_forms():
    ch = chance_levels(num_videos=100, num_captions=400)
    assert ch["t2v"]["R1"] == pytest.approx(1.0)
    assert ch["t2v"]["R10"] == pytest.approx(10.0)
    assert ch["t2v"]["MnR"] == pytest.approx(50.5)
    assert ch["captions_per_video"] == 4
    # v2t R@1: the single best-scoring caption of 400 is one of the video's 4 -> 4/400 = 1%.
    assert ch["v2t"]["R1"] == pytest.approx(1.0)
    # R@5: 1 - C(396,5)/C(400,5)
    assert ch["v2t"]["R5"] == pytest.approx(100 * (1 - math.comb(396, 5) / math.comb(400, 5)))
    assert ch["v2t"]["MnR"] == pytest.approx(396 / 5 + 1)


def test_read_metrics_skips_bad_lines(run_dir):
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [10, 20, 30]
    assert read_metrics(run_dir / "missing.jsonl") == []


def test_report_has_figures_tables_and_plots(run_dir, tmp_path):
    sheet = run_dir / "sheet.png"
    sheet.write_bytes(b"\x89PNG\r\n\x1a\n")  # the report only links it
    searches = [SearchResult("a red circle rises", [{"key": "g0001v2", "score": 0.8123, "captions": ["x"],
                                                     "match": True}], str(sheet), "g0001v2"),
                SearchResult("a blue square drops", [{"key": "g0002v1", "score": 0.5, "match": False}], None, "g9")]
    out = tmp_path / "report"
    path = write_report(out, eval_json=run_dir / "eval.json", dataset_json=run_dir / "dataset.json",
                        metrics_jsonl=run_dir / "metrics.jsonl", config_yaml=run_dir / "config.yaml",
                        searches=searches, timings={"train": 61.0})
    text = path.read_text()
    assert path == out / "report.md"
    # retrieval figures with chance (40 videos: R@1 chance 2.5, MnR chance 20.5)
    assert "| t2v | fused | 37.5 | 71.2 | 88.0 | 2.0 | 3.4 |" in text
    assert "| t2v | clip | 20.0 | 50.0 | 60.0 | 5.0 | 7.0 |" in text
    assert "| t2v | *chance* | *2.5* | *12.5* | *25.0* | *20.5* | *20.5* |" in text
    assert "**37.5%** vs chance 2.50%" in text
    # dataset summary
    assert "samples: **200** (test: 40, train: 160)" in text
    assert "loader CPU share: **20%**" in text  # the mean of 10/20/30%, beside the data-wait share
    assert "quarantined: **3**" in text
    assert "hours of video: **0.111**" in text
    # training: first -> last loss, the level losses, the plots exist and are linked
    assert "total loss 4.000 at step 10, peak 4.000 at step 10" in text
    assert "final **2.000** (mean of the last 1 logs)" in text
    assert "event: peak 2.500 -> final 1.500" in text
    for name in ("loss", "throughput"):
        png = out / "figures" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
        assert f"](figures/{name}.png)" in text
    # searches and config
    assert '### "a red circle rises"' in text and "| 1 | 0.812 | `g0001v2` | yes |" in text
    assert "A caption of `g0001v2` (held out): found at rank 1." in text
    assert "A caption of `g9` (held out): not in the top 1." in text
    assert str(sheet.resolve()) in text  # outside the report folder: an absolute link
    assert "preset: hit" in text
    assert "train 61s" in text


def test_retrieval_table_fused_only():
    result = {"num_videos": 10, "num_captions": 10, "t2v": {"fused": _metrics(50, 90, 100, 1, 1.5),
                                                            "clip": _metrics(1, 2, 3, 4, 5)},
              "v2t": {"fused": _metrics(60, 90, 100, 1, 1.4)}}
    table = retrieval_table(result, levels=False)
    assert "clip" not in table
    assert "| v2t | *chance* | *10.0* | *50.0* | *100.0* |" in table


def test_report_without_training_log(run_dir, tmp_path):
    path = write_report(tmp_path / "r2", eval_json=run_dir / "eval.json")
    text = path.read_text()
    assert "No metrics.jsonl records" in text and "No dataset.json" in text
    assert not (tmp_path / "r2" / "figures" / "loss.png").exists()


def test_report_shows_the_diagnostics_with_chance(run_dir, tmp_path):
    result = json.loads((run_dir / "eval.json").read_text())
    result["order"] = {"clip": {"order": 55.0, "queries": 160, "ties": 0},
                       "fused": {"order": 62.5, "queries": 160, "ties": 2}}
    result["groups"] = {"queries": 160, "groups": 10, "chance": {"group_R1": 10.0, "sibling_R1": 25.0},
                        "levels": {"clip": {"group_R1": 70.0, "sibling_R1": 27.5},
                                   "fused": {"group_R1": 81.25, "sibling_R1": 31.25}}}
    (run_dir / "eval.json").write_text(json.dumps(result))
    text = write_report(tmp_path / "r3", eval_json=run_dir / "eval.json").read_text()
    assert "### What the model tells apart" in text and "10 groups of related videos" in text
    lines = text.splitlines()
    at = lines.index("| level | order % (ties) | group R@1 | sibling R@1 |")
    assert lines[at + 2:at + 5] == ["| fused | 62.5 (2) | 81.2 | 31.2 |", "| clip | 55.0 (0) | 70.0 | 27.5 |",
                                    "| *chance* | *50* | *10.0* | *25.0* |"]  # fused first, then the levels
    assert "Fused: right group 81.2% (chance 10.0%), right video within it 31.2% (chance 25.0%), true order " \
           "preferred 62.5%." in text
    head = summary_row(result)
    assert (head["order"], head["sibling_R1"], head["sibling_R1_chance"]) == (62.5, 31.25, 25.0)
    # an ungrouped result: order only, and the table says the group columns are missing
    result["groups"] = None
    (run_dir / "eval.json").write_text(json.dumps(result))
    text = write_report(tmp_path / "r4", eval_json=run_dir / "eval.json").read_text()
    assert "| fused | 62.5 (2) | - | - |" in text and "need a `group` column" in text
    assert "Fused: right group" not in text


def test_report_of_an_eval_without_diagnostics(run_dir, tmp_path):
    text = write_report(tmp_path / "r5", eval_json=run_dir / "eval.json").read_text()
    assert "What the model tells apart" not in text  # an eval.json from before the diagnostics
    assert summary_row(json.loads((run_dir / "eval.json").read_text()))["order"] is None
