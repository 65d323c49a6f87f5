"""What a new user reads (issue 25, items 6 and 9): `hiervl demo --print-config` prints the config the
demo runs and its help says what it trains; a mistyped subcommand gets a suggestion; a wrong
`--index`, a missing `--checkpoint` and a missing eval split are one line before any slow import
(torch, the model); `UserError` is importable from `hiervl`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_demo_print_config_is_what_the_demo_runs(tmp_path, capsys):
    from hiervl.launch.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), "--print-config", "train.steps=7"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    from hiervl.config import Config, load_config, packaged_config

    demo = load_config(packaged_config("demo"))
    assert cfg["train"]["steps"] == 7 and cfg["train"]["ranks"] == demo.train.ranks != Config().train.ranks
    assert cfg["data"]["order"] == "grouped" and cfg["data"]["path"] == str(tmp_path / "d" / "shards")
    assert cfg["train"]["out_dir"] == str(tmp_path / "d" / "train")
    assert cfg["queue"]["objective"] == "symmetric" and cfg["queue"]["enabled"] is False
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "momentum queues" not in text and "no queue" in text


def test_subcommand_typo_gets_a_suggestion(capsys):
    from hiervl.launch.cli import main

    assert main(["serach", "a rabbit", "--index", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'serach' is not a command; did you mean 'search'?" in err[0]


def test_user_error_is_exported():
    import hiervl
    from hiervl.errors import UserError

    assert hiervl.UserError is UserError


CHEAP = """
import sys
from hiervl.launch.cli import main
rc = main(sys.argv[1:])
print("rc", rc, "torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("argv, words", [
    (["search", "a rabbit", "--index", "{tmp}/no_index"], "is not a search index (no index.json)"),
    (["search", "index", "--checkpoint", "{tmp}/no_run", "--videos", "{tmp}", "--out", "{tmp}/i"], "does not exist"),
    (["eval", "--checkpoint", "{tmp}/no_run", "--data", "{data}", "--split", "train"],
     "has no samples of split 'train' (it has: test)"),
])
def test_cheap_checks_come_before_slow_imports(argv, words, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist([{"key": "a", "split": "test"}]), data / "manifest.parquet")
    argv = [a.format(tmp=tmp_path, data=data) for a in argv]
    res = subprocess.run([sys.executable, "-c", CHEAP, *argv], capture_output=True, text=True, timeout=300)
    assert "rc 1 torch imported: False" in res.stdout, res.stdout + res.stderr[-2000:]
    assert words in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_readme_and_scripts_need_no_shared_folder(tmp_path):
    """A plain clone has no ../shared: the README does not send a reader there, and the GPU staging
    script says what it is for in one line instead of `No such file or directory` (rc 127)."""
    assert "../shared" not in (ROOT / "README.md").read_text()
    repo = tmp_path / "clone"
    (repo / "bench").mkdir(parents=True)
    (repo / "bench" / "gpu_prepare.sh").write_bytes((ROOT / "bench" / "gpu_prepare.sh").read_bytes())
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    res = subprocess.run(["bash", "bench/gpu_prepare.sh"], cwd=repo, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "make install" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_the_demo_report_names_its_preset_beside_the_measured_winner():
    from hiervl.launch.demo import preset_note

    hit = preset_note("hit", False)
    assert hit.startswith("## Which preset, as measured") and "This demo trains `hit` with the momentum queue off." in hit
    assert "`flat` is the measured winner" in hit and "`flat` 77.8" in hit
    flat = preset_note("flat", True)  # what a user chose is what it names; no excuse for the winner
    assert "This demo trains `flat` with the momentum queue on." in flat and "measured winner:" not in flat
