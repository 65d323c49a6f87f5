"""hiervl.eval.search: a known-answer index, ordering and scores equal to model.similarity, the
contact sheet from real frames, user errors; and (slow) the end-to-end train -> eval -> search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import write_shards
from test_evaluate import SMALL, TINY, make_model

CAPTIONS = ["a red circle slides left", "a blue square jumps up", "a green triangle spins",
            "two yellow stars fade out", "a purple ring grows", "an orange dot bounces right"]


def flat_model():
    from hiervl.config import load_config

    return make_model(load_config(TINY, SMALL + ["model.preset=flat"]))


def encode(model, texts):
    from hiervl.model.text_model import load_tokenizer

    tok = load_tokenizer(model.cfg.model.text.path)(texts, padding="max_length", truncation=True,
                                                     max_length=model.cfg.data.max_words, return_tensors="pt")
    with torch.no_grad():
        return model.encode_text(tok["input_ids"], tok["attention_mask"])


def test_known_answer_index_returns_the_matching_video_first(tmp_path):
    from hiervl.eval.search import SearchIndex, search, write_index

    model = flat_model()
    # videos whose embeddings are the captions' own text embeddings: caption i must find video i
    t = encode(model, CAPTIONS)
    keys = [f"vid{i}" for i in range(len(CAPTIONS))]
    write_index(tmp_path, keys, {"global": t["global"]}, {"split": "x"})
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
    from hiervl.config import load_config
    from hiervl.eval.search import SearchIndex, search, write_index

    model = make_model(load_config(TINY, SMALL + ["model.preset=hcmi"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        v = model.encode_video(torch.randn(7, 4, 3, 16, 16, generator=g))  # token and global levels
    keys = [f"k{i}" for i in range(7)]
    write_index(tmp_path, keys, v, {})
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
    from hiervl.eval.search import Hit, contact_sheet, load_frames
    from PIL import Image

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
    from hiervl.errors import UserError
    from hiervl.eval.search import SearchIndex, search, write_index

    with pytest.raises(UserError, match="hiervl eval"):
        SearchIndex.load(tmp_path / "nope")
    model = flat_model()
    write_index(tmp_path, ["a"], {"global": encode(model, ["x"])["global"]}, {})
    with pytest.raises(UserError, match="empty"):
        search(model, SearchIndex.load(tmp_path), "   ")


# ------------------------------------------------------------------------------ ANN, indexing, fingerprints


def save_checkpoint(model, out: Path, step: int = 1) -> Path:
    """`model` in the files `load_model_for_inference` reads from a DeepSpeed run (meta.json with the
    resolved config, mp_rank_00_model_states.pt with the module's state_dict, `latest`)."""
    from hiervl.config import to_dict

    tag = out / "checkpoints" / f"step{step:08d}"
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
    (tag / "meta.json").write_text(json.dumps({"config": to_dict(model.cfg), "zero_stage": 0, "step": step,
                                               "tag": tag.name, "world_size": 1}))
    (out / "checkpoints" / "latest").write_text(tag.name)
    return out


def test_ann_stage_flat_is_exact_and_ivf_finds_planted_neighbours(tmp_path):
    from hiervl.eval.ann import EXACT_BELOW, AnnIndex, exact_top_k

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 32)).astype(np.float32)
    x = centres[rng.integers(0, 50, 5000)] + 0.15 * rng.standard_normal((5000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(0, 5000, 64)] + 0.05 * rng.standard_normal((64, 32)).astype(np.float32)
    truth = exact_top_k(x, q, 10, block=777)  # blocks must not matter
    ref = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]
    assert (truth[:, 0] == ref[:, 0]).all()
    assert AnnIndex.choose_kind(EXACT_BELOW - 1) == "flat" and AnnIndex.choose_kind(EXACT_BELOW) == "ivf"
    flat = AnnIndex.build(x)
    assert flat.kind == "flat"
    scores, rows = flat.search(q, 10)
    assert (rows[:, 0] == truth[:, 0]).all()
    np.testing.assert_allclose(scores[:, 0], np.sum(q * x[truth[:, 0]], axis=1), rtol=1e-5)
    ivf = AnnIndex.build(x, "ivf")
    assert ivf.index.nlist == 71  # sqrt(5000)
    ivf.nprobe = 8
    _, got = ivf.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)])
    assert recall > 0.9, recall
    ivf.nprobe = 1
    _, one = ivf.search(q, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(one, truth)]) < recall  # nprobe is used
    ivf.save(tmp_path / "ann.faiss")
    back = AnnIndex.load(tmp_path / "ann.faiss", "ivf")
    back.nprobe = 8
    assert (back.search(q, 10)[1] == got).all()


