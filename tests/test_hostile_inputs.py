"""Files and values from someone else (issue 25, security): a checkpoint, export, search index or
shard carrying a harmless payload (a pickle that would create a file) is loaded without running it
or refused in one line; config values keep their text where YAML 1.1 would turn them into
numbers or booleans; prep never overwrites its own input; export refuses NaN weights; a second
`hiervl train` into one out_dir and a resume of another model's checkpoint are refused before any
rank starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import write_shards
from hiervl.model.text_model import load_tokenizer
from test_evaluate import SMALL, TINY, make_model, write_fake_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this creates `marker` (io.open): the stand-in for any code in a pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hiervl.config import load_config

    root = tmp_path_factory.mktemp("hostile")
    data = write_shards(root / "shards", 6, "vp9", split="test", per_shard=4)
    cfg = load_config(TINY, SMALL + [f"data.path={data}"])
    return cfg, make_model(cfg), data, root


def poisoned_run(tiny, where: Path, file: str = "mp_rank_00_model_states.pt") -> tuple[Path, Path]:
    """A checkpoint run folder whose `file` also holds a Payload; returns (run, marker)."""
    cfg, model, _, _ = tiny
    run = write_fake_checkpoint(model, cfg, where)
    tag = run / "checkpoints" / "step00000001"
    marker = where.parent / f"{where.name}-PAYLOAD-RAN"
    if file == "mp_rank_00_model_states.pt":
        torch.save({"module": model.state_dict(), "extra": Payload(marker)}, tag / file)
    else:
        torch.save({"rng": Payload(marker)}, tag / file)
    return run, marker


def test_malicious_checkpoint_is_refused_by_load_eval_export_and_search(tiny, tmp_path, capsys):
    import hiervl
    from hiervl.errors import UserError
    from hiervl.launch.cli import main

    _, _, data, _ = tiny
    run, marker = poisoned_run(tiny, tmp_path / "run")
    with pytest.raises(UserError, match=r"mp_rank_00_model_states.pt names the Python object io.open"):
        hiervl.load(run)
    assert not marker.exists()
    assert main(["export", str(run), "--out", str(tmp_path / "model")]) == 1
    assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--split", "test",
                 "--out", str(tmp_path / "ev")]) == 1
    err = capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "model").exists()
    lines = [line for line in err.splitlines() if "io.open" in line]
    assert len(lines) == 2 and all(line.startswith(("hiervl export: error:", "hiervl eval: error:")) for line in lines), err


def test_malicious_checkpoint_behind_a_search_index_is_refused(tiny, tmp_path, capsys):
    from hiervl.launch.cli import main

    cfg, model, data, _ = tiny
    good = write_fake_checkpoint(model, cfg, tmp_path / "good")
    index = tmp_path / "index"
    assert main(["eval", "--checkpoint", str(good), "--data", str(data), "--split", "test", "--out", str(index)]) == 0
    bad, marker = poisoned_run(tiny, tmp_path / "bad")
    meta = json.loads((index / "index.json").read_text())
    meta["checkpoint"] = str(bad)  # the index someone hands you names their checkpoint
    (index / "index.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["search", "clip 1 caption 0", "--index", str(index), "--no-sheet"]) == 1
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "io.open" in err and len(err.strip().splitlines()) == 1, err


def test_malicious_rank_state_is_refused_before_resume(tiny, tmp_path):
    from hiervl import safe_load
    from hiervl.config import load_config
    from hiervl.train.preflight import check_training_run

    _, _, data, _ = tiny
    run, marker = poisoned_run(tiny, tmp_path / "run", file="rank0.pt")
    with pytest.raises(safe_load.UnsafeFileError, match=r"rank0.pt names the Python object io.open"):
        safe_load.load(run / "checkpoints" / "step00000001" / "rank0.pt")
    cfg = load_config(TINY, SMALL + [f"data.path={data}", "data.split=test", "data.batch_size=2",
                                     f"train.out_dir={run}"])
    with pytest.raises(safe_load.UnsafeFileError, match="rank0.pt names the Python object io.open"):
        check_training_run(cfg, world_size=1)
    assert not marker.exists()


def test_deepspeed_loads_go_through_the_weights_only_unpickler(tmp_path):
    """DeepSpeed's own `torch.load(..., weights_only=False)` (engine.load_checkpoint) runs nothing inside."""
    from hiervl import safe_load

    marker = tmp_path / "RAN"
    torch.save({"x": Payload(marker)}, tmp_path / "f.pt")
    torch.save({"ok": torch.ones(2)}, tmp_path / "g.pt")
    with safe_load.deepspeed_loads_safely():
        assert torch.equal(torch.load(tmp_path / "g.pt", weights_only=False)["ok"], torch.ones(2))
        with pytest.raises(safe_load.UnsafeFileError):
            torch.load(tmp_path / "f.pt", weights_only=False)
    assert not marker.exists()
    with pytest.raises(safe_load.UnsafeFileError, match="io.open"):
        safe_load.check_files(tmp_path)  # what guards DeepSpeed's universal converter (a subprocess)


