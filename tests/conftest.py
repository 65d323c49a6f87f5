"""Session-wide fixtures: the prepared datasets several modules share, one 1-rank training run
that two modules check, one Ray cluster, one pair of gloo ranks (tests/gloo_pair.py) for the
modules that compare 2 ranks against 1, and one small random-init BERT config.

Each dataset is built once per session, by `hiervl.dataprep` with the local distributor (no Ray
start), and only when a test asks for it; tests read these folders and never write into them
(copy one first, as test_loader.py does). Ray starts once per session, only for the tests that
check Ray itself. pytest puts this folder on sys.path (rootdir conftest, no __init__.py), so test
modules import the builders as `from fixtures import ...`.

`make test` runs the suite in 3 pytest-xdist worker processes (`-n 3 --dist loadfile`). There:
- each test module runs whole on one worker, so a module-scoped fixture is built once; the modules of
  a group in `ONE_WORKER` (the multi-node ones, the Ray ones, the gloo-pair ones) share one worker;
  the longest modules start first (`LONGEST_FIRST`);
- the datasets and `one_rank_run` are built once for the whole run, by the first worker that asks,
  in a folder every worker reads, behind a file lock (`_once_per_run`); the others wait for it;
- Ray and the gloo pair are processes of their own: one per worker that needs them (one worker, by the groups);
- torch runs one thread per worker (`pytest_configure`).
Alone (`pytest tests/test_x.py`, no `-n`) everything is built in this session's tmp folder, as before.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import prepared_dataset, start_ray
from gloo_pair import GlooPair

ROOT = Path(__file__).resolve().parents[1]


# Under pytest-xdist (`make test`: -n 3 --dist loadfile) a worker runs a module whole: its module-scoped
# fixtures are built once. The modules of a group here also share one worker, one after another:
# netns: each makes network namespaces and runs multi-node daemons and trainings (tests/netns.py);
# ray, gloo: they use the session's Ray cluster / gloo pair, which then starts once, not once per worker.
ONE_WORKER = {"test_multinode_netns.py": "netns", "test_multinode_s3.py": "netns", "test_slurm_netns.py": "netns",
              "test_prep_ray_netns.py": "netns",
              "test_prep_ray.py": "ray", "test_prep_distribute.py": "ray", "test_storage_e2e.py": "ray",
              "test_distributed.py": "gloo", "test_evaluate.py": "gloo", "test_grad_cache.py": "gloo",
              "test_model_distributed.py": "gloo"}
# The longest modules first (wall seconds of a 3-worker run on 2026-12-05, 15-210 s each; a group in
# ONE_WORKER goes where its first module is), so that no worker is left running one of them alone at the
# end. Several mostly wait (a hung decoder's 30 s timeout, gloo ranks, a Ray job, S3 restarts): early,
# the other workers fill those waits. A stale list only costs time.
LONGEST_FIRST = ("test_train.py", "test_checkpoint_s3.py", "test_multinode_netns.py", "test_model.py",
                 "test_model_distributed.py", "test_crash_ledger.py", "test_decode_pool.py", "test_monitoring.py",
                 "test_async_checkpoint.py", "test_launch_ports.py", "test_hostile_train.py", "test_train_elastic.py",
                 "test_checkpoint_integrity.py", "test_storage.py", "test_submit_ray.py", "test_api.py",
                 "test_submit_deepspeed.py", "test_prep_ray.py", "test_train_validation.py")


def pytest_collection_modifyitems(config, items):
    """Under xdist, the LONGEST_FIRST modules first (xdist hands modules out in collection order)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is not None:
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest-xdist is not installed: the suite runs in one process
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:
    class _ModuleScheduling(LoadScopeScheduling):
        """--dist loadfile, with the ONE_WORKER modules as one unit and the collection order kept."""

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return ONE_WORKER.get(Path(path).name, path)

    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") != "loadfile":
            return None
        config.option.loadscopereorder = False  # (xdist would sort modules by their number of tests)
        return _ModuleScheduling(config, log)


def pytest_configure(config):
    """Under xdist, one thread per worker process (unless OMP_NUM_THREADS says otherwise): torch's
    default, a thread per core, has each worker's OpenMP threads spin for the cores the other worker
    and its training subprocesses are using. The variable also reaches the subprocesses the tests
    start (CLI runs; a training rank sets its own thread count)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is not None:
        if not os.environ.get("OMP_NUM_THREADS", "").isdigit():
            os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _once_per_run(tmp_path_factory, name: str, build) -> Path:
    """The folder `name`, filled by `build(folder)` once for this pytest run.

    Under xdist the workers share it: it lives in the run's own temp folder (pytest-N/, the parent
    of every worker's basetemp), and a file lock makes the first worker that asks build it while the
    others wait, then read it; a build that failed leaves no `.done` mark, so the next one retries.
    Alone, it is a fresh folder of this session, as `tmp_path_factory.mktemp` gives."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent / "shared"
    shared.mkdir(exist_ok=True)
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if build raises
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def prepared_dataset_40(tmp_path_factory):
    """40 synthetic VP9 samples (seed 0), 8 per shard: the training runs' data (test_train.py,
    test_monitoring.py, test_checkpoint_integrity.py, test_train_validation.py, test_decode_pool.py)."""
    return _once_per_run(tmp_path_factory, "dataset40", lambda root: prepared_dataset(root, 40)) / "shards"


