"""`hiervl submit`: dry-run rendering per backend, the sbatch script under fake SLURM programs,
preemption (SIGTERM -> ranks signalled -> requeue), and shell-safe quoting of override values."""

import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny.yaml")
PY = sys.executable


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_USAGE_STATS_ENABLED="0")
    env.update(extra)
    return env


def hiervl(*args, env=None, check=True):
    res = subprocess.run([PY, "-m", "hiervl.launch.cli", "submit", *args], cwd=ROOT, env=env or _env(),
                         capture_output=True, text=True, timeout=120)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def _runner(*args):
    return [PY, "-u", "-m", "deepspeed.launcher.runner", *args]


def test_local_dry_run_prints_the_launcher_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    res = hiervl("local", "--config", TINY, "--dry-run", f"train.out_dir={out}", "train.ranks=3",
                 "launch.master_port=29611")
    # CPU ranks: DeepSpeed's per-node launcher directly, as its runner would start it (test_startup.py)
    expected = [PY, "-u", "-m", "hiervl.launch.local_launch", "--world_info=eyJsb2NhbGhvc3QiOiBbMCwgMSwgMl19",
                "--master_addr=127.0.0.1", "--master_port=29611", "--module",
                f"--enable_each_rank_log={out / 'logs' / 'stdout'}", "--log_level=info", "hiervl.launch.train",
                "--config", str(out / "config.yaml")]
    assert shlex.split(res.stdout.strip()) == expected
    assert not out.exists()


def test_local_dry_run_gpus(tmp_path):
    out = tmp_path / "run"
    res = hiervl("local", "--config", TINY, "--gpus-per-node", "4", "--dry-run", f"train.out_dir={out}")
    argv = shlex.split(res.stdout.strip())
    assert argv[argv.index("--num_gpus") + 1] == "4" and "--num_accelerators" not in argv


def test_deepspeed_no_ssh_dry_run_one_launcher_per_node(tmp_path):
    out = tmp_path / "run"
    res = hiervl("deepspeed", "--config", TINY, "--hosts", "nodeA,nodeB,nodeC", "--nodes", "3", "--no-ssh",
                 "--dry-run", f"train.out_dir={out}", "launch.master_port=29612")
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 3
    for rank, line in enumerate(lines):
        assert shlex.split(line) == _runner(
            "--master_port", "29612", "--hostfile", str(out / "hostfile"), "--no_ssh", "--node_rank", str(rank),
            "--master_addr", "nodeA", "--enable_each_rank_log", str(out / "logs" / "stdout"), "--module", "hiervl.launch.train",
            "--config", str(out / "config.yaml"))


def test_deepspeed_pdsh_dry_run_and_node_count_check(tmp_path):
    out = tmp_path / "run"
    res = hiervl("deepspeed", "--config", TINY, "--hosts", "h1,h2", "--master-addr", "10.0.0.1", "--dry-run",
                 f"train.out_dir={out}")
    argv = shlex.split(res.stdout.strip())
    assert argv[argv.index("--launcher") + 1] == "pdsh" and argv[argv.index("--master_addr") + 1] == "10.0.0.1"
    assert "--no_ssh" not in argv
    bad = hiervl("deepspeed", "--config", TINY, "--hosts", "h1,h2", "--nodes", "3", "--dry-run",
                 f"train.out_dir={out}", check=False)
    assert bad.returncode == 1 and "--nodes 3" in bad.stderr