def test_malicious_export_is_refused_or_its_payload_never_read(tiny, tmp_path):
    import hiervl
    from hiervl.errors import UserError
    from hiervl.export import write_export

    cfg, model, _, _ = tiny
    out = write_export(model, cfg, tmp_path / "model")
    modes = {p.name: p.stat().st_mode & 0o777 for p in (out / "model.safetensors", out / "config.yaml")}
    assert modes["model.safetensors"] == modes["config.yaml"], modes  # was 0600 beside 0644
    marker = tmp_path / "RAN"
    # a pickled weight file beside the config (transformers would torch.load it): never read
    torch.save({"x": Payload(marker)}, out / "text" / "pytorch_model.bin")
    hiervl.load(out)
    assert not marker.exists()
    # the weights themselves replaced by a pickle: refused in one line
    torch.save({"x": Payload(marker)}, out / "model.safetensors")
    with pytest.raises(UserError, match=r"model.safetensors is not a safetensors file"):
        hiervl.load(out)
    assert not marker.exists()


def test_malicious_shard_member_is_never_unpickled(tiny, tmp_path, capsys):
    """A shard holding a pickle member (webdataset's .pyd/.pickle decoders would run it), and a
    manifest pointing a sample's video at it: verify and the loader read bytes, never unpickle."""
    import io
    import pickle
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from hiervl.config import load_config
    from hiervl.data.loader import iter_eval

    data = write_shards(tmp_path / "shards", 4, "vp9", split="test", per_shard=4)
    marker = tmp_path / "RAN"
    blob = pickle.dumps(Payload(marker))
    shard = data / "test-000000.tar"
    with tarfile.open(shard, "a", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("test00000.pyd", "test00000.pickle"):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with tarfile.open(shard) as tar:
        member = tar.getmember("test00000.pyd")
    rows = pq.read_table(data / "manifest.parquet").to_pylist()
    rows[0].update(video_offset=member.offset_data, video_size=member.size, video_ext="pyd")
    pq.write_table(pa.Table.from_pylist(rows), data / "manifest.parquet")
    cfg = load_config(TINY, SMALL + [f"data.path={data}"])
    batches = list(iter_eval(cfg, split="test", tokenizer=load_tokenizer(cfg.model.text.path)))
    valid = [bool(v) for b in batches for v in b["valid"].tolist()]
    assert valid.count(False) == 1 and valid.count(True) == 3  # the pickle is a skipped, undecodable video
    from hiervl.dataprep.verify import verify

    verify(data, dali=False)
    assert not marker.exists()


@pytest.mark.parametrize("override, key, want", [
    ("launch.time=4:00:00", "time", "4:00:00"),  # YAML 1.1: 14400 (sexagesimal); SLURM would read 10 days
    ("launch.account=012345", "account", "012345"),  # YAML 1.1: 5349 (octal)
    ("launch.job_name=on", "job_name", "on"),  # YAML 1.1: True
    ("launch.job_name=no", "job_name", "no"),
    ("launch.partition=2026-01-01", "partition", "2026-01-01"),  # YAML 1.1: a date
])
def test_config_values_keep_their_text(override, key, want, tmp_path):
    from hiervl.config import load_config

    assert getattr(load_config(TINY, [override]).launch, key) == want
    name, value = override.split("=", 1)
    path = tmp_path / "c.yaml"
    path.write_text(f"defaults: [{TINY}]\nlaunch:\n  {key}: {value}\n")
    assert getattr(load_config(path).launch, key) == want  # the same in a YAML file
    # numbers and booleans still read as such
    cfg = load_config(TINY, ["train.lr=3e-4", "train.steps=12", "train.log_samples=true", "optimizer.eps=1e-8"])
    assert (cfg.train.lr, cfg.train.steps, cfg.train.log_samples, cfg.optimizer.eps) == (3e-4, 12, True, 1e-8)


def test_export_refuses_nan_weights(tiny, tmp_path):
    from hiervl.errors import UserError
    from hiervl.export import write_export

    cfg, model, _, _ = tiny
    broken = make_model(cfg)
    with torch.no_grad():
        next(p for n, p in broken.named_parameters() if n.startswith("video.")).view(-1)[3] = float("nan")
    with pytest.raises(UserError, match=r"weights are not finite \(NaN or inf in 1 tensors"):
        write_export(broken, cfg, tmp_path / "model")
    assert not (tmp_path / "model").exists()
    assert not list(tmp_path.glob(".model.tmp-*"))


def test_prep_never_overwrites_its_own_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from hiervl.config import Config
    from hiervl.dataprep import driver
    from hiervl.errors import UserError

    folder = tmp_path / "mine"
    folder.mkdir()
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist([{"video": "a.mp4", "caption": "a cat"}]), manifest)
    before = manifest.read_bytes()
    with pytest.raises(UserError, match=r"manifest.parquet inside --out .* it would be overwritten"):
        driver.prepare(Config(), str(manifest), str(folder))
    with pytest.raises(UserError, match="it would be overwritten"):
        driver.prepare(Config(), str(folder), str(folder))  # the folder form names the same file
    assert manifest.read_bytes() == before


