"""The floor plan, checked on the source: one import name (`hiervl`), and no import of the old
top-level names `pipeline`, `launch` or `dataprep` anywhere (they are other projects on PyPI)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pipeline", "launch", "dataprep", "tests", "bench")
OLD_NAMES = {"pipeline", "launch", "dataprep"}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in `path`, top-level and inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def test_no_module_imports_the_old_top_level_names():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for folder in SOURCES for p in (ROOT / folder).rglob("*.py")
           for line, mod in imports(p) if mod.split(".")[0] in OLD_NAMES]
    assert not bad, "\n".join(bad)


def test_hiervl_imports_beside_files_named_like_the_folders(tmp_path):
    """A folder holding pipeline.py, launch.py and dataprep.py (common script names) does not shadow
    any part of hiervl; `python -m hiervl.launch.cli --help` works there too."""
    for name in OLD_NAMES:
        (tmp_path / f"{name}.py").write_text("raise SystemExit('the user script was imported')\n")
    code = "import hiervl, hiervl.launch.cli, hiervl.dataprep.synth, hiervl.api; print(hiervl.load.__module__)"
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "hiervl.api", res.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "hiervl.launch.cli", "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "synth" in res.stdout, res.stderr[-2000:]


def test_importing_the_folder_by_its_old_name_is_refused_in_one_line():
    res = subprocess.run([sys.executable, "-c", "import pipeline"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "ImportError: this folder is the package `hiervl`, not `pipeline`" in res.stderr.strip().splitlines()[-1]


def test_packaged_configs_are_found_by_name_from_any_folder(tmp_path):
    from hiervl.config import load_config, packaged_config

    assert packaged_config("tiny").is_file() and packaged_config("configs/demo.yaml").is_file()
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    assert load_config("tiny") == tiny
    res = subprocess.run([sys.executable, "-m", "hiervl.launch.cli", "train", "--config", "configs/tiny.yaml",
                          "--print-config"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and f"steps: {tiny.train.steps}" in res.stdout, res.stderr[-2000:]
