"""The run folder's one owner (hiervl.run_dir): every reader of "which checkpoint does this path name"
gets the same answer from `resolve_checkpoint`, and a file:// URL means a local path everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hiervl import run_dir
from hiervl.config import ConfigError
from hiervl.errors import UserError


def fake_run(root: Path, steps=(3, 6)) -> Path:
    """A run folder with complete checkpoints of `steps` (meta.json + one file in its manifest), `latest` the last."""
    ckpts = run_dir.checkpoint_dir(root)
    for step in steps:
        tag_dir = ckpts / run_dir.tag_for(step)
        tag_dir.mkdir(parents=True)
        (tag_dir / "rank0.pt").write_bytes(b"x" * step)
        meta = {"step": step, "world_size": 1, "zero_stage": 0, "files": run_dir.file_manifest(tag_dir)}
        (tag_dir / run_dir.META).write_text(json.dumps(meta))
    (ckpts / run_dir.LATEST).write_text(run_dir.tag_for(steps[-1]))
    return root


def test_every_reader_resolves_a_path_to_the_same_checkpoint(tmp_path):
    from hiervl.launch.export import checkpoint_source
    from hiervl.train.checkpoint import plan_resume
    from hiervl.train.preflight import check_resume

    run = fake_run(tmp_path / "run")
    ckpts = run / run_dir.CHECKPOINTS
    for path, tag in ((run, "step00000006"), (ckpts, "step00000006"), (ckpts / "step00000003", "step00000003")):
        assert run_dir.resolve_checkpoint(path) == (ckpts, tag)
        assert run_dir.checkpoint_step(path) == int(tag[4:])
        assert checkpoint_source(path)["tag"] == tag and checkpoint_source(path)["step"] == int(tag[4:])
        assert plan_resume(str(path), "unused", world_size=1, zero_stage=0)["tag"] == tag
        check_resume(str(path))  # no error

    (ckpts / "step00000006" / "rank0.pt").write_bytes(b"y")  # damaged: the newest intact one is taken
    assert run_dir.resolve_checkpoint(run) == (ckpts, "step00000003")
    assert plan_resume(str(run), "unused", world_size=1, zero_stage=0)["tag"] == "step00000003"
    with pytest.raises(UserError, match="--checkpoint=.*step00000006: that checkpoint is damaged .*rank0.pt has 1 bytes"):
        run_dir.resolve_checkpoint(ckpts / "step00000006")


def test_no_checkpoint_is_one_line_naming_the_setting(tmp_path):
    from hiervl.train.preflight import check_resume

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"--checkpoint=.*empty: no complete checkpoint there"):
        run_dir.resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"train.resume=.*empty: no complete checkpoint there"):
        check_resume(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no such checkpoint directory"):
        run_dir.resolve_checkpoint(tmp_path / "missing")
    assert run_dir.checkpoint_step(tmp_path / "missing") is None


def test_a_file_url_is_a_local_path_everywhere(tmp_path):
    from hiervl.dataprep.dataset_inputs import input_identity
    from hiervl.storage import as_local_path, is_remote

    local = tmp_path / "m.csv"
    local.write_text("video,caption\n")
    url = f"file://{local}"
    assert not is_remote(url) and as_local_path(url) == str(local)
    assert all(is_remote(u) for u in ("s3://b/k", "gs://b/k", "http://h/k", "https://h/k"))
    assert run_dir.absolute(url) == str(local)  # recorded in a run as the local path
    assert run_dir.absolute("s3://bucket/data") == "s3://bucket/data"
    assert run_dir.find_recorded(url, tmp_path) == str(local)
    assert input_identity(url, None, {})["input"] == str(local) == input_identity(str(local), None, {})["input"]