def test_names_in_someone_elses_files_never_leave_their_folder(tiny, tmp_path):
    """A dataset manifest whose shard column is a path (the loader reads there, and the shard cache
    would write the download there) and an index.json whose file names are paths: refused in one line."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from hiervl.data.loader import DatasetIndex
    from hiervl.errors import UserError
    from hiervl.eval.search import SearchIndex
    from hiervl.launch.cli import main

    cfg, model, data, _ = tiny
    bad = tmp_path / "shards"
    shutil.copytree(data, bad)
    rows = pq.read_table(bad / "manifest.parquet").to_pylist()
    rows[0]["shard"] = "../../home/someone/.bashrc"
    pq.write_table(pa.Table.from_pylist(rows), bad / "manifest.parquet")
    with pytest.raises(UserError, match=r"shard '../../home/someone/.bashrc' is not a plain file name"):
        DatasetIndex(str(bad), "test")
    run = write_fake_checkpoint(model, cfg, tmp_path / "run")
    index = tmp_path / "index"
    assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--split", "test", "--out", str(index)]) == 0
    meta = json.loads((index / "index.json").read_text())
    (index / "index.json").write_text(json.dumps({**meta, "embeddings": "/etc/passwd"}))
    with pytest.raises(UserError, match=r"the embeddings '/etc/passwd' is not a file name in the index folder"):
        SearchIndex.load(index)


def test_yaml_with_python_tags_builds_nothing(tiny, tmp_path):
    import hiervl
    from hiervl.config import ConfigError, load_config
    from hiervl.errors import UserError
    from hiervl.export import write_export

    marker = tmp_path / "RAN"
    tag = f"!!python/object/apply:os.system [\"touch {marker}\"]"
    (tmp_path / "c.yaml").write_text(f"train:\n  out_dir: {tag}\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(tmp_path / "c.yaml")
    assert load_config(None, [f"train.out_dir={tag}"]).train.out_dir == tag  # an override: kept as text
    cfg, model, _, _ = tiny
    out = write_export(model, cfg, tmp_path / "model")
    (out / "config.yaml").write_text((out / "config.yaml").read_text() + f"evil: {tag}\n")
    with pytest.raises(UserError, match=r"config.yaml is not a plain YAML config"):
        hiervl.load(out)
    assert not marker.exists()
