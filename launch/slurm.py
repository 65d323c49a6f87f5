"""SLURM: an sbatch script rendered from the config, submitted with `sbatch`; status and cancel.

The script runs one DeepSpeed launcher per node (`srun --ntasks-per-node=1`, each a
`python -m hiervl.launch.deepspeed_launch node` task taking its node rank from SLURM_NODEID), writes the
hostfile from `scontrol show hostnames`, and takes the first node as the master. Preemption:
`#SBATCH --signal=B:SIGTERM@120` signals the batch shell, whose trap sends SIGUSR1 to srun
(srun forwards it to every process of the step: the ranks finish the step, checkpoint and exit 0;
a SIGTERM srun would turn into SIGKILL, "forcing job termination") and then requeues the job with
`scontrol requeue`; the requeued job resumes by itself
because the ranks run with train.resume=auto. Every value from the config is `shlex.quote`d.

One run folder, one training: `hiervl submit slurm` records the job id in the run folder
(run_dir.SLURM_JOB); while squeue lists that job (pending, running, requeued...), another
`hiervl submit` or `hiervl train` into the folder is refused in one line (`refuse_active_job`).

Owns: the sbatch script, `sbatch`, `squeue` and `scancel`, the run folder's job record.
Must not touch: the launcher commands (launch/deepspeed_launch.py).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from hiervl.errors import UserError
from hiervl.launch.deepspeed_launch import deepspeed_env_text, rank_log_dir
from hiervl.log import get_logger
from hiervl.run_dir import SLURM_JOB

log = get_logger(__name__)
ENDED = {"", "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}  # squeue states of a job no longer training

q = shlex.quote


def _sbatch_value(value) -> str:
    """A #SBATCH option value: sbatch reads these lines itself (no shell); refuse line breaks, quote the rest."""
    value = str(value)
    if "\n" in value or "\r" in value:
        raise UserError(f"SLURM option value {value!r} holds a line break; remove it")
    return q(value)


def render_sbatch(cfg, config_path, out_dir, *, python: str = sys.executable) -> str:
    """The sbatch script for training `cfg` on cfg.launch.nodes nodes (text, ends with a newline)."""
    L = cfg.launch
    out = str(out_dir)
    head = [
        "#!/bin/bash",
        f"#SBATCH --job-name={_sbatch_value(L.job_name)}",
        f"#SBATCH --nodes={int(L.nodes)}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={int(L.cpus_per_task)}",
        f"#SBATCH --time={_sbatch_value(L.time)}",
        f"#SBATCH --output={_sbatch_value(out + '/slurm-%j.out')}",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:SIGTERM@120",
        "#SBATCH --requeue",
    ]
    if L.gpus_per_node > 0:
        head.append(f"#SBATCH --gpus-per-node={int(L.gpus_per_node)}")
    if L.partition:
        head.append(f"#SBATCH --partition={_sbatch_value(L.partition)}")
    if L.account:
        head.append(f"#SBATCH --account={_sbatch_value(L.account)}")
    slots = max(1, int(L.gpus_per_node)) if L.gpus_per_node > 0 else max(1, int(cfg.train.ranks))
    env_lines = "".join(f"export {q(line.split('=', 1)[0])}={q(line.split('=', 1)[1])}\n"
                        for line in deepspeed_env_text().splitlines() if "=" in line)
    node_task = [python, "-u", "-m", "hiervl.launch.deepspeed_launch", "node", "--hostfile", "$HOSTFILE",
                 "--master-addr", "$MASTER_ADDR", "--config", str(config_path), "--log-dir", str(rank_log_dir(out))]
    node_line = " ".join('"$HOSTFILE"' if a == "$HOSTFILE" else '"$MASTER_ADDR"' if a == "$MASTER_ADDR" else q(a)
                         for a in node_task)
    body = f"""
set -uo pipefail
OUT_DIR={q(out)}
cd "${{SLURM_SUBMIT_DIR:-.}}"  # relative paths mean what they meant where sbatch ran
{env_lines}export DS_ACCELERATOR={'cuda' if L.gpus_per_node > 0 else 'cpu'}
mkdir -p {q(str(rank_log_dir(out)))}

# Hostfile from the allocation; the first node is the master.
HOSTFILE="$OUT_DIR/hostfile-$SLURM_JOB_ID"
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed 's/$/ slots={slots}/' > "$HOSTFILE"
MASTER_ADDR=$(head -n 1 "$HOSTFILE" | cut -d' ' -f1)
export MASTER_ADDR MASTER_PORT={int(L.master_port)}
echo "hiervl: job $SLURM_JOB_ID on $(wc -l < "$HOSTFILE") nodes, master $MASTER_ADDR"

# Preemption / time limit: SIGTERM reaches this shell 120 s early; pass it to the ranks as SIGUSR1
# (srun forwards USR1 to every process of the step; a SIGTERM would make srun kill the step), they
# checkpoint and exit 0, then requeue so the job resumes from that checkpoint.
PREEMPTED=0
on_term() {{
  PREEMPTED=1
  echo "hiervl: preempted, asking the ranks to checkpoint"
  kill -USR1 "$SRUN_PID" 2>/dev/null
}}
trap on_term TERM USR1

srun --nodes={int(L.nodes)} --ntasks-per-node=1 --kill-on-bad-exit=1 {node_line} &
SRUN_PID=$!
wait "$SRUN_PID"
STATUS=$?
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; STATUS=$?; done
if [ "$PREEMPTED" = 1 ]; then
  echo "hiervl: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$STATUS"
"""
    return "\n".join(head) + "\n" + body


