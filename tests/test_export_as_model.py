"""Issue 25 item 4: an export directory is a model everywhere a checkpoint is.

`hiervl eval`, `hiervl search --checkpoint`, `hiervl search index --checkpoint` and `hiervl.load`
take an export (`hiervl export RUN --out DIR`) and get the checkpoint's numbers; a search index
made from an export records and needs only the export (the run folder may be gone); training
cannot resume from an export and `hiervl export` does not re-export one (one line each); and every
command says what a model path may be with the same words (run_dir.MODEL_PATHS)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fixtures import write_shards
from test_api import extract_videos
from test_evaluate import SMALL, TINY, make_model
from test_search import save_checkpoint


@pytest.fixture(scope="module")
def run_and_export(tmp_path_factory):
    """A checkpoint (in the files a DeepSpeed run leaves), its export, and a prepared test split."""
    from hiervl.config import load_config
    from hiervl.launch.cli import main

    root = tmp_path_factory.mktemp("export_as_model")
    data = write_shards(root / "shards", 6, "vp9", split="test", per_shard=3)
    cfg = load_config(TINY, SMALL + [f"data.path={data}", "model.preset=hcmi", "data.decoder=pyav"])
    run = save_checkpoint(make_model(cfg), root / "run", step=5)
    assert main(["export", str(run), "--out", str(root / "model")]) == 0  # verified round trip
    videos = root / "videos"
    extract_videos(data, videos)
    return root, run, root / "model", data, videos


def _one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert len(err) == 1, err
    return err[0]


def test_eval_and_search_index_take_an_export_and_give_the_checkpoints_numbers(run_and_export, capsys):
    from hiervl.eval.search import SearchIndex
    from hiervl.launch.cli import main

    root, run, model, data, videos = run_and_export
    common = ["--data", str(data), "--split", "test", "--no-diagnostics"]
    assert main(["eval", "--checkpoint", str(run), *common, "--out", str(root / "eval-ckpt")]) == 0
    assert main(["eval", "--checkpoint", str(model), *common, "--out", str(root / "eval-export")]) == 0
    before = sorted(p.relative_to(model) for p in model.rglob("*"))
    assert main(["eval", "--checkpoint", str(model), *common]) == 0  # no --out: beside the export, never in it
    assert sorted(p.relative_to(model) for p in model.rglob("*")) == before
    assert (root / "model-eval-test" / "eval.json").is_file()
    a, b = (json.loads((root / d / "eval.json").read_text()) for d in ("eval-ckpt", "eval-export"))
    for direction in ("t2v", "v2t"):
        for level in a[direction]:
            for metric in ("R1", "R5", "MdR", "MnR"):
                assert b[direction][level][metric] == pytest.approx(a[direction][level][metric], abs=1e-9)
    assert b["checkpoint"] == str(model.resolve()) and b["checkpoint_step"] == 5  # the step it was exported from
    ia, ib = SearchIndex.load(root / "eval-ckpt"), SearchIndex.load(root / "eval-export")
    assert ia.fingerprint == ib.fingerprint  # one model: the same weights and the same config hash
    for name in ia.videos:
        torch.testing.assert_close(ib.videos[name], ia.videos[name], atol=1e-5, rtol=0)

    for src, out in ((run, "idx-ckpt"), (model, "idx-export")):
        assert main(["search", "index", "--checkpoint", str(src), "--videos", str(videos),
                     "--out", str(root / out)]) == 0
    ic, ie = SearchIndex.load(root / "idx-ckpt"), SearchIndex.load(root / "idx-export")
    assert ie.meta["checkpoint"] == str(model.resolve()) and ic.keys == ie.keys and len(ie.keys) == 6
    for name in ic.videos:
        torch.testing.assert_close(ie.videos[name], ic.videos[name], atol=1e-5, rtol=0)
    capsys.readouterr()

    # the index made by the checkpoint searched with the export: the same model, no refusal, no warning
    query = "clip 3 caption 0"
    assert main(["search", query, "--index", str(root / "idx-ckpt"), "--checkpoint", str(model), "--json",
                 "--no-sheet"]) == 0
    out = capsys.readouterr()
    with_export = json.loads(out.out)
    assert "another" not in out.err and "same weights" not in out.err, out.err
    assert main(["search", query, "--index", str(root / "idx-ckpt"), "--json", "--no-sheet"]) == 0
    with_ckpt = json.loads(capsys.readouterr().out)
    assert [h["key"] for h in with_export[0]["hits"]] == [h["key"] for h in with_ckpt[0]["hits"]]
    for x, y in zip(with_export[0]["hits"], with_ckpt[0]["hits"]):
        assert x["score"] == pytest.approx(y["score"], abs=1e-5)


def test_an_index_of_an_export_needs_only_the_export(run_and_export, tmp_path, capsys):
    from hiervl.launch.cli import main

    root, run, model, data, videos = run_and_export
    moved = tmp_path / "model"
    shutil.copytree(model, moved)
    assert main(["search", "index", "--checkpoint", str(moved), "--videos", str(videos),
                 "--out", str(tmp_path / "idx")]) == 0
    gone = tmp_path / "run-gone"
    shutil.copytree(run, gone)  # the training checkpoint is not needed: make sure nothing reads it
    shutil.rmtree(run)
    try:
        capsys.readouterr()
        assert main(["search", "clip 1 caption 0", "--index", str(tmp_path / "idx"), "-k", "2", "--no-sheet"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 3 and lines[1].split()[0] == "1", lines  # header + 2 hits
    finally:
        shutil.copytree(gone, run)
    # an export's safetensors is as readable as the rest of it (safetensors writes 0600)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (moved / "model.safetensors", moved / "config.yaml")}
    assert modes["model.safetensors"] == modes["config.yaml"], modes


def test_an_export_is_not_a_training_checkpoint_and_the_words_agree(run_and_export, tmp_path, capsys):
    import hiervl
    from hiervl.config import ConfigError
    from hiervl.errors import UserError
    from hiervl.launch.cli import main
    from hiervl.run_dir import MODEL_PATHS
    from hiervl.train.preflight import check_resume

    root, run, model, data, videos = run_and_export
    with pytest.raises(ConfigError, match=r"train.resume=.* is an export \(inference weights"):
        check_resume(str(model))
    assert main(["export", str(model), "--out", str(tmp_path / "again")]) == 1
    err = _one_line_error(capsys)
    assert f"RUN={model} is an export" in err and "--checkpoint" not in err, err
    assert not (tmp_path / "again").exists()
    # a folder with nothing in it: each command names its own argument, and offers an export
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(empty), "--out", str(tmp_path / "x")]) == 1
    err = _one_line_error(capsys)
    assert err.count("RUN=") == 1 and "point RUN at" in err and "--checkpoint" not in err, err
    with pytest.raises(UserError, match="point hiervl.load's path at .*or an export directory") as e:
        hiervl.load(empty)
    assert "--checkpoint" not in str(e.value)
    assert main(["search", "index", "--checkpoint", str(empty), "--videos", str(videos),
                 "--out", str(tmp_path / "i")]) == 1
    err = _one_line_error(capsys)
    assert "point --checkpoint at" in err and "or an export directory" in err, err
    for argv in (["eval", "--help"], ["search", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert " ".join(MODEL_PATHS.split()) in " ".join(capsys.readouterr().out.split()), argv