@pytest.fixture(scope="session")
def prepared_dataset_30(tmp_path_factory):
    """30 synthetic VP9 samples (seed 0): the loader's data (test_loader.py, test_decode_pool.py)."""
    return _once_per_run(tmp_path_factory, "dataset30", lambda root: prepared_dataset(root, 30)) / "shards"


@pytest.fixture(scope="session")
def prepared_dataset_16(tmp_path_factory):
    """16 synthetic VP9 samples (seed 0): the multi-node launch tests (test_submit_deepspeed.py)."""
    return _once_per_run(tmp_path_factory, "dataset16", lambda root: prepared_dataset(root, 16)) / "shards"


@pytest.fixture(scope="session")
def one_rank_run(tmp_path_factory, prepared_dataset_40):
    """One real `hiervl train` (DeepSpeed launcher, 1 CPU rank, hit preset, 7 steps) that serves three
    modules, each checking other things of it (none rewrites it; test_train_validation adds its eval
    of it, eval-test/, and the folders b and c beside a):
    - test_train_validation.py: started from folder A with a relative data.path and train.out_dir
      and a user DeepSpeed JSON without "optimizer"; eval and checkpoint on the same steps (3, 6);
    - test_monitoring.py: log every 2 steps, eval at 3 and 6, the last step 7 off both cadences,
      W&B offline: the figures in metrics.jsonl, TensorBoard and W&B;
    - test_export.py: its newest checkpoint exported, evaluated and embedded through the API.
    Returns {"root", "out" (the run folder), "shards" (absolute), "stdout", "stderr"}."""
    shards = prepared_dataset_40

    def train(root: Path) -> None:
        a = root / "a"
        a.mkdir()
        (a / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 0}, "steps_per_print": 1000}))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   DS_ACCELERATOR="cpu", RAY_USAGE_STATS_ENABLED="0")
        env.pop("WANDB_MODE", None)
        cmd = [sys.executable, "-m", "hiervl.launch.cli", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
               f"data.path={os.path.relpath(shards, a)}", "train.out_dir=runs/r", "train.deepspeed_config=ds.json",
               "train.ranks=1", "model.preset=hit", "model.text.num_layers=1", "data.batch_size=4", "train.steps=7",
               "train.log_every=2", "optimizer.warmup_steps=4", "eval.every_steps=3", "checkpoint.every_steps=3",
               "eval.split=test", "eval.batch_size=8", "train.wandb=hiervl-test", "train.wandb_mode=offline",
               f"launch.master_port={port}"]
        res = subprocess.run(cmd, cwd=a, env=env, capture_output=True, text=True, timeout=900)
        (root / "stdout.txt").write_text(res.stdout)
        (root / "stderr.txt").write_text(res.stderr)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]

    root = _once_per_run(tmp_path_factory, "one_rank_run", train)
    return {"root": root, "out": root / "a/runs/r", "shards": shards.resolve(),
            "stdout": (root / "stdout.txt").read_text(), "stderr": (root / "stderr.txt").read_text()}


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster (2 CPUs) in this process for the whole session; `prepare` uses it as it is
    (prep.distributor=auto or ray). For the tests that check Ray itself: test_prep_ray.py,
    test_prep_distribute.py, the storage tests whose shard tasks run as Ray workers."""
    import ray
    if not ray.is_initialized():
        start_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def gloo_pair():
    """Two gloo ranks started once (at the first job) for the session: `gloo_pair.run(job, *args)` ->
    [rank 0's result, rank 1's] (test_distributed, test_model_distributed, test_grad_cache, test_evaluate)."""
    pair = GlooPair()
    yield pair
    pair.close()


@pytest.fixture(scope="session")
def small_text_dir(tmp_path_factory):
    """A 2-layer BERT of width 32 (config only: built with random weights, `model.text.pretrained=false`),
    so the towers stay small (test_momentum.py, test_speed_levers.py)."""
    from transformers import BertConfig

    path = tmp_path_factory.mktemp("small_text")
    BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64).save_pretrained(path)
    return path
