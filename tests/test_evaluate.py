"""hiervl.eval.evaluate on a tiny model and a tiny real dataset (real loader, real decoding):
blocked == one full similarity matrix, captions mapped to their videos, failed/padded slots
dropped, 2 gloo ranks == 1 rank, reports and exported embeddings, and the `hiervl eval` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import SMALL_TEXT, write_shards
from hiervl.model.text_model import load_tokenizer

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
SMALL = ["data.num_frames=4", "data.max_words=12", "data.size=16", "data.short_side=20", "data.num_threads=1",
         "queue.size=10", "model.embed_dim=32", "model.vision.width=32", "model.vision.layers=1",
         "model.vision.heads=2", "model.text.num_layers=2", "model.num_clips=2", "model.num_phrases=3",
         "eval.batch_size=4", "eval.block_size=3", *SMALL_TEXT]  # the small BERT (random weights): tests/fixtures.py
NUM_VIDEOS = 10
PLAIN = ("R1", "R5", "R10", "MdR", "MnR", "queries", "tied_queries")


def make_cfg(data: Path, *extra: str):
    from hiervl.config import load_config

    return load_config(TINY, SMALL + [f"data.path={data}", *extra])


def make_model(cfg):
    from hiervl.model.hierarchical import build_model

    torch.manual_seed(0)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("evaldata") / "shards", NUM_VIDEOS, "vp9", split="test", per_shard=4)


@pytest.fixture(scope="module")
def hit(data):
    cfg = make_cfg(data)
    return cfg, make_model(cfg)


def expected_captions() -> dict:
    return {f"test{i:05d}": [f"clip {i} caption {c}" for c in range(1 + i % 3)] for i in range(NUM_VIDEOS)}


def test_blocked_eval_equals_full_matrix_and_maps_captions(hit, data, tmp_path):
    from hiervl.data.loader import iter_eval
    from hiervl.eval.evaluate import embed_batches, evaluate_model
    from hiervl.eval.metrics import multi_caption_metrics

    cfg, model = hit
    res = evaluate_model(model, cfg, split="test", out_dir=tmp_path, export=True)
    assert res["block_rows"] == 3  # really blocked: 19 captions in 7 blocks
    emb = embed_batches(model, iter_eval(cfg, split="test", tokenizer=load_tokenizer(cfg.model.text.path)))
    want = expected_captions()
    assert sorted(emb.keys) == sorted(want)
    assert len(emb.captions) == res["num_captions"] == sum(len(c) for c in want.values())
    for cap, v in zip(emb.captions, emb.caption_to_video.tolist()):
        assert cap in want[emb.keys[v]]  # every caption points at its own video
    with torch.no_grad():
        full = model.similarity(emb.texts, emb.videos)  # level -> [19, 10], one piece
    for name in model.levels + ["fused"]:
        ref = multi_caption_metrics(full[name].numpy(), emb.caption_to_video.numpy(), block_rows=10_000,
                                    dsl_scale=cfg.eval.dsl_scale)
        for direction in ("t2v", "v2t", "t2v_dsl", "v2t_dsl"):
            assert res[direction][name] == ref[direction], (direction, name)
    assert res["v2t"]["fused"]["queries"] == NUM_VIDEOS


def test_reports_mark_dsl_and_export_round_trips(hit, tmp_path):
    from hiervl.eval.evaluate import evaluate_model
    from hiervl.eval.search import SearchIndex

    cfg, model = hit
    res = evaluate_model(model, cfg, split="test", out_dir=tmp_path, export=True, meta={"checkpoint": "ck"})
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["t2v"]["fused"] == res["t2v"]["fused"] and saved["checkpoint"] == "ck"
    md = (tmp_path / "eval.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| t2v") or line.startswith("| v2t")]
    assert len(rows) == 4 * 3  # {t2v, v2t} x {plain, DSL} x {feature, semantic, fused}
    assert sum("(DSL)" in r for r in rows) == 6
    fused = next(r for r in rows if r.startswith("| t2v | fused"))
    assert f"| {res['t2v']['fused']['R1']:.1f} |" in fused
    index = SearchIndex.load(tmp_path)
    assert sorted(index.keys) == sorted(expected_captions())
    assert index.videos["feature"].shape == (NUM_VIDEOS, 4, 32) and index.videos["semantic"].shape == (NUM_VIDEOS, 32)
    from hiervl.data.loader import iter_eval
    from hiervl.eval.evaluate import embed_batches

    emb = embed_batches(model, iter_eval(cfg, split="test", tokenizer=load_tokenizer(cfg.model.text.path)))
    order = [emb.keys.index(k) for k in index.keys]
    for name in ("feature", "semantic"):
        torch.testing.assert_close(index.videos[name], emb.videos[name][order], rtol=0, atol=0)
    cfg_nodsl = make_cfg(Path(cfg.data.path), "eval.dsl=false")
    res2 = evaluate_model(model, cfg_nodsl, split="test")
    assert "t2v_dsl" not in res2 and res2["t2v"] == res["t2v"]  # DSL never changes the plain rows


def fake_batch(keys, valid, captions, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = [c for caps in captions for c in caps]
    ids = torch.randint(1000, 3000, (len(flat), 12), generator=g)
    return {"video": torch.randn(len(keys), 4, 3, 16, 16, generator=g), "keys": keys,
            "valid": torch.tensor(valid), "captions": captions, "caption_input_ids": ids,
            "caption_attention_mask": torch.ones_like(ids),
            "caption_index": torch.tensor([s for s, caps in enumerate(captions) for _ in caps], dtype=torch.long)}


def test_failed_and_padded_slots_leave_with_their_captions(hit):
    from hiervl.eval.evaluate import embed_batches

    _, model = hit
    batches = [fake_batch(["a", "broken", ""], [True, False, False], [["a0", "a1"], ["b0"], []]),
               fake_batch(["c", "d", ""], [True, True, False], [["c0"], ["d0", "d1", "d2"], []], seed=1)]
    emb = embed_batches(model, batches)
    assert emb.keys == ["a", "c", "d"] and emb.skipped == ["broken"]
    assert emb.captions == ["a0", "a1", "c0", "d0", "d1", "d2"]
    assert emb.caption_to_video.tolist() == [0, 0, 1, 2, 2, 2]
    assert emb.videos["semantic"].shape == (3, 32) and emb.texts["feature_mask"].shape == (6, 12)


def _rank_job(rank, world, data):
    """evaluate_model on one of the session's two gloo ranks (conftest.py `gloo_pair`)."""
    from hiervl.eval.evaluate import evaluate_model

    cfg = make_cfg(Path(data))
    return json.dumps(evaluate_model(make_model(cfg), cfg, split="test"))


