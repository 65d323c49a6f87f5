"""The wheel works without the source tree: `pip wheel` of a copy of the tracked files, installed into a
fresh venv, runs `hiervl --help`, `hiervl demo --print-config` and `hiervl train --config tiny
--print-config` from a folder that holds `pipeline.py`, `launch.py` and `dataprep.py`.

No network: the wheel is built with `--no-deps --no-build-isolation` (this interpreter's setuptools),
and the fresh venv sees the installed dependencies through a `.pth` file naming this interpreter's
site-packages folders (a folder named in a `.pth` file joins sys.path, but its own `.pth` files, such
as the editable install's finder, are not run), so `hiervl` itself can only come from the wheel.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """(venv folder, wheel path, a working folder outside the source tree with look-alike script names)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the wheel is built from its tracked files)")
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():  # a file deleted in the working tree but still tracked is skipped
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(root / "dist"), str(src)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    (whl,) = (root / "dist").glob("hiervl-*.whl")

    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
    deps += [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir() and p not in deps]
    (Path(purelib) / "zz_deps.pth").write_text("\n".join(deps) + "\n")
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                          "--ignore-installed", "--no-index", str(whl)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    work = root / "work"
    work.mkdir()
    for name in ("pipeline", "launch", "dataprep"):
        (work / f"{name}.py").write_text("raise SystemExit('the user script was imported')\n")
    return env_dir, whl, work


def _run(wheel_venv, *args: str) -> subprocess.CompletedProcess:
    env_dir, _, work = wheel_venv
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_has_one_top_level_name_and_every_config(wheel_venv):
    _, whl, _ = wheel_venv
    names = zipfile.ZipFile(whl).namelist()
    (top,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(whl).read(top).decode().split() == ["hiervl"]
    shipped = {n.removeprefix("hiervl/configs/") for n in names if n.startswith("hiervl/configs/") and n.endswith(".yaml")}
    tracked = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")}
    assert tracked and tracked <= shipped, sorted(tracked - shipped)
    assert not any(n.split("/")[0] in ("pipeline", "launch", "dataprep", "configs", "tests") for n in names)


def test_the_installed_command_runs_outside_the_source_tree(wheel_venv):
    env_dir = wheel_venv[0]
    res = _run(wheel_venv, str(env_dir / "bin" / "python"), "-c", "import hiervl, hiervl.launch.cli; print(hiervl.__file__)")
    assert res.returncode == 0, res.stderr[-3000:]
    where = Path(res.stdout.strip())
    assert where.is_relative_to(env_dir) and not where.is_relative_to(ROOT), where  # the wheel's copy, not the tree's

    res = _run(wheel_venv, "hiervl", "--help")
    assert res.returncode == 0 and "demo" in res.stdout and "train" in res.stdout, res.stderr[-3000:]

    res = _run(wheel_venv, "hiervl", "demo", "--print-config", "train.steps=7")
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = yaml.safe_load(res.stdout)  # demo.yaml over tiny.yaml, both read from the wheel
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())  # the tree's: what the wheel must ship
    assert cfg["train"]["steps"] == 7 and cfg["data"]["order"] == "grouped" == demo["data"]["order"]
    assert cfg["model"]["preset"] == demo["model"]["preset"]

    res = _run(wheel_venv, "hiervl", "train", "--config", "tiny", "--print-config")
    assert res.returncode == 0, res.stderr[-3000:]
    assert yaml.safe_load(res.stdout)["data"]["size"] == yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["data"]["size"]