def test_deepspeed_env_file_and_hostfile_are_written(tmp_path):
    from hiervl.launch import deepspeed_launch as ds

    assert ds.hostfile_text(["a", "b"], 4) == "a slots=4\nb slots=4\n"
    text = ds.deepspeed_env_text({"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "UNRELATED": "x"})
    assert text.splitlines() == ["DS_ACCELERATOR=cpu", "HF_HUB_OFFLINE=1"]  # no source tree: nodes import the installed hiervl


def test_slurm_dry_run_script(tmp_path):
    out = tmp_path / "run"
    res = hiervl("slurm", "--config", TINY, "--nodes", "2", "--gpus-per-node", "8", "--dry-run", f"train.out_dir={out}",
                 "launch.partition=gpu", "launch.account=proj1", "launch.time=02:00:00", "launch.cpus_per_task=12",
                 "launch.job_name=my run")
    script = res.stdout
    directives = [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
    for want in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=12", "--time=02:00:00",
                 "--partition=gpu", "--account=proj1", "--job-name='my run'", "--signal=B:SIGTERM@120", "--requeue"):
        assert f"#SBATCH {want}" in directives, want
    assert "slots=8" in script and "export DS_ACCELERATOR=cuda" in script
    script_path = tmp_path / "s.sh"
    script_path.write_text(script)
    subprocess.run(["bash", "-n", str(script_path)], check=True)
    assert not out.exists()


# ---- fake SLURM: sbatch runs the script at once, srun starts the task once per node -----------------

FAKE = {
    "sbatch": """#!/bin/bash
echo "sbatch $*" >> "$FAKE_LOG/calls"
script="${@: -1}"
SLURM_JOB_ID=4242 SLURM_JOB_NODELIST='gpu[01-02]' bash "$script" > "$FAKE_LOG/job.out" 2>&1
echo "4242"
""",
    "scontrol": """#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG/calls"
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu01\\ngpu02\\n'; fi
""",
    "srun": """#!/bin/bash
echo "srun $*" >> "$FAKE_LOG/calls"
nodes=1
while [ "${1#--}" != "$1" ]; do case "$1" in --nodes=*) nodes="${1#--nodes=}";; esac; shift; done
if [ -n "${FAKE_SRUN_SLEEP:-}" ]; then
  # as the real srun: SIGTERM -> "forcing job termination" (SIGKILL to the tasks); SIGUSR1 -> forwarded
  trap 'echo "srun got TERM: forcing job termination" >> "$FAKE_LOG/calls"; kill -9 %1; exit 137' TERM
  trap 'echo "srun got USR1: forwarded to the tasks" >> "$FAKE_LOG/calls"; kill %1; exit 0' USR1
  touch "$FAKE_LOG/srun.started"; sleep 30 & wait; exit 1
fi
for ((i = 0; i < nodes; i++)); do
  SLURM_NODEID=$i SLURMD_NODENAME=gpu0$((i + 1)) "$@" > "$FAKE_LOG/node$i.out" 2>&1 &
done
wait
""",
    "squeue": """#!/bin/bash
echo "squeue $*" >> "$FAKE_LOG/calls"; echo "4242 hiervl RUNNING 1:00 2 gpu[01-02]"
""",
    "scancel": """#!/bin/bash
echo "scancel $*" >> "$FAKE_LOG/calls"
""",
}


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "fakelog"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in FAKE.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log), HIERVL_SUBMIT_ECHO="1")
    return env, log


def test_sbatch_script_starts_one_launcher_per_node(tmp_path, fake_slurm):
    env, log = fake_slurm
    out = tmp_path / "run dir"
    res = hiervl("slurm", "--config", TINY, "--nodes", "2", f"train.out_dir={out}", "launch.master_port=29613",
                 "train.ranks=1", "launch.shared_fs=true", env=env)
    assert "submitted batch job 4242" in res.stdout
    calls = (log / "calls").read_text().splitlines()
    assert calls[0] == f"sbatch --parsable {out / 'submit.sbatch'}"
    assert "scontrol show hostnames gpu[01-02]" in calls
    assert (out / "hostfile-4242").read_text() == "gpu01 slots=1\ngpu02 slots=1\n"
    for rank in (0, 1):
        line = (log / f"node{rank}.out").read_text().strip()
        assert line.startswith(f"node gpu0{rank + 1} rank {rank}: "), line
        argv = shlex.split(line.split(": ", 1)[1])
        assert argv == _runner("--master_port", "29613", "--hostfile", str(out / "hostfile-4242"), "--no_ssh",
                               "--node_rank", str(rank), "--master_addr", "gpu01", "--enable_each_rank_log",
                               str(out / "logs" / "stdout"), "--module", "hiervl.launch.train", "--config", str(out / "config.yaml"))
    assert not any(c.startswith("scontrol requeue") for c in calls)  # finished normally: no requeue


