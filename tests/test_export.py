"""The issue's "done when", end to end: a prepared dataset (real VP9 clips), a short `hiervl train`
under DeepSpeed's launcher (the session's run, conftest.py), `hiervl export`, `hiervl eval` on the checkpoint; then
the public API, loaded from the export alone, embeds the held-out captions and video files and gets
eval's embeddings, eval's similarities and, ranked by eval's own code, eval.json's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_api import extract_videos

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(one_rank_run, tmp_path_factory):
    """The session's real `hiervl train` run (conftest.py `one_rank_run`: DeepSpeed's launcher, 1 CPU
    rank, hit, 7 steps on the 40-sample dataset, checkpoints at 3 and 6 and the end), read only;
    (dataset, run folder, a folder of this module's own for the export and the eval)."""
    assert (one_rank_run["out"] / "checkpoints" / "latest").is_file()
    return one_rank_run["shards"], one_rank_run["out"], tmp_path_factory.mktemp("export")


def test_export_embeds_and_scores_exactly_as_eval_on_the_checkpoint(trained, capsys):
    import hiervl
    import pyarrow.parquet as pq
    from hiervl.config import Config
    from hiervl.eval.evaluate import EmbeddedSplit, rank_split
    from hiervl.eval.search import SearchIndex
    from hiervl.launch.cli import main
    from hiervl.run_dir import checkpoint_step, load_model_for_inference

    shards, run, root = trained
    model_dir, eval_dir = root / "model", root / "eval"
    assert main(["export", str(run), "--out", str(model_dir)]) == 0
    assert "verified: the export's text and video embeddings equal the checkpoint's" in capsys.readouterr().out
    info = json.loads((model_dir / "hiervl-export.json").read_text())
    assert info["source"]["step"] == checkpoint_step(run) == 7 and info["levels"] == ["feature", "semantic"]
    assert main(["eval", "--checkpoint", str(run), "--data", str(shards), "--split", "test", "--out", str(eval_dir),
                 "--no-diagnostics"]) == 0
    report = json.loads((eval_dir / "eval.json").read_text())

    # the held-out split as a user has it: video files and their captions, nothing from the shards' index
    rows = sorted((r for r in pq.read_table(shards / "manifest.parquet").to_pylist() if r["split"] == "test"),
                  key=lambda r: (r["shard"], r["index_in_shard"]))
    paths = extract_videos(shards, root / "videos")
    keys = [r["key"] for r in rows]
    captions = [c for r in rows for c in r["captions"]]
    c2v = torch.tensor([i for i, r in enumerate(rows) for _ in r["captions"]])
    assert len(keys) == report["num_videos"] >= 3 and len(captions) == report["num_captions"]

    api = hiervl.load(model_dir, device="cpu")
    v = api.encode_video([paths[k] for k in keys])
    t = api.encode_text(captions)

    # 1. the video embeddings are the ones `hiervl eval` exported from the checkpoint
    index = SearchIndex.load(eval_dir)
    assert index.keys == keys
    for name, x in index.videos.items():
        torch.testing.assert_close(v[name], x, atol=1e-5, rtol=0)
    # 2. the similarities are the checkpoint model's on eval's embeddings (caption x video, per level + fused)
    ckpt, _ = load_model_for_inference(run)
    ckpt_texts = ckpt.encode_text(**api.tokenize(captions))
    want = ckpt.similarity({k: x.detach() for k, x in ckpt_texts.items()}, index.videos)
    got = api.similarity(t, v)
    assert got.keys() == want.keys() == {"feature", "semantic", "fused"}
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0)
    # 3. ranked by eval's own code, the API's embeddings give eval.json's numbers exactly
    mine = rank_split(api.towers, EmbeddedSplit(keys, v, t, c2v, captions), Config().eval)  # `hiervl eval`'s defaults
    for direction in ("t2v", "v2t", "t2v_dsl", "v2t_dsl"):
        assert mine[direction] == report[direction], direction
