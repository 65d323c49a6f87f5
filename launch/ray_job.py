"""Ray jobs: shard preparation (or training) submitted to a Ray cluster with `JobSubmissionClient`.

The job's entrypoint is one shell line (Ray runs it with a shell), built with `shlex.quote` for
every word, so paths and values with spaces or `$(...)` stay literal. The runtime environment
ships the installed `hiervl` package itself (a copy of its .py and config files, made at submit
time, as a Ray `py_modules` entry): never a source tree or site-packages; the cluster's Python
must have hiervl's dependencies. The config is passed as the resolved YAML path, which must be readable on the cluster (shared
filesystem), like the input and output folders. Logs stream back; the exit code is the job's
final status (0 only for SUCCEEDED).

Owns: Ray job entrypoints, runtime environment and submission.
Must not touch: what the job runs.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

from hiervl import run_dir
from hiervl.atomic_write import write_atomic
from hiervl.config import to_yaml
from hiervl.errors import UserError
from hiervl.launch.deepspeed_launch import shell_join
from hiervl.launch.processes import OFFLINE_ENV

PACKAGES = ("hiervl", "hiervl.data", "hiervl.model", "hiervl.train", "hiervl.eval", "hiervl.launch",
            "hiervl.dataprep", "hiervl.configs", "hiervl.configs.presets")
SHIPPED = ("*.py", "*.yaml", "*.json")


def package_snapshot(dest: Path | None = None) -> Path:
    """A folder `<dest>/hiervl` holding the installed package's code and configs (from a wheel or an
    editable install alike), for Ray's `py_modules`; returns the `hiervl` folder."""
    root = Path(dest or tempfile.mkdtemp(prefix="hiervl-ray-")) / "hiervl"
    for name in PACKAGES:
        src = Path(next(iter(importlib.util.find_spec(name).submodule_search_locations)))
        target = root.joinpath(*name.split(".")[1:])
        target.mkdir(parents=True, exist_ok=True)
        for pattern in SHIPPED:
            for f in src.glob(pattern):
                shutil.copy2(f, target / f.name)
    return root


def prep_entrypoint(config_path, input, out_dir, python: str = "python") -> str:
    """`python -m hiervl.launch.cli prep ...` joining the job's own Ray cluster (--ray-address auto)."""
    return shell_join([python, "-m", "hiervl.launch.cli", "prep", "--config", str(config_path), "--input", str(input),
                       "--out", str(out_dir), "--ray-address", "auto"])


def train_entrypoint(config_path, python: str = "python") -> str:
    """`python -m hiervl.launch.cli train --config ...` (DeepSpeed's launcher on the job's driver node)."""
    return shell_join([python, "-m", "hiervl.launch.cli", "train", "--config", str(config_path)])


def runtime_env(env_vars: dict | None = None, package_dir: Path | str = "<hiervl package snapshot>") -> dict:
    env = {**dict(OFFLINE_ENV), **(env_vars or {})}
    return {"py_modules": [str(package_dir)], "env_vars": env}


def job_request(entrypoint: str, job_name: str, env_vars: dict | None = None, package_dir=None) -> dict:
    """The keyword arguments given to JobSubmissionClient.submit_job (printed by --dry-run)."""
    env = runtime_env(env_vars) if package_dir is None else runtime_env(env_vars, package_dir)
    return {"entrypoint": entrypoint, "runtime_env": env, "metadata": {"job_name": job_name}}


def submit_and_follow(address: str, request: dict, follow: bool = True, printer=print, timeout_s: float | None = None) -> int:
    """Submit the job, stream its logs, return 0 if it SUCCEEDED (1 otherwise, 0 if not following)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = client.submit_job(**request)
    printer(f"ray job submitted: {job_id} at {address}")
    if not follow:
        return 0

    async def _tail():
        async for lines in client.tail_job_logs(job_id):
            printer(lines, end="")

    try:
        asyncio.run(asyncio.wait_for(_tail(), timeout_s))
    except Exception as exc:  # noqa: BLE001 - log streaming is best effort; the status decides
        printer(f"(log streaming stopped: {exc})")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    final = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    status = client.get_job_status(job_id)
    while status not in final and (deadline is None or time.monotonic() < deadline):
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    printer(f"ray job {job_id}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def submit_cli(args, cfg) -> int:
    """`hiervl submit ray`: prep (--input, --out) or training (--train) as a Ray job."""
    if args.train:
        out = Path(cfg.train.out_dir).resolve()
        config_path = out / run_dir.CONFIG
        entry = train_entrypoint(config_path, args.python)
    else:
        if not args.input or not args.out:
            raise UserError("submit ray needs --input MANIFEST and --out DIR (or --train)")
        out = Path(args.out).resolve()
        config_path = out.parent / f"{out.name}.prep-config.yaml"
        entry = prep_entrypoint(config_path, Path(args.input).resolve(), out, args.python)
    if args.dry_run:
        request = job_request(entry, cfg.launch.job_name)
        print(f"ray job to {args.address}:\n  entrypoint: {entry}\n  runtime_env: {request['runtime_env']}")
        return 0
    write_atomic(config_path, to_yaml(cfg))
    with tempfile.TemporaryDirectory(prefix="hiervl-ray-") as tmp:
        request = job_request(entry, cfg.launch.job_name, package_dir=package_snapshot(Path(tmp)))
        return submit_and_follow(args.address, request, follow=not args.no_follow)