def test_sbatch_script_preempted_signals_and_requeues(tmp_path, fake_slurm):
    env, log = fake_slurm
    out = tmp_path / "run"
    script = tmp_path / "job.sh"
    script.write_text(hiervl("slurm", "--config", TINY, "--nodes", "2", "--dry-run", f"train.out_dir={out}").stdout)
    proc = subprocess.Popen(["bash", str(script)], env=dict(env, FAKE_SRUN_SLEEP="1", SLURM_JOB_ID="77",
                                                            SLURM_JOB_NODELIST="gpu[01-02]"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while not (log / "srun.started").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what --signal=B:SIGTERM@120 does
    output, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, output
    calls = (log / "calls").read_text().splitlines()
    # the ranks must get a signal they checkpoint on: srun forwards SIGUSR1, but turns SIGTERM into SIGKILL
    assert "srun got USR1: forwarded to the tasks" in calls and calls[-1] == "scontrol requeue 77", calls
    assert not any(c.startswith("srun got TERM") for c in calls), calls


def test_launcher_starts_with_sigusr1_ignored_and_the_caller_keeps_its_handler(capfd):
    """SLURM signals every process of a step: DeepSpeed's launchers (no SIGUSR1 handler) must not
    die of the SIGUSR1 meant for the ranks, so they start with it ignored; the caller still forwards."""
    from hiervl.launch.processes import run_forwarding_signals

    before = signal.getsignal(signal.SIGUSR1)
    code = run_forwarding_signals([sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN)"])
    assert code == 0
    assert capfd.readouterr().out.strip() == "True"  # the launcher ignores it
    assert callable(signal.getsignal(signal.SIGUSR1))  # the forwarding handler, not SIG_IGN
    signal.signal(signal.SIGUSR1, before)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_status_and_cancel_call_squeue_and_scancel(fake_slurm):
    env, log = fake_slurm
    assert "RUNNING" in hiervl("status", "4242", env=env).stdout
    hiervl("cancel", "4242", env=env)
    calls = (log / "calls").read_text().splitlines()
    assert calls[0].startswith("squeue -h -j 4242") and calls[1] == "scancel 4242"
    assert hiervl("cancel", "42; rm -rf x", env=env, check=False).returncode == 1


def test_shell_characters_in_values_stay_literal(tmp_path, fake_slurm):
    """Paths and names holding `$(...)`, quotes and spaces are passed literally and run nothing."""
    env, log = fake_slurm
    marker = tmp_path / f"pwned-{os.getpid()}"
    evil = f"$(touch {marker})"
    out = tmp_path / f"out {evil} 'q'"
    res = hiervl("slurm", "--config", TINY, "--nodes", "2", f"train.out_dir={out}", f"launch.job_name=j {evil}",
                 "train.ranks=1", "launch.shared_fs=true", env=env)
    assert "4242" in res.stdout
    assert (out / "hostfile-4242").exists() and (out / "config.yaml").exists()
    assert f"#SBATCH --job-name={shlex.quote('j ' + evil)}" in (out / "submit.sbatch").read_text()
    node0 = shlex.split((log / "node0.out").read_text().split(": ", 1)[1])
    assert node0[-1] == str(out / "config.yaml")
    for backend in (["local"], ["deepspeed", "--hosts", "a,b", "--no-ssh"]):
        res = hiervl(*backend, "--config", TINY, "--dry-run", f"train.out_dir={out}")
        for line in res.stdout.strip().splitlines():
            subprocess.run(["bash", "-c", "printf '%s\\n' " + line.split(" -u ", 1)[1]], check=True,
                           capture_output=True)  # let a shell parse the printed words, as a user would
            assert shlex.split(line)[-1] == str(out / "config.yaml")
    res = hiervl("ray", "--config", TINY, "--input", str(tmp_path / evil / "m.csv"), "--out", str(out), "--dry-run")
    entry = res.stdout.split("entrypoint: ", 1)[1].splitlines()[0]
    words = subprocess.run(["bash", "-c", "printf '%s\\n' " + entry], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert words[words.index("--input") + 1] == str(tmp_path / evil / "m.csv")
    assert words[words.index("--out") + 1] == str(out)
    assert not marker.exists()


def test_deepspeed_hostfile_given_or_missing(tmp_path):
    out = tmp_path / "run"
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nw1 slots=8\nw2 slots=8\n")
    res = hiervl("deepspeed", "--config", TINY, "--hostfile", str(hostfile), "--no-ssh", "--node-rank", "1", "--dry-run",
                 f"train.out_dir={out}")
    argv = shlex.split(res.stdout.strip())
    assert argv[argv.index("--hostfile") + 1] == str(hostfile)
    assert (argv[argv.index("--node_rank") + 1], argv[argv.index("--master_addr") + 1]) == ("1", "w1")
    bad = hiervl("deepspeed", "--config", TINY, "--hostfile", str(tmp_path / "nope"), "--dry-run", check=False)
    assert bad.returncode == 1 and "does not exist" in bad.stderr


# ---- one run folder, one training: submissions and `hiervl train` refuse a busy folder in one line -------


def _one_line(res) -> str:
    lines = [line for line in res.stderr.strip().splitlines() if line]
    assert res.returncode == 1 and len(lines) == 1, res.stdout + res.stderr
    return lines[0]


def test_a_submission_into_the_folder_of_a_queued_or_running_slurm_job_is_refused(tmp_path, fake_slurm):
    """Issue 25: two `hiervl submit slurm` into one train.out_dir both trained there (each checkpoint save
    deleting the other's folder for that step); the second is refused while squeue lists the first."""
    from fixtures import write_shards

    env, log = fake_slurm
    (tmp_path / "bin" / "squeue").write_text('#!/bin/bash\necho "squeue $*" >> "$FAKE_LOG/calls"\n'
                                             'cat "$FAKE_LOG/state" 2>/dev/null\n')
    out = tmp_path / "run"
    args = ["slurm", "--config", TINY, "--nodes", "1", f"train.out_dir={out}", "train.ranks=1"]
    assert "submitted batch job 4242" in hiervl(*args, "train.steps=5", env=env).stdout
    assert (out / ".hiervl-slurm-job").read_text().strip() == "4242"
    first = (out / "config.yaml").read_text()
    for state in ("PENDING", "RUNNING", "REQUEUED"):
        (log / "state").write_text(state + "\n")
        err = _one_line(hiervl(*args, "train.steps=9", env=env, check=False))
        assert f"is being trained by SLURM job 4242 ({state})" in err and "hiervl submit cancel 4242" in err, err
        assert (out / "config.yaml").read_text() == first  # the job's config.yaml is left as it was
    assert "squeue -h -j 4242 -o %T" in (log / "calls").read_text()
    # `hiervl train` and `hiervl submit local` into that folder: the same line
    data = write_shards(tmp_path / "shards", 4, "vp9", split="train", per_shard=4)
    res = subprocess.run([PY, "-m", "hiervl.launch.cli", "train", "--config", TINY, f"data.path={data}",
                          f"train.out_dir={out}", "train.ranks=1", "train.steps=1", "data.batch_size=2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert "is being trained by SLURM job 4242 (REQUEUED)" in _one_line(res)
    assert "SLURM job 4242" in _one_line(hiervl("local", "--config", TINY, f"train.out_dir={out}", env=env,
                                                check=False))
    assert (out / "config.yaml").read_text() == first
    # the job left the queue (or squeue still shows it as completed): the folder is free again
    for state in ("COMPLETED", ""):
        (log / "state").write_text(state)
        assert "submitted batch job 4242" in hiervl(*args, "train.steps=9", env=env).stdout
    assert "steps: 9" in (out / "config.yaml").read_text()


def test_a_submission_into_a_folder_a_live_train_holds_is_refused(tmp_path, fake_slurm):
    from hiervl.dataprep.out_lock import train_lock

    env, log = fake_slurm
    out = tmp_path / "run"
    out.mkdir()
    with train_lock(out):  # this process: alive, on this host (a `hiervl train` running into the folder)
        for action in (["local"], ["deepspeed", "--hosts", "a,b"], ["deepspeed", "--hosts", "a,b", "--no-ssh",
                                                                   "--node-rank", "0"], ["slurm", "--nodes", "1"]):
            err = _one_line(hiervl(*action, "--config", TINY, f"train.out_dir={out}", env=env, check=False))
            assert f"{out} is locked by another `hiervl train` (pid {os.getpid()}" in err, (action, err)
        assert not (out / "config.yaml").exists() and not (log / "calls").exists()  # nothing written, no sbatch
    # released: a dry run never needed it, and a submission takes it and gives it back
    assert "submitted batch job 4242" in hiervl("slurm", "--nodes", "1", "--config", TINY, f"train.out_dir={out}",
                                                "train.ranks=1", env=env).stdout
    assert not (out / ".hiervl-train.lock").exists()