def test_ann_shortlist_is_reranked_by_every_level_exactly_as_eval_scores(tmp_path):
    """An index `hiervl eval` exports from real shards (hit: a token level + the global one): the
    hits are the ANN shortlist ranked by the fused score eval computes; a shortlist as large as the
    index is brute force. (Top 1 == brute force on a trained run: the slow test below.)"""
    from hiervl.config import load_config
    from hiervl.eval.evaluate import evaluate_model
    from hiervl.eval.search import SearchIndex, encode_queries, search_batch

    data = write_shards(tmp_path / "shards", 24, "vp9", split="test", per_shard=8)
    cfg = load_config(TINY, SMALL + [f"data.path={data}", "model.preset=hit", "data.decoder=pyav"])
    model = make_model(cfg)
    evaluate_model(model, cfg, split="test", out_dir=tmp_path / "idx", export=True, diagnostics=False)
    index = SearchIndex.load(tmp_path / "idx")
    assert index.fingerprint["levels"] == model.levels and len(index.keys) == 24
    assert index.catalog["test00004"] == ("test00004.webm", ["clip 4 caption 0", "clip 4 caption 1"])
    captions = [c for k in index.keys for c in index.catalog[k][1]]
    with torch.no_grad():
        sims = model.similarity(encode_queries(model, captions), index.videos)  # name -> [48, 24]
    exact = search_batch(model, index, captions, k=5, exact=True)
    approx = search_batch(model, index, captions, k=5, candidates=8)
    everything = search_batch(model, index, captions, k=5, candidates=24)
    for i, (a, e, full) in enumerate(zip(approx, exact, everything)):
        assert [h.key for h in full] == [h.key for h in e]
        assert [h.key for h in e] == [index.keys[j] for j in torch.topk(sims["fused"][i], 5).indices.tolist()]
        shortlist = torch.topk(sims["semantic"][i], 8).indices  # the global level's top 8 (exact flat ANN)
        within = shortlist[torch.argsort(sims["fused"][i][shortlist], descending=True)][:5]
        assert [h.key for h in a] == [index.keys[j] for j in within.tolist()]
        for h in a:
            j = index.keys.index(h.key)
            assert h.score == pytest.approx(float(sims["fused"][i, j]), abs=1e-5)
            assert h.levels["feature"] == pytest.approx(float(sims["feature"][i, j]), abs=1e-5)
    # one query alone gives the same hits as in the batch
    assert [h.key for h in search_batch(model, index, captions[3:4], k=5, candidates=8)[0]] == \
        [h.key for h in approx[3]]


