"""Session-wide fixtures: the prepared datasets several modules share, one 1-rank training run
that two modules check, one Ray cluster, one pair of gloo ranks (tests/gloo_pair.py) for the
modules that compare 2 ranks against 1, and one small random-init BERT config.

Each dataset is built once per session, by `hiervl.dataprep` with the local distributor (no Ray
start), and only when a test asks for it; tests read these folders and never write into them
(copy one first, as test_loader.py does). Ray starts once per session, only for the tests that
check Ray itself. pytest puts this folder on sys.path (rootdir conftest, no __init__.py), so test
modules import the builders as `from fixtures import ...`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import prepared_dataset
from gloo_pair import GlooPair

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prepared_dataset_40(tmp_path_factory):
    """40 synthetic VP9 samples (seed 0), 8 per shard: the training runs' data (test_train.py,
    test_monitoring.py, test_checkpoint_integrity.py, test_train_validation.py, test_decode_pool.py)."""
    return prepared_dataset(tmp_path_factory.mktemp("dataset40"), 40)


@pytest.fixture(scope="session")
def prepared_dataset_30(tmp_path_factory):
    """30 synthetic VP9 samples (seed 0): the loader's data (test_loader.py, test_decode_pool.py)."""
    return prepared_dataset(tmp_path_factory.mktemp("dataset30"), 30)


@pytest.fixture(scope="session")
def prepared_dataset_16(tmp_path_factory):
    """16 synthetic VP9 samples (seed 0): the multi-node launch tests (test_submit_deepspeed.py)."""
    return prepared_dataset(tmp_path_factory.mktemp("dataset16"), 16)


@pytest.fixture(scope="session")
def one_rank_run(tmp_path_factory, prepared_dataset_40):
    """One real `hiervl train` (DeepSpeed launcher, 1 CPU rank, hit preset, 7 steps) that serves three
    modules, each checking other things of it (none writes into it):
    - test_train_validation.py: started from folder A with a relative data.path and train.out_dir
      and a user DeepSpeed JSON without "optimizer"; eval and checkpoint on the same steps (3, 6);
    - test_monitoring.py: log every 2 steps, eval at 3 and 6, the last step 7 off both cadences,
      W&B offline: the figures in metrics.jsonl, TensorBoard and W&B;
    - test_export.py: its newest checkpoint exported, evaluated and embedded through the API.
    Returns {"root", "out" (the run folder), "shards" (absolute), "stdout", "stderr"}."""
    root = tmp_path_factory.mktemp("one_rank_run")
    shards = prepared_dataset_40
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
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return {"root": root, "out": a / "runs/r", "shards": shards.resolve(), "stdout": res.stdout,
            "stderr": res.stderr}


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster (2 CPUs) in this process for the whole session; `prepare` uses it as it is
    (prep.distributor=auto or ray). For the tests that check Ray itself: test_prep_ray.py,
    test_prep_distribute.py, the storage tests whose shard tasks run as Ray workers."""
    import ray
    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=128 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
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
