"""pipeline.eval.search: a known-answer index, ordering and scores equal to model.similarity, the
contact sheet from real frames, user errors; and (slow) the end-to-end train -> eval -> search."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_evaluate import SMALL, TINY, make_model  # noqa: E402
from test_loader_fixture import write_shards  # noqa: E402

CAPTIONS = ["a red circle slides left", "a blue square jumps up", "a green triangle spins",
            "two yellow stars fade out", "a purple ring grows", "an orange dot bounces right"]


def flat_model():
    from pipeline.config import load_config

    return make_model(load_config(TINY, SMALL + ["model.preset=flat"]))


def encode(model, texts):
    from pipeline.model.text_model import load_tokenizer

    tok = load_tokenizer(model.cfg.model.text.path)(texts, padding="max_length", truncation=True,
                                                     max_length=model.cfg.data.max_words, return_tensors="pt")
    with torch.no_grad():
        return model.encode_text(tok["input_ids"], tok["attention_mask"])


def test_known_answer_index_returns_the_matching_video_first(tmp_path):
    from pipeline.eval.evaluate import EmbeddedSplit, export_embeddings
    from pipeline.eval.search import SearchIndex, search

    model = flat_model()
    # videos whose embeddings are the captions' own text embeddings: caption i must find video i
    t = encode(model, CAPTIONS)
    keys = [f"vid{i}" for i in range(len(CAPTIONS))]
    export_embeddings(tmp_path, EmbeddedSplit(keys, {"global": t["global"]}, {}, torch.zeros(0)), {"split": "x"})
    index = SearchIndex.load(tmp_path)
    assert index.keys == keys and index.split == "x"
    for i, caption in enumerate(CAPTIONS):
        hits = search(model, index, caption, k=3, block=4)  # blocks of 4 videos: the split must not matter
        assert hits[0].key == keys[i]
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert len(hits) == 3 and hits[0].score >= hits[1].score >= hits[2].score
        want = (t["global"][i:i + 1] @ t["global"].T)[0]
        assert [h.key for h in hits] == [keys[j] for j in torch.topk(want, 3).indices.tolist()]
    assert len(search(model, index, CAPTIONS[0], k=100)) == len(CAPTIONS)


def test_hierarchical_scores_equal_model_similarity(tmp_path):
    from pipeline.config import load_config
    from pipeline.eval.evaluate import EmbeddedSplit, export_embeddings
    from pipeline.eval.search import SearchIndex, search

    model = make_model(load_config(TINY, SMALL + ["model.preset=hcmi"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        v = model.encode_video(torch.randn(7, 4, 3, 16, 16, generator=g))  # token and global levels
    keys = [f"k{i}" for i in range(7)]
    export_embeddings(tmp_path, EmbeddedSplit(keys, v, {}, torch.zeros(0)), {})
    index = SearchIndex.load(tmp_path)
    for name in v:
        torch.testing.assert_close(index.videos[name], v[name], rtol=0, atol=0)
    hits = search(model, index, CAPTIONS[1], k=7, block=3)
    with torch.no_grad():
        sims = model.similarity(encode(model, [CAPTIONS[1]]), v)
    order = torch.argsort(sims["fused"][0], descending=True).tolist()
    assert [h.key for h in hits] == [keys[j] for j in order]
    for h in hits:
        j = keys.index(h.key)
        assert h.score == pytest.approx(float(sims["fused"][0, j]), abs=1e-5)
        assert set(h.levels) == set(model.levels)
        for name in model.levels:
            assert h.levels[name] == pytest.approx(float(sims[name][0, j]), abs=1e-5)


def test_contact_sheet_shows_the_hits_frames(tmp_path):
    from PIL import Image

    from pipeline.eval.search import Hit, contact_sheet, load_frames

    data = write_shards(tmp_path / "shards", 3, "vp9", split="test", per_shard=2)
    frames = load_frames(data, "test", ["test00002", "test00000", "missing"], count=3)
    assert set(frames) == {"test00002", "test00000"}  # unknown keys are left out, not fatal
    assert frames["test00000"].shape == (3, 32, 40, 3) and frames["test00000"].dtype == np.uint8
    assert not np.array_equal(frames["test00000"][0], frames["test00000"][-1])  # spread over the clip
    assert not np.array_equal(frames["test00000"][0], frames["test00002"][0])
    hits = [Hit("test00002", 0.9, {}), Hit("test00000", 0.5, {}), Hit("missing", 0.1, {})]
    png = contact_sheet(hits, frames, tmp_path / "sheet.png", query="a query")
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[0] > 200 and img.shape[1] > 300
    # the frames' colours are on the sheet: the first frame's dominant colour appears
    colour = np.median(frames["test00000"][0].reshape(-1, 3), axis=0)
    assert (np.abs(img.astype(int) - colour).sum(axis=-1) < 30).sum() > 100


def test_user_errors(tmp_path):
    from pipeline.errors import UserError
    from pipeline.eval.evaluate import EmbeddedSplit, export_embeddings
    from pipeline.eval.search import SearchIndex, search

    with pytest.raises(UserError, match="hiervl eval"):
        SearchIndex.load(tmp_path / "nope")
    model = flat_model()
    export_embeddings(tmp_path, EmbeddedSplit(["a"], {"global": encode(model, ["x"])["global"]}, {}, torch.zeros(0)), {})
    with pytest.raises(UserError, match="empty"):
        search(model, SearchIndex.load(tmp_path), "   ")


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
@pytest.mark.integration
def test_train_then_eval_above_chance_and_search_finds_a_training_video(tmp_path, capsys):
    """synth -> prep -> a short tiny-config training run -> hiervl eval -> hiervl search."""
    synth = pytest.importorskip("dataprep.synth")
    driver = pytest.importorskip("dataprep.driver")
    from launch.cli import main
    from pipeline.config import load_config

    cfg = load_config(TINY, ["prep.num_workers=2"])
    manifest = synth.make_corpus(tmp_path / "corpus", 240, seed=0)
    driver.prepare(cfg, str(manifest), str(tmp_path / "shards"))
    run = tmp_path / "run"
    assert main(["train", "--config", TINY, f"data.path={tmp_path / 'shards'}", f"train.out_dir={run}",
                 "train.steps=150", "train.ranks=1", "checkpoint.every_steps=0", "model.text.num_layers=2"]) == 0
    out = tmp_path / "eval-train"
    assert main(["eval", "--checkpoint", str(run), "--data", str(tmp_path / "shards"), "--split", "train",
                 "--out", str(out)]) == 0
    res = json.loads((out / "eval.json").read_text())
    chance = 100.0 / res["num_videos"]
    assert res["t2v"]["fused"]["R1"] > 3 * chance, res["t2v"]["fused"]
    capsys.readouterr()
    # a caption of a training video the model ranks first in eval: search must return that video
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "shards" / "manifest.parquet", columns=["key", "split", "captions"]).to_pylist()
    train = [r for r in rows if r["split"] == "train"]
    from pipeline.eval.search import SearchIndex, search
    from pipeline.train.checkpoint import load_model_for_inference

    model, _ = load_model_for_inference(run)
    index = SearchIndex.load(out)
    found = [r for r in train[:40] if search(model, index, r["captions"][0], k=1)[0].key == r["key"]]
    assert found, "no training caption finds its own video first"
    pick = found[0]
    assert main(["search", pick["captions"][0], "--index", str(out), "-k", "5"]) == 0
    first = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("1 ")][0]
    assert first.split()[-1] == pick["key"]