def test_search_index_of_a_video_folder_equals_eval_embeddings_and_shows_paths(tmp_path, capsys):
    """`hiervl search index --videos DIR` (no captions) embeds each file as eval embeds the same
    bytes from a shard; `hiervl search` prints paths, `--json` and `--queries` work."""
    import tarfile

    from hiervl.config import load_config
    from hiervl.eval.evaluate import evaluate_model
    from hiervl.eval.search import SearchIndex
    from hiervl.launch.cli import main

    data = write_shards(tmp_path / "shards", 6, "vp9", split="test", per_shard=3)
    cfg = load_config(TINY, SMALL + [f"data.path={data}", "model.preset=hcmi", "data.decoder=pyav"])
    model = make_model(cfg)
    run = save_checkpoint(model, tmp_path / "run")
    evaluate_model(model, cfg, split="test", out_dir=tmp_path / "eval", export=True, diagnostics=False)
    folder = tmp_path / "videos" / "sub"
    folder.mkdir(parents=True)
    for tar in sorted(data.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".webm"):
                    (folder / m.name).write_bytes(t.extractfile(m).read())
    (folder / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "idx"
    assert main(["search", "index", "--checkpoint", str(run), "--videos", str(tmp_path / "videos"),
                 "--out", str(out)]) == 0
    assert "indexed 6 videos (1 skipped, 0 with captions)" in capsys.readouterr().out
    mine, ref = SearchIndex.load(out), SearchIndex.load(tmp_path / "eval")
    assert mine.keys == [f"sub/test{i:05d}" for i in range(6)]
    assert mine.meta["skipped_videos"][0]["key"] == "sub/broken"
    for name in model.levels:
        torch.testing.assert_close(mine.videos[name], ref.videos[name], rtol=1e-4, atol=1e-5)
    assert mine.fingerprint == {**ref.fingerprint, "step": 1}
    (tmp_path / "q.txt").write_text("clip 2 caption 0\n\nclip 5 caption 1\n")
    assert main(["search", "clip 0 caption 0", "--queries", str(tmp_path / "q.txt"), "--index", str(out),
                 "-k", "3", "--json", "--no-sheet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in res] == ["clip 0 caption 0", "clip 2 caption 0", "clip 5 caption 1"]
    for r in res:
        assert [h["rank"] for h in r["hits"]] == [1, 2, 3]
        assert r["hits"][0]["score"] >= r["hits"][1]["score"] >= r["hits"][2]["score"]
        assert all(h["path"] == str((folder / (h["key"][4:] + ".webm")).resolve()) for h in r["hits"])
        assert set(r["hits"][0]["levels"]) == set(model.levels)
    assert main(["search", "clip 1 caption 0", "--index", str(out), "-k", "2", "--candidates", "3"]) == 0  # ANN
    text = capsys.readouterr().out
    assert str(folder.resolve()) in text and "contact sheet:" in text and "2 of 2 videos with frames" in text


def test_a_large_eval_index_keeps_the_ann_index_it_builds(tmp_path, monkeypatch):
    import hiervl.eval.ann as ann
    from hiervl.eval.search import SearchIndex, search, write_index

    monkeypatch.setattr(ann, "EXACT_BELOW", 4)  # "large" = 4 videos or more, so `auto` builds an IVF
    model = flat_model()
    t = encode(model, CAPTIONS)
    write_index(tmp_path, [f"v{i}" for i in range(6)], {"global": t["global"]}, {})
    index = SearchIndex.load(tmp_path)
    assert search(model, index, CAPTIONS[4], k=1, candidates=2)[0].key == "v4"
    assert index.meta["ann"] == {"level": "global", "kind": "ivf", "file": "ann.faiss"}
    again = SearchIndex.load(tmp_path)
    assert again.meta["ann"]["kind"] == "ivf" and again.ann("global").kind == "ivf"
    assert (tmp_path / "ann.faiss").is_file() and again.ann("global").ntotal == 6


def test_manifest_index_keeps_captions_and_refuses_bad_cells(tmp_path):
    """A manifest for `search index` is read by dataprep/sources.py (the one manifest reader), captions optional."""
    from hiervl.errors import UserError
    from hiervl.eval.video_index import list_videos
    from hiervl.launch.search import manifest_entries

    (tmp_path / "a.webm").write_bytes(b"x")
    (tmp_path / "m.csv").write_text('\ufeffkey,video,caption\nk1,a.webm,a red dot\nk2,a.webm,\n'
                                    'k3,a.webm,"[""one"", ""two""]"\n', encoding="utf-8")
    entries = list_videos(entries=manifest_entries(str(tmp_path / "m.csv")))
    assert [(e.key, e.captions) for e in entries] == [("k1", ["a red dot"]), ("k2", []), ("k3", ["one", "two"])]
    assert entries[0].path == str((tmp_path / "a.webm").resolve())
    (tmp_path / "bad.jsonl").write_text('{"video": "a.webm", "caption": 42}\n')
    with pytest.raises(UserError, match=r"row 1, column caption: a number \(42\) is not a caption"):
        manifest_entries(str(tmp_path / "bad.jsonl"))
    (tmp_path / "dup.jsonl").write_text('{"video": "a.webm"}\n{"video": "a.webm"}\n')
    with pytest.raises(UserError, match="two videos have the key 'a'"):
        list_videos(entries=manifest_entries(str(tmp_path / "dup.jsonl")))
    (tmp_path / "clip.jsonl").write_text('{"video": "a.webm", "start": 1.0, "end": 2.0}\n')
    with pytest.raises(UserError, match="start/end"):
        manifest_entries(str(tmp_path / "clip.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no video files"):
        list_videos(videos=tmp_path / "empty")
    with pytest.raises(UserError, match="not a directory"):
        list_videos(videos=tmp_path / "missing")


def test_an_index_from_another_model_is_refused_in_one_line(tmp_path, capsys):
    """Issue 15 item 8: another run of the same preset (other weights) or another preset."""
    from hiervl.config import load_config
    from hiervl.eval.fingerprint import model_fingerprint
    from hiervl.eval.search import write_index
    from hiervl.launch.cli import main

    cfg = load_config(TINY, SMALL + ["model.preset=flat"])
    a = make_model(cfg)
    torch.manual_seed(1)
    from hiervl.model.hierarchical import build_model

    b = build_model(cfg).eval()  # the same preset and config, another run's weights
    c = make_model(load_config(TINY, SMALL + ["model.preset=hit"]))
    run_a, run_b, run_c = (save_checkpoint(m, tmp_path / n) for m, n in ((a, "a"), (b, "b"), (c, "c")))
    t = encode(a, CAPTIONS)
    write_index(tmp_path / "idx", [f"v{i}" for i in range(6)], {"global": t["global"]},
                {"checkpoint": str(run_a), "model": model_fingerprint(a, 1)})
    assert main(["search", CAPTIONS[2], "--index", str(tmp_path / "idx"), "--no-sheet"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[3] == "v2"  # rank, score, global, key: its own checkpoint
    for run, what in ((run_b, "embedded by another model"), (run_c, "has levels")):
        assert main(["search", CAPTIONS[2], "--index", str(tmp_path / "idx"), "--checkpoint", str(run),
                     "--no-sheet"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and what in err[0] and "hiervl search index" in err[0], err
    # the same weights under another config hash (e.g. a newer hiervl's defaults): a warning, not a refusal
    from hiervl.eval.fingerprint import check_fingerprint

    fp = {**model_fingerprint(a, 1), "config_sha": "0" * 16}
    assert "same weights" in check_fingerprint(fp, ["global"], a, str(run_a), "idx")
    assert check_fingerprint(model_fingerprint(a, 1), ["global"], a, str(run_a), "idx") is None
    assert "no model fingerprint" in check_fingerprint(None, ["global"], a, str(run_a), "idx")


def test_eval_refuses_model_overrides_in_one_line(tmp_path, capsys):
    from hiervl.launch.cli import main

    for override in ("model.embed_dim=64", "model.preset=flat"):
        assert main(["eval", "--checkpoint", str(tmp_path / "nope"), override]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and override in err[0] and "from the checkpoint" in err[0], err
    assert main(["search", "a query", "--index", str(tmp_path), "model.preset=hit"]) == 1
    assert "from the checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
@pytest.mark.integration
def test_train_then_eval_above_chance_and_search_finds_a_training_video(tmp_path, capsys):
    """synth -> prep -> a short tiny-config training run -> hiervl eval -> hiervl search."""
    synth = pytest.importorskip("hiervl.dataprep.synth")
    driver = pytest.importorskip("hiervl.dataprep.driver")
    from hiervl.config import load_config
    from hiervl.launch.cli import main

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
    from hiervl.eval.search import SearchIndex, search
    from hiervl.run_dir import load_model_for_inference

    model, _ = load_model_for_inference(run)
    index = SearchIndex.load(out)
    found = [r for r in train[:40] if search(model, index, r["captions"][0], k=1)[0].key == r["key"]]
    assert found, "no training caption finds its own video first"
    # the ANN stage (a shortlist of 10 of the videos) + re-ranking returns brute force's top 1
    from hiervl.eval.search import search_batch

    queries = [r["captions"][0] for r in train[:40]]
    approx = search_batch(model, index, queries, k=1, candidates=10)
    exact = search_batch(model, index, queries, k=1, exact=True)
    assert [h[0].key for h in approx] == [h[0].key for h in exact]
    pick = found[0]
    assert main(["search", pick["captions"][0], "--index", str(out), "-k", "5", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)[0]["hits"][0]
    assert first["key"] == pick["key"] and pick["captions"][0] in first["captions"]
