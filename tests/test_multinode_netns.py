"""Training across two distinct hosts: network namespaces n1 and n2 (tests/netns.py), each with its
own address, hostname and an interface named differently (eno1 on n1, ens5 on n2).

- `hiervl submit deepspeed --no-ssh`, one launcher per node: each node's rank finds its own socket
  interface, the per-rank logs name both hosts, and the keys and losses of every step equal a
  single-process run at the same global batch (2 nodes x batch 2 == 1 rank x batch 4).
- `hiervl submit deepspeed` without --no-ssh (DeepSpeed's default): one launcher in n1 reaches both
  nodes over pdsh + ssh (sshd in each node under a throwaway key, tests/netns_ssh.py); the same
  per-host logs and the same keys and losses per step as the single-process run.
- n2's link cut mid-run: both launchers exit non-zero within train.dist_timeout_s, each with one
  line naming the unreachable peer (not a 600-s hang); relaunched on n1 alone (2 local ranks, the
  same world size) the run resumes from the newest checkpoint and every step equals the reference.

Skips with one line where namespaces cannot be made (not root, no iproute2), or, for the pdsh test,
where sshd or pdsh is missing (.ci/run installs them as root).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import netns
import netns_ssh
import pytest
from fixtures import LIGHT_LAUNCH

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
COMMON = ["--config", str(ROOT / "configs/tiny.yaml"), "train.log_every=1", "train.log_samples=true",
          f"train.steps={STEPS}", "optimizer.warmup_steps=2", "checkpoint.every_steps=2", "checkpoint.keep=3",
          *LIGHT_LAUNCH]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
ENV.pop("GLOO_SOCKET_IFNAME", None), ENV.pop("NCCL_SOCKET_IFNAME", None)  # each node must find its own


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with netns.for_test(root=tmp_path_factory.mktemp("netns")) as c:
        yield c


@pytest.fixture
def sshd(cluster):
    """sshd in n1 and n2 under a throwaway key for one test; killed after it, also after a failure."""
    why = netns_ssh.available(pdsh=True)
    if why:
        pytest.skip(why)
    try:
        yield netns_ssh.start_sshd(cluster)
    finally:
        netns_ssh.stop_sshd(cluster)


@pytest.fixture(scope="module")
def shards(prepared_dataset_16):
    return prepared_dataset_16


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """One process, global batch 4, on this machine."""
    return _steps(netns.one_process_reference(COMMON, shards, tmp_path_factory.mktemp("netns_ref"), ENV), ranks=1)


def _steps(out: Path, ranks: int) -> dict:
    """step -> (loss, keys of the global batch in rank order); each step must appear once."""
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1)), [m["step"] for m in metrics]
    keys = {}
    for r in range(ranks):
        rows = [json.loads(line) for line in (out / "samples" / f"rank{r}.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
        for row in rows:
            keys.setdefault(row["step"], []).extend(row["keys"])
    return {m["step"]: (m["loss"], keys[m["step"]]) for m in metrics}


def _assert_same_steps(got: dict, ref: dict) -> None:
    for step, (loss, keys) in ref.items():
        assert got[step][1] == keys, f"step {step}: keys {got[step][1]} vs one process {keys}"
        assert got[step][0] == pytest.approx(loss, rel=1e-4, abs=1e-5), f"step {step}: loss {got[step][0]} vs {loss}"


def _launch(cluster, shards, out, *extra):
    """One `hiervl submit deepspeed --no-ssh --node-rank R` launcher in each node."""
    args = [*COMMON, "--hosts", "n1,n2", "--nodes", "2", "--no-ssh", f"data.path={shards}", f"train.out_dir={out}",
            "train.ranks=1", "data.batch_size=2", *extra]
    if not any(e.startswith("checkpoint.dir=") for e in extra):  # /tmp is one folder for both namespaces here
        args.append("launch.shared_fs=true")
    return [cluster.popen(node, [sys.executable, "-m", "hiervl.launch.cli", "submit", "deepspeed", *args,
                                 "--node-rank", str(r)], env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
            for r, node in enumerate(cluster.names)]


@pytest.mark.timeout(1800)  # its fixtures: the 12-step reference run, then the pair (555 s at load 20 here)
def test_no_ssh_launchers_on_two_hosts_equal_one_process(cluster, shards, reference, tmp_path):
    out = tmp_path / "pair run"  # a space in the run folder: every launcher's argv and file quote it
    procs = _launch(cluster, shards, out)
    outs = netns.wait_all(procs, 900)
    for node, p, text in zip(cluster.names, procs, outs):
        assert text is not None, f"{node} did not finish in 900 s"
        assert p.returncode == 0, f"{node}:\n{text[-4000:]}"
    # each rank ran on its own host, on its node's own interface (not one value for every node)
    _assert_host_lines(out)
    _assert_same_steps(_steps(out, ranks=2), reference)
    # what the launchers wrote: the hostfile, the environment the other nodes' ranks get, DeepSpeed's
    # per-rank stdout/stderr (one from each launcher) and one world of 2 ranks in every checkpoint
    assert (out / "hostfile").read_text() == "n1 slots=1\nn2 slots=1\n"
    sent = (out / ".deepspeed_env").read_text().splitlines()
    assert "DS_ACCELERATOR=cpu" in sent
    assert f"OMP_WAIT_POLICY={ENV.get('OMP_WAIT_POLICY', 'PASSIVE')}" in sent  # CPU ranks never spin-wait
    stdio = sorted(p.name.rsplit("_", 1)[-1] for p in (out / "logs" / "stdout").glob("*.log"))
    assert stdio == ["rank0.log", "rank1.log"], stdio
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((latest / "meta.json").read_text())
    assert (meta["world_size"], meta["step"]) == (2, STEPS), meta
    assert (latest / "rank0.pt").exists() and (latest / "rank1.pt").exists()


def _assert_host_lines(out: Path) -> None:
    """Each rank's log names its own host and that host's interface, once (one line per start)."""
    rank0, rank1 = (out / "logs" / "rank0.log").read_text(), (out / "logs" / "rank1.log").read_text()
    assert rank0.count(" on host ") == 1 and rank1.count(" on host ") == 1, rank0[:2000] + rank1[:2000]
    assert "rank 0 of 2 on host n1 (10.77.0.1, interface eno1); world: 0@n1 1@n2" in rank0, rank0[:2000]
    assert "rank 1 of 2 on host n2 (10.77.0.2, interface ens5)" in rank1, rank1[:2000]


@pytest.mark.slow  # 204 s at load 16 (plus the shared 12-step reference, 198 s)
@pytest.mark.timeout(1800)
def test_pdsh_ssh_launch_on_two_hosts_equals_one_process(cluster, sshd, shards, reference, tmp_path):
    """DeepSpeed's default path: `hiervl submit deepspeed --hosts n1,n2` in n1, no --no-ssh. Rank 1
    runs on n2 only if pdsh reached n2's sshd (the launcher itself runs in n1)."""
    out = tmp_path / "ssh"
    res = cluster.run("n1", [sys.executable, "-m", "hiervl.launch.cli", "submit", "deepspeed", *COMMON,
                             "--hosts", "n1,n2", "--nodes", "2", f"data.path={shards}", f"train.out_dir={out}",
                             "train.ranks=1", "data.batch_size=2", "launch.shared_fs=true"],  # /tmp: one folder here
                      timeout=900, env=ENV, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-4000:]
    assert "pdsh -S -f 1024 -w n1,n2" in res.stdout, res.stdout[-4000:]  # DeepSpeed's runner chose pdsh
    lines = res.stdout.splitlines()
    for node, rank in (("n1", 0), ("n2", 1)):  # pdsh prefixes each node's launcher output with its name
        assert any(ln.startswith(f"{node}: ") and f"node_rank={rank}" in ln for ln in lines), res.stdout[-4000:]
    assert "OMP_NUM_THREADS=1" in (out / ".deepspeed_env").read_text()  # reaches the ranks over ssh
    _assert_host_lines(out)
    _assert_same_steps(_steps(out, ranks=2), reference)