def _run(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError(f"'{cmd[0]}' not found: run this on a SLURM login node (or put SLURM on PATH)") from None
    if res.returncode != 0:
        raise UserError(f"{' '.join(map(q, cmd))} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def submit(script_path) -> str:
    """`sbatch --parsable SCRIPT`; returns the job id."""
    out = _run(["sbatch", "--parsable", str(script_path)]).strip()
    m = re.match(r"(\d+)", out.splitlines()[-1] if out else "")
    if not m:
        raise UserError(f"sbatch printed no job id: {out!r}")
    return m.group(1)


def _job_id(job: str) -> str:
    if not re.fullmatch(r"\d+(_\d+)?(\.\w+)?", job):
        raise UserError(f"job id {job!r} is not a SLURM job id (digits, e.g. 12345)")
    return job


def status(job: str) -> str:
    """squeue's line for the job, or sacct's when it left the queue."""
    job = _job_id(job)
    out = _run(["squeue", "-h", "-j", job, "-o", "%i %j %T %M %D %R"]).strip()
    return out or f"{job}: not in the queue (finished or unknown; see sacct -j {job})"


def cancel(job: str) -> str:
    _run(["scancel", _job_id(job)])
    return f"cancelled {job}"


def record_job(out_dir, job: str) -> None:
    """Note in the run folder that SLURM job `job` trains into it (read by `active_job`)."""
    from hiervl.atomic_write import write_atomic

    write_atomic(Path(out_dir) / SLURM_JOB, f"{job}\n")


def active_job(out_dir) -> tuple[str, str] | None:
    """(job id, squeue state) of the SLURM job recorded in `out_dir` while it is queued or running;
    None when none is recorded or it ended. Without squeue on this machine it cannot tell: a warning."""
    try:
        job = (Path(out_dir) / SLURM_JOB).read_text().strip()
    except OSError:
        return None
    if not re.fullmatch(r"\d+(_\d+)?", job):
        log.warning("%s holds %r, not a SLURM job id; ignoring it", Path(out_dir) / SLURM_JOB, job[:40])
        return None
    try:
        res = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        log.warning("cannot ask SLURM whether job %s (recorded in %s) still trains into it (%s)", job, out_dir,
                    "no squeue here" if isinstance(exc, FileNotFoundError) else "squeue did not answer")
        return None
    states = res.stdout.split() if res.returncode == 0 else []  # an unknown (long gone) job: squeue fails
    state = next((s for s in states if s not in ENDED), None)
    return (job, state) if state else None


def refuse_active_job(out_dir) -> None:
    """One line when the SLURM job recorded in `out_dir` still trains into it (see `active_job`)."""
    found = active_job(out_dir)
    if found:
        job, state = found
        raise UserError(f"{out_dir} is being trained by SLURM job {job} ({state}); wait for it, cancel it "
                        f"(hiervl submit cancel {job}), or set another train.out_dir")
