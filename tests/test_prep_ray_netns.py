"""Shard prep on a two-node Ray cluster: a real `ray start --head` in network namespace n1 and a real
`ray start --address` worker in n2 (tests/netns.py: each its own address and hostname), then
`hiervl prep --ray-address` from n1. n2's workers hang on the first video they decode (the
`decode-hang` fault, set in n2's environment only), so n2 holds one shard's task; once n1 has
written the 39 others, every process of n2 (raylet, workers) is killed: the job finishes on n1 (Ray retries the lost tasks) or, if it fails, a rerun
completes; either way the shards are byte-identical to a one-node prep of the same input.

The output folder is the machine's (both nodes see it, as a cluster's shared output filesystem or
bucket would be). Marked slow; skips with one line where namespaces cannot be made.
"""

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import netns
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
PORT = 6379
PREP = ["prep.short_side=32", "prep.fps=4.0", "prep.shard_max_samples=2", "prep.num_workers=1"]


TOKEN = secrets.token_hex(32)  # a throwaway cluster token (Ray's token auth), for head, worker and driver


def _env(**extra) -> dict:
    env = dict(os.environ, **extra, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN,
               # a lost node is noticed within seconds, not Ray's default ~30 s
               RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
               RAY_health_check_initial_delay_ms="1000")
    env.pop("RAY_ADDRESS", None)
    return env


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture
def cluster():
    why = netns.available()
    if why:
        pytest.skip(why)
    netns.remove_stale()
    # a short root: Ray's unix sockets live under its --temp-dir (paths over 107 bytes are refused)
    c = netns.Cluster(2, prefix=f"hr{os.getpid() % 100000}", root=tempfile.mkdtemp(prefix="hvr-", dir="/tmp"))
    try:
        with c:
            for node in c.names:  # Ray finds a node's address by its default route
                subprocess.run(["ip", "-n", c.ns(node), "route", "add", "default", "dev", c.ifname[node]], check=True)
            yield c
    finally:
        shutil.rmtree(c.root, ignore_errors=True)


def _ray_start(cluster, node, *args, **env):
    temp = cluster.local / "ray"  # each node's own session folder
    return cluster.popen(node, [RAY, "start", "--block", "--disable-usage-stats", f"--node-ip-address={cluster.addr[node]}",
                                "--num-cpus=1", f"--temp-dir={temp}", *args], env=_env(**env),
                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def _wait_nodes(cluster, n: int, timeout: float = 180) -> None:
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
            "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.time() + timeout
    while time.time() < deadline:
        res = cluster.run("n1", [sys.executable, "-c", code, f"{cluster.addr['n1']}:{PORT}"], timeout=120, env=_env())
        if res.returncode == 0 and res.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise AssertionError(f"the Ray cluster did not reach {n} alive nodes in {timeout:.0f} s")


def _kill_node(cluster, node: str) -> int:
    """SIGKILL every process in `node` (its raylet, workers, object store): the node is gone."""
    pids = subprocess.run(["ip", "netns", "pids", cluster.ns(node)], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
    return len(pids)


@pytest.mark.timeout(1200)
def test_two_node_ray_prep_with_n2_killed_gives_one_node_bytes(cluster, tmp_path):
    from hiervl.dataprep.synth import make_corpus

    # enough shards that n1 is still busy when n2's first worker is up (else the driver hands every task to
    # n1's already-leased worker and n2 runs none)
    manifest = make_corpus(tmp_path / "corpus", 80, seed=5)
    one = tmp_path / "one-node"
    res = subprocess.run([sys.executable, "-m", "hiervl.launch.cli", "prep", "--input", str(manifest), "--out", str(one),
                          *PREP, "prep.distributor=local"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    total = len([n for n in _files(one) if n.endswith(".tar")])
    assert total == 40

    t0 = time.time()
    _ray_start(cluster, "n1", "--head", f"--port={PORT}", "--include-dashboard=false")
    _wait_nodes(cluster, 1)
    # n2's workers hang in the first video they decode (pipeline/faults.py `decode-hang`): n2 holds one task
    # that only a retry elsewhere finishes, so the job cannot end unless Ray reruns n2's lost task on n1
    _ray_start(cluster, "n2", f"--address={cluster.addr['n1']}:{PORT}", HIERVL_FAULT="decode-hang",
               HIERVL_FAULT_MATCH="synth")  # every video of the corpus (videos/synthNNNNNN.webm)
    _wait_nodes(cluster, 2)
    print(f"Ray head on n1 and worker on n2 up in {time.time() - t0:.0f} s")

    out = tmp_path / "two-nodes"
    cmd = [sys.executable, "-m", "hiervl.launch.cli", "prep", "--input", str(manifest), "--out", str(out),
           "--ray-address", f"{cluster.addr['n1']}:{PORT}", *PREP]
    t0 = time.time()
    driver = cluster.popen("n1", cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while time.time() - t0 < 300 and driver.poll() is None:  # n1 wrote all shards but the one stuck on n2
        if out.is_dir() and len(list(out.glob("*.tar"))) >= total - 1:
            break
        time.sleep(0.1)
    assert driver.poll() is None, "prep finished with n2 alive (n2 ran no task):\n" + driver.communicate()[0][-3000:]
    time.sleep(2)
    assert len(list(out.glob("*.tar"))) == total - 1 and driver.poll() is None  # the last one is n2's, hanging
    killed = _kill_node(cluster, "n2")
    print(f"killed {killed} processes in n2 after {time.time() - t0:.0f} s, {len(list(out.glob('*.tar')))} shards")
    text = driver.communicate(timeout=600)[0]
    print(f"prep after the kill: exit {driver.returncode} in {time.time() - t0:.0f} s")
    if driver.returncode != 0:  # the job did not survive the node: a rerun on n1 alone completes it
        rerun = cluster.run("n1", cmd, timeout=600, env=_env(), cwd=ROOT)
        assert rerun.returncode == 0, text[-2000:] + "\nrerun:\n" + rerun.stdout[-3000:]
    assert _files(out) == _files(one)
