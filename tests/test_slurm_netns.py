"""Real SLURM across two hosts: munged, slurmctld and one slurmd per network namespace (n1, n2;
tests/netns_slurm.py), `hiervl submit slurm --nodes 2` through the real `sbatch`.

One job, three stops, compared step by step with one process at the same global batch:
1. preempted at step >= 3: the batch shell gets SIGTERM (`scancel --batch --signal=TERM`, what
   `#SBATCH --signal=B:SIGTERM@120` delivers before a time limit); the script passes SIGUSR1 through
   srun, every rank finishes its step and writes its part of one checkpoint, the script requeues the
   job and SLURM starts it again, on both nodes, resuming from that checkpoint;
2. preempted again two steps later, held so it does not start again, then cancelled;
3. resubmitted with `--nodes 1` (world 2 -> 1): the checkpoint is converted and the run resumes at
   the same data position. Every step's keys equal the one-process run's: no key twice, none lost.

Skips with one line where namespaces cannot be made or slurm-wlm/munge are missing (.ci/run installs
them as root). Slow (465-533 s at load 16: 166-182 s the one-process reference, 298-350 s the job): `make test-all`.
"""

import json
import os
import re
import sys
import time
from pathlib import Path

import netns
import netns_slurm
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
COMMON = ["--config", str(ROOT / "configs/tiny.yaml"), "train.log_every=1", "train.log_samples=true",
          f"train.steps={STEPS}", "optimizer.warmup_steps=2", "checkpoint.every_steps=100", "checkpoint.keep=3"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
ENV.pop("GLOO_SOCKET_IFNAME", None), ENV.pop("NCCL_SOCKET_IFNAME", None)
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = netns.available() or netns_slurm.available()
    if why:
        pytest.skip(why)
    with netns.for_test(root=tmp_path_factory.mktemp("slurmns")) as cluster:
        try:
            yield netns_slurm.start_slurm(cluster)
        finally:
            netns_slurm.stop_slurm(cluster)


@pytest.fixture(scope="module")
def reference(prepared_dataset_16, tmp_path_factory):
    """One process, global batch 4, on this machine: step -> (loss, keys)."""
    return _steps(netns.one_process_reference(COMMON, prepared_dataset_16, tmp_path_factory.mktemp("slurm_ref"), ENV))


def _steps(out: Path) -> dict:
    """step -> (loss, keys of the global batch in rank order), from metrics.jsonl and every
    samples/rank*.jsonl (a rank file ends where its rank stopped existing: world 2 -> 1); each step
    appears once in each file that has it."""
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1)), [m["step"] for m in metrics]
    keys = {}
    files = sorted((out / "samples").glob("rank*.jsonl"), key=lambda p: int(re.sub(r"\D", "", p.stem)))
    for path in files:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [row["step"] for row in rows] == list(range(1, len(rows) + 1)), (path.name, [r["step"] for r in rows])
        for row in rows:
            keys.setdefault(row["step"], []).extend(row["keys"])
    return {m["step"]: (m["loss"], keys[m["step"]]) for m in metrics}


def _metric_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _wait(what, ready, slurm, job, timeout=600.0):
    t0 = time.time()
    while not ready():
        state = slurm.job_state(job)
        assert state not in ENDED or ready(), f"job {job} {state} while waiting for {what}\n{slurm.logs()}"
        assert time.time() - t0 < timeout, f"no {what} within {timeout:.0f} s (job {job} {state})\n{slurm.logs()}"
        time.sleep(0.5)


def _submit(slurm, shards, out, nodes: int) -> str:
    res = slurm.run([sys.executable, "-m", "hiervl.launch.cli", "submit", "slurm", *COMMON, "--nodes", str(nodes),
                     f"data.path={shards}", f"train.out_dir={out}", "train.ranks=1", "data.batch_size=4",
                     "train.global_batch=4",  # held over world sizes: 2 nodes x 2 samples, then 1 node x 4
                     "launch.shared_fs=true"],  # /tmp here is one folder both nodes see
                    timeout=120)
    assert res.returncode == 0, res.stdout[-3000:]
    m = re.search(r"submitted batch job (\d+)", res.stdout)
    assert m, res.stdout[-3000:]
    return m.group(1)


def _preempt(slurm, job):
    """What `--signal=B:SIGTERM@120` sends before a time limit: SIGTERM to the batch shell alone."""
    res = slurm.run(["scancel", "--batch", "--signal=TERM", job])
    assert res.returncode == 0, res.stdout


