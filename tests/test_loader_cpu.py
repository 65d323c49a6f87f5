"""The loader's own CPU share (pipeline/data/cpu_meter.py): its decode threads and worker processes
are counted, so `loader_cpu_share` sees what data-wait does not."""

import pytest
from fixtures import write_shards
from hiervl.data.cpu_meter import pid_cpu_seconds
from hiervl.data.loader import VideoTextLoader
from hiervl.model.text_model import load_tokenizer
from test_loader import make_cfg


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("cpu") / "shards", 24, "vp9")


def _epochs(loader, n=3):
    for e in range(n):
        loader.set_epoch(e)
        for _ in loader:
            pass


def test_decode_threads_are_counted_as_the_loaders(shards):
    """PyAV in 2 decode threads beside the producer: the consumer here only waits, so nearly all
    of the process's CPU over the epochs is the loader's (uncounted threads would leave most out)."""
    loader = VideoTextLoader(make_cfg(shards, decoder="pyav", decode_workers=0, num_threads=2, prefetch=2), tokenizer=load_tokenizer())
    try:
        _epochs(loader, 1)  # warm-up: imports, first allocations
        l0, t0 = loader.cpu_seconds()
        _epochs(loader)
        l1, t1 = loader.cpu_seconds()
    finally:
        loader.close()
    assert t1 - t0 > 0.05
    assert 0.6 * (t1 - t0) < l1 - l0 <= 1.02 * (t1 - t0) + 0.01, (l1 - l0, t1 - t0)


def test_decode_worker_processes_are_counted_in_the_loader_and_the_tree(shards):
    loader = VideoTextLoader(make_cfg(shards, decoder="pyav", decode_workers=1, prefetch=2), tokenizer=load_tokenizer())
    try:
        _epochs(loader, 1)
        pids = loader._pool.pids
        l0, t0 = loader.cpu_seconds()
        w0 = pid_cpu_seconds(pids)
        _epochs(loader)
        l1, t1 = loader.cpu_seconds()
        w1 = pid_cpu_seconds(pids)
    finally:
        loader.close()
    assert w1 - w0 > 0.02  # the worker decoded
    assert l1 - l0 >= w1 - w0  # ... and its CPU is the loader's
    assert t1 - t0 >= l1 - l0 - 0.01  # the tree (this process + the worker) holds the loader's CPU
    assert l1 - l0 > 0.6 * (t1 - t0), (l1 - l0, t1 - t0)
