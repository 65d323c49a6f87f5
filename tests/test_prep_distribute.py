"""dataprep's two distributors (dataprep/distribute.py): the local process pool and Ray give the same
bytes; `auto` picks the pool for small jobs; a Ray start that fails is retried once, then reported in
one line naming `prep.distributor=local`; a local task whose worker process dies is run again."""

import os
import sys
from pathlib import Path

import pytest
from hiervl.config import Config, ConfigError, load_config
from hiervl.dataprep import distribute
from hiervl.dataprep.distribute import AUTO_RAY_MIN_SAMPLES, choose
from hiervl.dataprep.driver import prepare, summary_line
from hiervl.dataprep.synth import make_corpus
from hiervl.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _cfg(distributor: str) -> Config:
    cfg = Config()
    cfg.prep.short_side, cfg.prep.fps, cfg.prep.shard_max_samples = 32, 4.0, 2
    cfg.prep.distributor = distributor
    return cfg


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_choose_picks_the_pool_for_small_jobs_and_ray_when_asked_or_big():
    assert choose("auto", 24) == "local"
    assert choose("auto", AUTO_RAY_MIN_SAMPLES - 1) == "local"
    assert choose("auto", AUTO_RAY_MIN_SAMPLES) == "ray"
    assert choose("auto", 24, ray_address="auto") == "ray"  # a cluster was named: use it
    assert choose("ray", 1) == "ray" and choose("local", 10**6) == "local"
    with pytest.raises(UserError, match="prep.distributor='spark'"):
        choose("spark", 1)
    with pytest.raises(UserError, match="--ray-address 10.0.0.1:6379 with prep.distributor=local: drop one"):
        choose("local", 1, ray_address="10.0.0.1:6379")
    with pytest.raises(ConfigError, match="prep.distributor"):
        load_config(ROOT / "configs" / "tiny.yaml", ["prep.distributor=spark"])


def test_local_prep_starts_no_ray_and_gives_the_bytes_ray_gives(tmp_path, ray_cluster):
    """The same corpus through the pool (run in a subprocess, where no Ray runs) and through Ray (the
    session cluster): every file of the two folders is the same bytes."""
    manifest = make_corpus(tmp_path / "corpus", 9, seed=4)
    local = tmp_path / "local"
    code = ("import sys; from hiervl.config import Config; from hiervl.dataprep.driver import prepare\n"
            "cfg = Config(); cfg.prep.short_side, cfg.prep.fps, cfg.prep.shard_max_samples = 32, 4.0, 2\n"
            "s = prepare(cfg, sys.argv[1], sys.argv[2], progress=False)\n"
            "print(s['distributor'], s['shards_run'], 'ray' in sys.modules)\n")
    import subprocess
    r = subprocess.run([sys.executable, "-c", code, str(manifest), str(local)], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["local", "5", "False"]  # auto -> the pool, 5 shards, Ray never imported
    s = prepare(_cfg("ray"), manifest, tmp_path / "ray", progress=False)
    assert s["distributor"] == "ray" and s["shards_run"] == 5 and "after Ray start-up" in summary_line(s)
    assert _files(local) == _files(tmp_path / "ray")
    assert len([n for n in _files(local) if n.endswith(".tar")]) == 5


def test_a_ray_start_that_fails_is_retried_once_then_one_line_naming_the_fix(tmp_path, monkeypatch):
    """Ray's raylet wait (a bare Exception after 30 s under load) is simulated: ray.init raising it
    is the unit under test; nothing else is mocked."""
    import ray
    calls = []

    def failing_init(*args, **kwargs):
        calls.append(kwargs)
        raise Exception("The current node timed out during startup. This could happen because some of the "
                        "raylet failed to startup or the GCS has become overloaded.\nmore detail")

    monkeypatch.setattr(ray, "init", failing_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as on a machine where no Ray runs yet
    monkeypatch.setattr(ray, "shutdown", lambda: None)  # the clean-up after a failed start (a session Ray stays)
    monkeypatch.setattr(distribute.time, "sleep", lambda s: None)
    manifest = make_corpus(tmp_path / "corpus", 2, seed=4)
    with pytest.raises(UserError) as err:
        prepare(_cfg("ray"), manifest, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert len(calls) == 2 and calls[0]["num_cpus"] == 2
    assert "\n" not in msg and "could not start a local Ray cluster twice (Exception: The current node timed out" in msg
    assert msg.endswith("on a busy machine run prep without Ray: prep.distributor=local")


def _crash_once(marker: str, value: int) -> int:
    """Dies (as an OOM kill would) the first time it runs for `marker`, then returns value * 2."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(9)
    return value * 2


def test_local_pool_runs_again_a_task_whose_process_died_and_gives_up_after_the_retries(tmp_path):
    tasks = [(str(tmp_path / f"m{i}"), i) for i in range(4)]
    assert distribute.distribute(tasks, _crash_once, kind="local", workers=2) == [0, 2, 4, 6]
    with pytest.raises(RuntimeError, match=r"task 1 \(\(5,\)\): its worker process died 3 times, last with exit "
                                           r"code 9"):
        distribute.distribute([(4,), (5,)], _always_crash_on_5, kind="local", workers=2)


def _always_crash_on_5(value: int) -> int:
    if value == 5:
        os._exit(9)
    return value


def test_local_pool_raises_the_workers_exception_as_it_is():
    with pytest.raises(ZeroDivisionError) as err:
        distribute.distribute([(1, 0)], divmod, kind="local", workers=1)
    assert "in the worker process" in err.value.__notes__[0]


def _env_and_cwd(name: str) -> tuple:
    return os.environ.get(name), os.getcwd()


def test_local_pool_tasks_see_the_drivers_environment_and_folder_of_now(tmp_path, monkeypatch):
    """The forkserver keeps the environment of the moment it started; credentials set since (a notebook,
    the storage tests) must still reach the tasks, and a relative path must mean the same folder."""
    distribute.distribute([("HIERVL_PROBE",)], _env_and_cwd, kind="local", workers=1)  # the forkserver runs now
    monkeypatch.setenv("HIERVL_PROBE", "set later")
    monkeypatch.chdir(tmp_path)
    assert distribute.distribute([("HIERVL_PROBE",)], _env_and_cwd, kind="local", workers=1) == [
        ("set later", str(tmp_path))]