def _stopped_at(out: Path, after: int = 0) -> int:
    """The step of the newest 'stopped by SIGUSR1' line of rank 0's log (0: none yet), of those after
    the first `after` of them."""
    lines = re.findall(r"stopped by SIGUSR1 at step (\d+)", (out / "logs" / "rank0.log").read_text()
                       if (out / "logs" / "rank0.log").is_file() else "")
    return int(lines[-1]) if len(lines) > after else 0


def _resumed(out: Path) -> list[int]:
    text = (out / "logs" / "rank0.log").read_text() if (out / "logs" / "rank0.log").is_file() else ""
    return [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]


def _restarts(slurm, job) -> int:
    res = slurm.run(["scontrol", "-o", "show", "job", job])
    m = re.search(r"Restarts=(\d+)", res.stdout)
    return int(m.group(1)) if m else -1


@pytest.mark.timeout(2400)
def test_sbatch_two_nodes_preempted_requeued_then_one_node_resumes_every_key_once(slurm, prepared_dataset_16,
                                                                                    reference, tmp_path):
    out = tmp_path / "run"
    shards = prepared_dataset_16
    job = _submit(slurm, shards, out, nodes=2)

    # 1. preempted at step >= 3 -> every rank checkpoints, the script requeues, SLURM restarts it
    _wait("step 3", lambda: _metric_steps(out) >= 3, slurm, job)
    _preempt(slurm, job)
    _wait("the preemption checkpoint", lambda: _stopped_at(out) > 0, slurm, job, timeout=300)
    k = _stopped_at(out)
    ckpt = out / "checkpoints" / f"step{k:08d}"
    assert (ckpt / "rank0.pt").is_file() and (ckpt / "rank1.pt").is_file(), sorted(os.listdir(ckpt))
    _wait("the requeued job's resume", lambda: _resumed(out) == [k], slurm, job, timeout=600)
    assert _restarts(slurm, job) == 1
    slurm_out = (out / f"slurm-{job}.out").read_text()
    assert "hiervl: preempted, asking the ranks to checkpoint" in slurm_out and f"requeueing job {job}" in slurm_out
    assert "forcing job termination" not in slurm_out and "Killed" not in slurm_out, slurm_out[-3000:]
    hosts = re.findall(r"rank \d of 2 on host (n\d)", (out / "logs" / "rank0.log").read_text()
                       + (out / "logs" / "rank1.log").read_text())
    assert set(hosts) == {"n1", "n2"}, hosts  # both starts ran on both nodes

    # 2. preempted again two steps on, held (it must not start again on 2 nodes), then cancelled
    _wait(f"step {k + 2}", lambda: _metric_steps(out) >= k + 2, slurm, job)
    assert slurm.run(["scontrol", "hold", job]).returncode == 0
    _preempt(slurm, job)
    _wait("the second preemption checkpoint", lambda: _stopped_at(out, after=1) > 0, slurm, job, timeout=300)
    j = _stopped_at(out, after=1)
    assert j >= k + 2
    _wait("the held requeue", lambda: slurm.job_state(job) == "PENDING", slurm, job, timeout=120)
    assert slurm.run(["scancel", job]).returncode == 0

    # 3. resubmitted on one node: world 2 -> 1, converted, resumed at step j's data position
    job1 = _submit(slurm, shards, out, nodes=1)
    _wait("the one-node job's end", lambda: slurm.job_state(job1) in ENDED, slurm, job1, timeout=900)
    assert slurm.job_state(job1) == "COMPLETED", (out / f"slurm-{job1}.out").read_text()[-4000:]
    rank0 = (out / "logs" / "rank0.log").read_text()
    assert _resumed(out) == [k, j], rank0[-3000:]
    assert "rank 0 of 1 on host" in rank0
    got = _steps(out)
    for step, (loss, keys) in reference.items():
        assert got[step][1] == keys, f"step {step}: keys {got[step][1]} vs one process {keys} (stops at {k}, {j})"
        assert got[step][0] == pytest.approx(loss, rel=1e-4, abs=1e-5), f"step {step}: loss {got[step][0]} vs {loss}"
    seen = [key for _, keys in got.values() for key in keys]
    assert sorted(seen) == sorted(key for _, keys in reference.values() for key in keys)
