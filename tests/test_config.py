"""Typed config: loading, overrides, validation messages, exit codes."""

import subprocess
import sys
from pathlib import Path

import pytest
from hiervl.config import Config, ConfigError, from_dict, load_config, to_dict, to_yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.mark.parametrize("name", ["tiny.yaml", "base.yaml"])
def test_tiny_and_base_load_with_every_value_they_set(name):
    """Each value the file sets is the loaded config's (none dropped, renamed or retyped on the way),
    whatever the values are: the test does not restate the YAML."""
    import yaml

    path = ROOT / "configs" / name
    loaded = to_dict(load_config(path))

    def leaves(d, prefix=()):
        for k, v in d.items():
            yield from leaves(v, (*prefix, k)) if isinstance(v, dict) else [((*prefix, k), v)]

    pairs = list(leaves(yaml.safe_load(path.read_text())))
    assert len(pairs) > 10
    for keys, value in pairs:
        got = loaded
        for k in keys:
            got = got[k]
        assert got == value, (".".join(keys), got, value)


def test_presets_include_tiny_and_override_preset():
    cfg = load_config(ROOT / "configs" / "presets" / "hcmi.yaml")
    assert cfg.model.preset == "hcmi"
    assert cfg.data.size == 32  # inherited from tiny.yaml through `defaults`


def test_dotted_overrides_are_typed():
    cfg = load_config(TINY, ["train.lr=1e-3", "model.preset=hcmi", "data.flip=true", "model.vision.layers=3",
                             "model.feature_layer=null", "data.mean=[0.5,0.5,0.5]"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.model.preset == "hcmi" and cfg.data.flip is True and cfg.model.vision.layers == 3
    assert cfg.model.feature_layer is None and cfg.data.mean == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("override, words", [
    ("trian.lr=1", ["'trian'", "'train'"]),
    ("train.lrr=1", ["'train.lrr'", "'train.lr'"]),
    ("queue.size=-5", ["queue.size", ">= 1"]),
    ("train.zero_stage=4", ["train.zero_stage", "0, 1, 2, 3"]),
    ("data.num_frames=0", ["data.num_frames", ">= 1"]),
    ("train.steps=ten", ["train.steps", "integer"]),
    ("model.preset=vit", ["model.preset", "hit", "hcmi", "hanet", "flat"]),
    ("data.flip=maybe", ["data.flip", "true or false"]),
    ("queue.momentum=1.5", ["queue.momentum", "[0, 1)"]),
])
def test_invalid_values_name_the_key_and_what_is_allowed(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    for word in words:
        assert word in str(err.value)


def test_missing_config_file_and_malformed_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(TINY, ["train.lr"])


def test_roundtrip_through_dict_and_yaml():
    cfg = load_config(TINY, ["train.lr=0.002"])
    again = from_dict(to_dict(cfg))
    assert again == cfg
    assert "lr: 0.002" in to_yaml(cfg)
    assert isinstance(Config(), Config)


def _hiervl(*args):
    return subprocess.run([sys.executable, "-m", "hiervl.launch.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_print_config_applies_override():
    res = _hiervl("train", "--config", str(TINY), "--print-config", "train.lr=0.001")
    assert res.returncode == 0, res.stderr
    assert "  lr: 0.001\n" in res.stdout


def test_cli_config_error_exits_2_with_one_line():
    res = _hiervl("train", "--config", str(TINY), "trian.lr=1")
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "trian" in lines[0] and "'train'" in lines[0]
    assert "Traceback" not in res.stderr


def test_cli_help_lists_only_existing_subcommands():
    from hiervl.launch.cli import available_subcommands

    res = _hiervl("--help")
    assert res.returncode == 0
    for name in available_subcommands():
        assert name in res.stdout
    assert "train" in available_subcommands()


@pytest.mark.parametrize("overrides, message", [
    (["data.num_frames=100"], "data.num_frames=100 exceeds model.max_frames=64"),
    (["data.size=33", "data.short_side=40"], "data.size=33 is not a multiple of model.vision.patch_size"),
    (["model.feature_layer=9"], "model.feature_layer=9 but the temporal transformer has"),
    (["model.level_weights={frame_word: 1.0}"], "model.level_weights names \\['frame_word'\\] but preset 'hit'"),
    (["model.vision.space_time=factorised", "model.vision.space_time_layers=9"], "space_time_layers=9 but the frame"),
])
def test_cross_section_checks_run_at_load(overrides, message):
    """Checks that span sections refuse the config at load, before any rank or model exists."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.preset=hit", *overrides])


def test_every_preset_file_is_the_tiny_config_with_its_preset():
    root = Path(__file__).resolve().parents[1] / "configs"
    from hiervl.presets import PRESETS

    for name in PRESETS:
        cfg = load_config(root / "presets" / f"{name}.yaml")
        assert cfg.model.preset == name and cfg.data == load_config(root / "tiny.yaml").data


def test_decode_workers_is_auto_by_default_or_a_count():
    assert load_config(TINY).data.decode_workers == "auto"
    assert load_config(TINY, ["data.decode_workers=2"]).data.decode_workers == 2  # a number, not "2"
    assert load_config(TINY, ["data.decode_workers=auto"]).data.decode_workers == "auto"
    with pytest.raises(ConfigError, match="data.decode_workers='many' must be auto or an integer >= 0"):
        load_config(TINY, ["data.decode_workers=many"])
    with pytest.raises(ConfigError, match="must be auto or an integer >= 0"):
        load_config(TINY, ["data.decode_workers=-1"])