@pytest.mark.integration
def test_two_gloo_ranks_equal_one_rank(hit, data, gloo_pair):
    from hiervl.eval.evaluate import evaluate_model

    cfg, model = hit
    single = evaluate_model(model, cfg, split="test")
    r0, r1 = (json.loads(r) for r in gloo_pair.run(_rank_job, str(data)))
    assert r0 == r1  # every rank returns the same result
    assert r0["world_size"] == 2 and r0["num_videos"] == NUM_VIDEOS
    for direction in ("t2v", "v2t", "t2v_dsl", "v2t_dsl"):
        for name, m in single[direction].items():
            got = r0[direction][name]
            for k in PLAIN:  # rank-order gather: same ranks up to float summation order
                assert got[k] == pytest.approx(m[k]), (direction, name, k)
    for name, m in single["order"].items():  # the forward/reversed pairs are gathered in the same order
        assert r0["order"][name] == pytest.approx(m), name


def write_fake_checkpoint(model, cfg, run_dir: Path) -> Path:
    """The files `load_model_for_inference` reads, as the trainer's DeepSpeed save lays them out."""
    from hiervl.config import to_dict

    tag = run_dir / "checkpoints" / "step00000001"
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
    (tag / "meta.json").write_text(json.dumps({"config": to_dict(cfg), "zero_stage": 0, "world_size": 1,
                                               "step": 1, "tag": tag.name}))
    (run_dir / "checkpoints" / "latest").write_text(tag.name)
    return run_dir


