"""The floor plan, checked on the source: one import name (`hiervl`), and no import of the old
top-level names `pipeline`, `launch` or `dataprep` anywhere (they are other projects on PyPI)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

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


# ------------------------------------------------------------------------------------------ floors
FOLDERS = {"pipeline": "hiervl", "launch": "hiervl.launch", "dataprep": "hiervl.dataprep"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    name = ".".join([FOLDERS[parts[0]], *parts[1:]])
    return name.removesuffix(".__init__")


def project_imports() -> list[tuple[str, int, str]]:
    """(importing module, line, imported hiervl module) for every hiervl import in the installed folders,
    top-level and inside functions; `from hiervl import x` counts as hiervl.x."""
    out = []
    for folder in FOLDERS:
        for p in (ROOT / folder).rglob("*.py"):
            me = module_name(p)
            for node in ast.walk(ast.parse(p.read_text(), str(p))):
                if isinstance(node, ast.Import):
                    out += [(me, node.lineno, a.name) for a in node.names if a.name.startswith("hiervl")]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("hiervl"):
                    if node.module == "hiervl":
                        out += [(me, node.lineno, f"hiervl.{a.name}") for a in node.names]
                    else:
                        out.append((me, node.lineno, node.module))
    return out


def within(module: str, *owners: str) -> bool:
    return any(module == o or module.startswith(o + ".") for o in owners)


# (importer, must not import, why): DESIGN.md's floors; lower never imports higher, siblings never each other
BACK_ARROWS = [
    ("hiervl.train", ("hiervl.eval",), "train/ and eval/ are siblings: the trainer is handed its evaluate function"),
    ("hiervl.eval", ("hiervl.train",), "train/ and eval/ are siblings: eval reads checkpoints through run_dir"),
    ("hiervl.export", ("hiervl.api",), "the API reads exports; preprocessing is data/preprocess.py's"),
    ("hiervl.data", ("hiervl.model", "hiervl.train", "hiervl.eval", "hiervl.api", "hiervl.export", "hiervl.run_dir",
                     "hiervl.export_files",
                     "hiervl.launch", "hiervl.dataprep"), "data/ sits below all but the bottom floor (the tokenizer is passed in)"),
    ("hiervl.model", ("hiervl.data", "hiervl.train", "hiervl.eval", "hiervl.api", "hiervl.export", "hiervl.run_dir",
                      "hiervl.export_files",
                      "hiervl.launch", "hiervl.dataprep"), "model/ sits below all but the bottom floor"),
    ("hiervl.run_dir", ("hiervl.train", "hiervl.eval", "hiervl.api", "hiervl.export", "hiervl.launch"),
     "run_dir is below train/, eval/, export and the API"),
    ("hiervl.export_files", ("hiervl.run_dir", "hiervl.train", "hiervl.eval", "hiervl.api", "hiervl.export",
                             "hiervl.launch", "hiervl.dataprep"),
     "reading an export sits under run_dir (which reads every model), below train/, eval/, export and the API"),
    ("hiervl.eval", ("hiervl.api", "hiervl.export", "hiervl.launch", "hiervl.dataprep"), "eval/ is below the API and launch/"),
    ("hiervl.train", ("hiervl.api", "hiervl.export", "hiervl.launch", "hiervl.dataprep"), "train/ is below the API and launch/"),
]
for bottom in ("hiervl.config", "hiervl.storage", "hiervl.distributed", "hiervl.log", "hiervl.errors", "hiervl.atomic_write",
               "hiervl.faults", "hiervl.presets", "hiervl.redact"):
    BACK_ARROWS.append((bottom, ("hiervl.data", "hiervl.model", "hiervl.run_dir", "hiervl.train", "hiervl.eval",
                                 "hiervl.api", "hiervl.export", "hiervl.launch", "hiervl.dataprep"), "the bottom floor"))


def back_arrows(imports) -> list[str]:
    return [f"{me}:{line} imports {mod}: {why}" for me, line, mod in imports for src, banned, why in BACK_ARROWS
            if within(me, src) and within(mod, *banned)]


def test_no_import_runs_back_up_the_floors():
    bad = back_arrows(project_imports())
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("importer,imported", [
    ("hiervl.train.trainer", "hiervl.eval.evaluate"), ("hiervl.eval.report", "hiervl.train.checkpoint"),
    ("hiervl.export", "hiervl.api"), ("hiervl.data.loader", "hiervl.model.text_model"),
    ("hiervl.run_dir", "hiervl.train.checkpoint"), ("hiervl.eval.search", "hiervl.api"),
    ("hiervl.storage", "hiervl.data.manifest"), ("hiervl.eval.video_index", "hiervl.dataprep.sources"),
])
def test_each_back_arrow_named_in_the_design_is_caught(importer, imported):
    """The check above is not vacuous: each arrow the floors forbid (the ones the code had) is reported."""
    assert back_arrows([(importer, 1, imported)]) != []


def test_the_floor_check_sees_the_real_imports():
    imports = project_imports()
    seen = {(me, mod) for me, _, mod in imports}
    assert ("hiervl.launch.train", "hiervl.eval.evaluate") in seen  # the launcher hands the trainer its eval
    assert ("hiervl.data.loader", "hiervl.data.preprocess") in seen and ("hiervl.eval.report", "hiervl.run_dir") in seen
    assert len(imports) > 150