@pytest.mark.timeout(1800)  # three trainings: the cut pair, then n1 alone
def test_cut_link_stops_both_nodes_within_the_timeout_then_n1_alone_resumes_exactly(cluster, shards, reference,
                                                                                      tmp_path):
    out = tmp_path / "cut"
    timeout_s = 20
    procs = _launch(cluster, shards, out, f"train.dist_timeout_s={timeout_s}")
    metrics = out / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < 600 and all(p.poll() is None for p in procs):  # until step 3 is logged
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), "a node stopped before the cut:\n" + "\n".join(
        (p.communicate()[0] or "")[-3000:] for p in procs if p.poll() is not None)
    cluster.cut("n2")
    t_cut = time.time()
    try:
        outs = netns.wait_all(procs, timeout_s + 60)
    finally:
        cluster.heal("n2")
    took = time.time() - t_cut
    for node, p, text, peer in zip(cluster.names, procs, outs, ("rank 1 on n2 (10.77.0.2)", "rank 0 on n1 (10.77.0.1)")):
        assert text is not None, f"{node} still running {took:.0f} s after the cut (train.dist_timeout_s={timeout_s})"
        assert p.returncode != 0, f"{node} exited 0 after the cut:\n{text[-3000:]}"
        errors = [line for line in text.splitlines() if line.startswith("hiervl train: error:")]
        assert len(errors) == 1 and "a collective timed out" in errors[0] and peer in errors[0], text[-4000:]
        assert "Traceback" not in text, text[-4000:]
    assert took < timeout_s + 45, f"both nodes stopped only {took:.0f} s after the cut"

    # n1 alone, 2 local ranks (the same world size): resumes from the newest complete checkpoint
    res = cluster.run("n1", [sys.executable, "-m", "hiervl.launch.cli", "train", *COMMON, f"data.path={shards}",
                             f"train.out_dir={out}", "train.ranks=2", "data.batch_size=2"],
                      timeout=900, env=ENV, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-4000:]
    assert "resumed from" in (out / "logs" / "rank0.log").read_text()
    _assert_same_steps(_steps(out, ranks=2), reference)


def test_a_run_folder_local_to_each_node_is_refused_in_one_line(cluster, shards):
    """train.out_dir on each node's own disk (the same path, a different folder on each: a mount
    namespace per node), declared shared by mistake (launch.shared_fs=true), is refused before any
    step: n2 cannot see what n1 wrote. (Undeclared, it is refused before the ranks start:
    tests/test_shared_checkpoints.py.)"""
    out = cluster.local / "run"  # n1 sees nodes/n1/run there, n2 sees nodes/n2/run
    procs = _launch(cluster, shards, out)
    outs = netns.wait_all(procs, 900)
    assert all(text is not None for text in outs), "a node did not stop"
    assert all(p.returncode != 0 for p in procs), outs[0][-3000:]
    errors = [line for line in outs[0].splitlines() if line.startswith("hiervl train: error:")]
    assert len(errors) == 1 and f"train.out_dir {out} is not shared between the nodes: n2 cannot see" in errors[0], \
        outs[0][-3000:]
    assert "Traceback" not in outs[0] and "Traceback" not in outs[1], outs[1][-3000:]
    assert not (cluster.node_dir("n1") / "run" / "checkpoints").exists()  # refused before any step