def test_eval_and_search_cli_on_a_checkpoint(hit, data, tmp_path, capsys):
    from hiervl.eval.evaluate import evaluate_model
    from hiervl.launch.cli import main

    cfg, model = hit
    run = write_fake_checkpoint(model, cfg, tmp_path / "run")
    out = tmp_path / "index"
    code = main(["eval", "--checkpoint", str(run), "--data", str(data), "--split", "test", "--out", str(out),
                 "eval.block_size=2"])
    printed = capsys.readouterr().out
    assert code == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["block_rows"] == 2 and res["checkpoint"] == str(run.resolve())
    assert res["t2v"] == evaluate_model(model, cfg, split="test")["t2v"]  # same weights, same numbers
    assert f"| t2v | fused | {res['t2v']['fused']['R1']:.1f} |" in printed
    code = main(["search", "clip 4 caption 0", "--index", str(out), "-k", "3", "--sheet", str(tmp_path / "s.png")])
    printed = capsys.readouterr().out
    assert code == 0
    assert len([line for line in printed.splitlines() if line.strip()[:1].isdigit()]) == 3
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert main(["eval", "--checkpoint", str(tmp_path / "nothing"), "--data", str(data)]) == 1  # UserError


@pytest.mark.parametrize("bad", ["eval.dsl_scale=0", "eval.block_mb=0"])
def test_eval_config_refuses_bad_values(bad):
    from hiervl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_config(None, [bad])


def test_block_rows_respect_the_memory_budget():
    from hiervl.config import EvalConfig
    from hiervl.eval.evaluate import block_rows_for

    assert block_rows_for(100_000, 4, EvalConfig(block_size=4096, block_mb=64)) * 100_000 * (4 * 4 + 8) <= 64 * 2**20
    assert block_rows_for(10, 4, EvalConfig(block_size=7, block_mb=64)) == 7
    assert np.isfinite(block_rows_for(10**9, 4, EvalConfig(block_mb=1))) and block_rows_for(10**9, 4, EvalConfig(block_mb=1)) == 1


# ---------------------------------------------------------------------------- diagnostics


