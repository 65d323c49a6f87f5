"""bench/gpu_visit.sh, the GPU visit's long command, checked on CPU: the one-line refusal without a GPU,
and its control flow with stub `python3` and `nvidia-smi` (stage order, time boxes, the deadline, and
every log packed into $OUT/visit.tar.gz, which is what comes back from the GPU machine)."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_visit.sh"

STUB = """#!/usr/bin/env bash
# python3 on a GPU machine, as far as the visit script can tell: CUDA checks pass, everything else echoes
case "$1" in
  -c) [[ "$2" == *disk_usage* ]] && echo 8; exit 0 ;;
  -) cat > /dev/null; echo "probe: torch 2.11.0+cu130 gpu NVIDIA H200"; exit 0 ;;
  -m) [[ "$2" == pip ]] && exit 0 ;;
esac
echo "ran: $*"
sleep "${STUB_SLEEP:-0}"
"""


def _env(tmp_path, **extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("python3", STUB), ("nvidia-smi", "#!/bin/sh\necho 'NVIDIA H200, 143771 MiB, 580.159'\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PY=str(bin_dir / "python3"),
               HIERVL_VISIT_SYSTEM_PYTHON="1", OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"),
               SITE=str(tmp_path / "site"))
    env.update(extra)
    return env


def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(tmp_path):
    env = dict(os.environ, PY=sys.executable, HIERVL_VISIT_SYSTEM_PYTHON="1", OUT=str(tmp_path / "out"))
    res = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("gpu-visit: no CUDA GPU") and not (tmp_path / "out").exists()


def test_speed_then_loader_then_tests_then_levers_every_log_packed_into_out(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    log = res.stdout
    assert res.returncode == 0, log + res.stderr
    order = [log.index(f"start {name} ") for name in ("model-ac-off", "feed", "feed-pool", "tests", "model-ac-on")]
    assert order == sorted(order), log
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["visit.log", "visit.tar.gz"]  # <= 8 files back
    with tarfile.open(tmp_path / "out" / "visit.tar.gz") as tar:
        logs = {Path(m.name).name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    assert {"probe.log", "model-ac-off.log", "model-ac-on.log", "feed.log", "feed-pool.log", "tests.log"} <= set(logs)
    assert "--reference train.activation_checkpointing=false" in logs["model-ac-off.log"]
    assert "train.activation_checkpointing=true" in logs["model-ac-on.log"]
    assert "--decoders auto --workers 0 12" in logs["feed.log"] and "model.text.path=" in logs["feed.log"]
    assert "-m pytest -m gpu tests/test_gpu.py tests/test_gpu_feed.py" in logs["tests.log"]
    assert "limit 170s" in log and "limit 330s" in log  # the time boxes, under the deadline


def test_the_deadline_caps_a_stage_and_skips_the_rest_with_a_line(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT), "model", "ac-on", "feed"],
                         env=_env(tmp_path, DEADLINE="36", STUB_SLEEP="3"),
                         capture_output=True, text=True, timeout=120)
    log = res.stdout
    assert res.returncode == 0, log + res.stderr
    assert "start model-ac-off (limit 31s)" in log or "start model-ac-off (limit 30s)" in log, log
    for name in ("model-ac-on", "feed", "feed-pool"):
        assert f"skip {name}:" in log, log
    assert (tmp_path / "out" / "visit.tar.gz").is_file()
