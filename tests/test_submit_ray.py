"""`hiervl submit ray`: a real local Ray head (127.0.0.1) receives a shard-prep job that succeeds and
whose shards verify; a failing job's status becomes the exit code.

The head runs as `ray start --head --block` in its own session so teardown stops exactly this
cluster (a plain `ray stop` would also stop other Ray clusters running on the machine)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RAY = str(Path(PY).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    env.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local head: no token auth
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def ray_head():
    port, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")
    cmd = [RAY, "start", "--head", "--block", "--port", str(port), "--num-cpus=2", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--dashboard-port", str(dash), "--disable-usage-stats",
           "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
           "--object-store-memory", str(150 * 1024 * 1024), "--temp-dir", temp_dir]
    log = open(Path(temp_dir) / "head.log", "w")
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    saved_auth = os.environ.get("RAY_AUTH_MODE")
    try:
        from ray.job_submission import JobSubmissionClient

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # this process's client, like the head
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert time.monotonic() < deadline, "Ray head did not come up in 90 s"
                time.sleep(1)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its cluster on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of this cluster still left in its session
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if saved_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)


def _submit(*args):
    return subprocess.run([PY, "-m", "hiervl.launch.cli", "submit", "ray", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)


def test_ray_prep_job_succeeds_and_shards_verify(tmp_path, ray_head):
    from hiervl.dataprep.synth import make_corpus

    manifest = make_corpus(tmp_path / "corpus dir", 12)
    out = tmp_path / "shards $(x)"
    res = _submit("--config", str(ROOT / "configs/tiny.yaml"), "--address", ray_head, "--python", PY,
                  "--input", str(manifest), "--out", str(out), "prep.num_workers=2", "prep.shard_max_samples=4",
                  "prep.short_side=32")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "SUCCEEDED" in res.stdout
    import pyarrow.parquet as pq

    assert pq.read_table(out / "manifest.parquet").num_rows == 12
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert len(tars) >= 3, tars  # 12 samples, at most 4 per shard
    verify = subprocess.run([PY, "-m", "hiervl.launch.cli", "prep", "--verify", str(out), "--no-dali"], cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and "verify ok" in verify.stdout, verify.stdout + verify.stderr


def test_ray_failed_job_returns_nonzero(tmp_path, ray_head):
    res = _submit("--config", str(ROOT / "configs/tiny.yaml"), "--address", ray_head, "--python", PY,
                  "--input", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o"))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAILED" in res.stdout
