"""Shared by the benchmark scripts that drive the real `hiervl` command (ablation.py, train.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hiervl.launch.processes import child_env  # noqa: E402


def run_hiervl(argv: list[str], quiet: bool = False) -> float:
    """Run `hiervl ARGV` offline from the repository root, as a user would; return its wall seconds.

    `quiet` drops its stdout (the progress bar and warnings on stderr still show)."""
    env = child_env()
    print(f"+ hiervl {' '.join(argv)}", flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "hiervl.launch.cli", *argv], env=env, check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL if quiet else None)
    return time.time() - t0


def write_results(name: str, args, rows: list[dict]) -> Path:
    """bench/out/<name>.json: the arguments of the run and its rows."""
    path = ROOT / "bench" / "out" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return path
