"""Session-wide fixtures: the prepared datasets several modules share, and one Ray cluster.

Each dataset is built once per session, by `hiervl.dataprep` with the local distributor (no Ray
start), and only when a test asks for it; tests read these folders and never write into them
(copy one first, as test_loader.py does). Ray starts once per session, only for the tests that
check Ray itself. pytest puts this folder on sys.path (rootdir conftest, no __init__.py), so test
modules import the builders as `from fixtures import ...`.
"""

from __future__ import annotations

import pytest
from fixtures import prepared_dataset


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
def ray_cluster():
    """A local Ray cluster (2 CPUs) in this process for the whole session; `prepare` uses it as it is
    (prep.distributor=auto or ray). For the tests that check Ray itself: test_prep_ray.py,
    test_prep_distribute.py, the storage tests whose shard tasks run as Ray workers."""
    import ray
    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=128 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