def grouped_copy(data: Path, dst: Path) -> Path:
    """The eval fixture with a `group` column: test00000-03 in g0, 04-07 in g1, 08-09 in none."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(data, dst)
    table = pq.read_table(dst / "manifest.parquet")
    groups = [None if int(k[4:]) >= 8 else f"g{int(k[4:]) // 4}" for k in table.column("key").to_pylist()]
    column = pa.array(groups, pa.string())
    at = table.schema.get_field_index("group")  # the manifest schema's (null) group column, replaced
    table = table.set_column(at, "group", column) if at >= 0 else table.append_column("group", column)
    pq.write_table(table, dst / "manifest.parquet")
    return dst


def flipped(batches):
    for b in batches:
        yield {**b, "video": b["video"].flip(1)}  # [B, T, C, H, W]: frames in reverse order


def test_order_pairs_are_own_video_forward_and_reversed(hit):
    from hiervl.data.loader import iter_eval
    from hiervl.eval.evaluate import embed_batches

    cfg, model = hit
    emb = embed_batches(model, iter_eval(cfg, split="test", tokenizer=load_tokenizer(cfg.model.text.path)), reverse=True)
    rev = embed_batches(model, flipped(iter_eval(cfg, split="test", tokenizer=load_tokenizer(cfg.model.text.path))))  # an independent reversed pass
    assert rev.keys == emb.keys and set(emb.order_pairs) == set(model.levels) | {"fused"}
    with torch.no_grad():
        fwd_full = model.similarity(emb.texts, emb.videos)  # level -> [19, 10]
        rev_full = model.similarity(emb.texts, rev.videos)
    own = emb.caption_to_video[:, None]
    for name, pairs in emb.order_pairs.items():
        assert pairs.shape == (19, 2)
        torch.testing.assert_close(pairs[:, 0], fwd_full[name].gather(1, own)[:, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pairs[:, 1], rev_full[name].gather(1, own)[:, 0], rtol=1e-5, atol=1e-6)
    # the temporal encoder sees order: reversing changes the fused scores (else the diagnostic is moot)
    assert not torch.allclose(emb.order_pairs["fused"][:, 0], emb.order_pairs["fused"][:, 1])
    assert embed_batches(model, iter_eval(cfg, split="test", tokenizer=load_tokenizer(cfg.model.text.path))).order_pairs == {}  # off unless asked


def test_eval_cli_reports_order_and_group_diagnostics(hit, data, tmp_path, capsys):
    from hiervl.data.loader import iter_eval
    from hiervl.eval.evaluate import embed_batches
    from hiervl.launch.cli import main

    cfg, model = hit
    grouped = grouped_copy(data, tmp_path / "grouped")
    run = write_fake_checkpoint(model, cfg, tmp_path / "run")
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(run), "--data", str(grouped), "--split", "test", "--out", str(out),
                 "--no-export"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "eval.json").read_text())
    # independent figures from the full similarity matrices
    emb = embed_batches(model, iter_eval(make_cfg(grouped), split="test", tokenizer=load_tokenizer()))
    rev = embed_batches(model, flipped(iter_eval(make_cfg(grouped), split="test", tokenizer=load_tokenizer())))
    with torch.no_grad():
        fwd = model.similarity(emb.texts, emb.videos)["fused"]  # [19, 10]
        back = model.similarity(emb.texts, rev.videos)["fused"]
    c2v = emb.caption_to_video
    f, b = fwd.gather(1, c2v[:, None])[:, 0], back.gather(1, c2v[:, None])[:, 0]
    assert res["order"]["fused"]["order"] == pytest.approx(100 * (f > b).float().mean().item())
    assert res["order"]["fused"]["queries"] == 19
    vgroup = [None if int(k[4:]) >= 8 else int(k[4:]) // 4 for k in emb.keys]
    group_hits, sib_hits, n = 0, 0, 0
    for c in range(len(c2v)):
        g = vgroup[c2v[c]]
        if g is None:
            continue
        n += 1
        row = fwd[c].tolist()
        best_in = max(row[v] for v in range(10) if vgroup[v] == g)
        best_out = max([row[v] for v in range(10) if vgroup[v] != g], default=float("-inf"))
        group_hits += best_in > best_out
        sib_hits += all(row[c2v[c]] > row[v] for v in range(10) if vgroup[v] == g and v != c2v[c])
    groups = res["groups"]
    assert groups["queries"] == n == sum(1 + i % 3 for i in range(8)) and groups["groups"] == 2
    assert groups["levels"]["fused"]["group_R1"] == pytest.approx(100 * group_hits / n)
    assert groups["levels"]["fused"]["sibling_R1"] == pytest.approx(100 * sib_hits / n)
    assert groups["chance"]["sibling_R1"] == pytest.approx(25.0)  # two full groups of four
    assert groups["chance"]["group_R1"] == pytest.approx(40.0)  # 4 of 10 videos
    # the printed table and eval.md carry them, with the chance row
    fused_row = (f"| fused | {res['order']['fused']['order']:.1f} ({res['order']['fused']['ties']}) | "
                 f"{groups['levels']['fused']['group_R1']:.1f} | {groups['levels']['fused']['sibling_R1']:.1f} |")
    assert fused_row in printed and "| *chance* | *50* | *40.0* | *25.0* |" in printed
    md = (out / "eval.md").read_text()
    assert "## Diagnostics" in md and fused_row in md and "2 groups of related videos" in md
    # ungrouped data: order only; --no-diagnostics: neither (and no second encoding)
    assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--split", "test", "--out",
                 str(tmp_path / "plain"), "--no-export"]) == 0
    plain = json.loads((tmp_path / "plain" / "eval.json").read_text())
    assert plain["groups"] is None and plain["order"]["fused"] == res["order"]["fused"]
    assert "need a `group` column" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(run), "--data", str(grouped), "--split", "test", "--out",
                 str(tmp_path / "off"), "--no-export", "--no-diagnostics"]) == 0
    off = json.loads((tmp_path / "off" / "eval.json").read_text())
    assert "order" not in off and off["groups"] is None and off["t2v"] == res["t2v"]
    assert "| level | order" not in capsys.readouterr().out
