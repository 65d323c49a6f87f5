"""The PyAV process pool and the hybrid DALI + pool split: same batches, same contracts, clean shutdown.

The pool path must give exactly what the in-process path gives (keys, positions, pixels), keep
the exactly-once and resume contracts at any world size, turn a dead worker into a clear error,
and leave no worker behind when its parent exits or is killed. A real training run with the pool,
SIGTERMed and resumed on one rank at the exact data position, is tests/test_train.py's SIGTERM test
(a CPU rank decodes in the pool by default).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hiervl.config import Config, ConfigError
from hiervl.data.decode import dali_available
from hiervl.data.decode_pool import DecodeWorkerError
from hiervl.data.loader import VideoTextLoader
from hiervl.data.schedule import DecoderSplit
from hiervl.model.text_model import load_tokenizer
from test_loader import global_keys, make_cfg, run_epoch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dataset(prepared_dataset_30):
    return prepared_dataset_30


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _wait_gone(pids, seconds=10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def test_pool_gives_the_in_process_batches_at_two_ranks_and_closes_its_workers(dataset):
    threads, _ = run_epoch(make_cfg(dataset, remainder="pad", decoder="pyav", prefetch=2), 2, epoch=1)
    pooled, loaders = run_epoch(make_cfg(dataset, remainder="pad", decoder="pyav", prefetch=2, decode_workers=2),
                                2, epoch=1)
    for r in range(2):
        assert [b[0] for b in pooled[r]] == [b[0] for b in threads[r]]  # keys, slot by slot
        assert [b[2] for b in pooled[r]] == [b[2] for b in threads[r]]  # positions
        for a, b in zip(pooled[r], threads[r]):
            assert a[1] == b[1] and torch.equal(a[3], b[3])  # valid flags; pixels bit for bit
    assert all(ld.stats["pool_decoded"] == ld.stats["decoded"] > 0 for ld in loaders)
    pads = [b[3][j] for r in range(2) for b in pooled[r] for j, v in enumerate(b[1]) if not v]
    assert pads and all(not p.any() for p in pads)  # padding slots are zero video
    pids = [p for ld in loaders for p in ld._pool.pids]
    assert len(pids) == 4 and all(_alive(p) for p in pids)
    for ld in loaders:
        ld.close()
    assert _wait_gone(pids, 5) == []


def test_pool_exactly_once_then_stop_and_resume_at_three_ranks(dataset):
    cfg = make_cfg(dataset, remainder="pad", decoder="pyav", prefetch=2, decode_workers=2)
    first, loaders = run_epoch(cfg, 2, epoch=2, limit=2)  # stops with batches still queued to the workers
    state = loaders[0].state_dict()
    assert state["position"] == 2 * 2 * 2
    rest, rest_loaders = run_epoch(cfg, 3, epoch=0, state=state)
    order = [loaders[0].index.keys[i] for i in loaders[0].order(2)]
    assert global_keys(first) + global_keys(rest) == order  # no repeat, no gap, same order
    assert len({len(b) for b in rest}) == 1
    # the same loader iterates the next epoch: the cancelled tasks of epoch 2 leave nothing behind
    # (no stale clip in a reused ring slot: pixels equal a fresh thread-path loader's)
    loaders[0].set_epoch(3)
    again = list(loaders[0])
    fresh, _ = run_epoch(make_cfg(dataset, remainder="pad", decoder="pyav"), 2, epoch=3)
    assert [b["keys"] for b in again] == [b[0] for b in fresh[0]]
    assert all(torch.equal(a["video"], b[3]) for a, b in zip(again, fresh[0]))
    for ld in loaders + rest_loaders:
        ld.close()


def test_pool_prefetch_zero_and_eval_match_the_thread_path(dataset):
    a = VideoTextLoader(make_cfg(dataset, decoder="pyav", prefetch=0), train=False, tokenizer=load_tokenizer())
    b = VideoTextLoader(make_cfg(dataset, decoder="pyav", prefetch=0, decode_workers=1), train=False, tokenizer=load_tokenizer())
    ba, bb = list(a), list(b)
    assert [x["keys"] for x in ba] == [x["keys"] for x in bb]
    assert all(torch.equal(x["video"], y["video"]) for x, y in zip(ba, bb))
    b.close()


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_hybrid_dali_and_pool_split_a_vp9_epoch_into_the_same_batches(dataset):
    """decoder=dali with workers on a CPU machine (decoder=auto does this on a GPU, with DALI mixed)."""
    ref, _ = run_epoch(make_cfg(dataset, remainder="pad", decoder="pyav", batch_size=4), 1, epoch=0)
    got, loaders = run_epoch(make_cfg(dataset, remainder="pad", decoder="dali", batch_size=4, decode_workers=1),
                             1, epoch=0)
    stats = loaders[0].stats
    assert loaders[0].hybrid and stats["skipped"] == 0
    assert stats["decode_path"]["dali"] > 0 and stats["pool_decoded"] > 0  # both decoders took part
    assert stats["decode_path"]["dali"] + stats["decode_path"]["pyav"] == stats["decoded"] == len(loaders[0].index)
    assert [b[0] for b in got[0]] == [b[0] for b in ref[0]] and [b[2] for b in got[0]] == [b[2] for b in ref[0]]
    diff = torch.stack([(a[3] - b[3]).abs().mean() for a, b in zip(got[0], ref[0])]).mean()
    assert diff < 0.03, diff  # DALI vs PyAV pixels: ~1/255 / std (test_loader's tolerance)
    assert loaders[0]._split.dali_rate > 0 and loaders[0]._pool.clips_per_s() > 0
    loaders[0].close()


def test_auto_on_a_cpu_machine_gives_every_sample_to_the_workers(dataset):
    """decoder=auto with decode workers on a CPU machine: no DALI CPU in the trainer's process; the
    batches are the in-process PyAV ones, bit for bit."""
    ref, _ = run_epoch(make_cfg(dataset, remainder="pad", decoder="pyav", batch_size=4), 1, epoch=0)
    got, loaders = run_epoch(make_cfg(dataset, remainder="pad", decoder="auto", batch_size=4, decode_workers=1,
                                      device="cpu"), 1, epoch=0)
    stats = loaders[0].stats
    assert not loaders[0].hybrid and stats["skipped"] == 0
    assert stats["decode_path"].get("dali", 0) == 0 and stats["pool_decoded"] == stats["decoded"] == len(loaders[0].index)
    assert [b[0] for b in got[0]] == [b[0] for b in ref[0]]
    assert all(torch.equal(a[3], b[3]) for a, b in zip(got[0], ref[0]))
    loaders[0].close()


def test_split_follows_the_measured_rates():
    split = DecoderSplit(smoothing=1.0)
    assert split.pool_share(8, None) == 4  # nothing measured: half and half
    split.record_dali(8, 1.0)  # DALI 8 clips/s
    assert split.pool_share(8, 24.0) == 6  # pool 3x faster: 3/4 of the batch
    assert split.pool_share(8, 0.01) == 1 and split.pool_share(8, 1e6) == 7  # both keep measuring
    assert split.pool_share(1, 1e6) == 1 and split.pool_share(0, 1.0) == 0


def test_a_killed_worker_raises_a_clear_error_naming_it(dataset):
    loader = VideoTextLoader(make_cfg(dataset, decoder="pyav", prefetch=0, decode_workers=1), tokenizer=load_tokenizer())
    it = iter(loader)
    next(it)
    (pid,) = loader._pool.pids
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(DecodeWorkerError, match=r"decode worker 0 \(pid \d+\) was killed by SIGKILL"):
        next(it)
    assert time.monotonic() - t0 < 10


def test_a_killed_worker_with_prefetch_raises_in_the_consumer(dataset):
    loader = VideoTextLoader(make_cfg(dataset, decoder="pyav", prefetch=2, decode_workers=2, batch_size=1), tokenizer=load_tokenizer())
    it = iter(loader)
    next(it)
    for pid in loader._pool.pids:
        os.kill(pid, signal.SIGTERM)
    with pytest.raises(DecodeWorkerError, match="was killed by SIGTERM"):
        for _ in it:
            pass
    loader.close()


WORKER_SCRIPT = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from hiervl.config import Config
from hiervl.data.loader import VideoTextLoader
from hiervl.model.text_model import load_tokenizer

if __name__ == "__main__":  # worker processes import the main module (spawn / forkserver)
    cfg = Config()
    d = cfg.data
    d.path, d.batch_size, d.num_frames, d.size, d.short_side, d.max_words = sys.argv[2], 2, 4, 16, 20, 12
    d.decoder, d.decode_workers, d.num_threads = "pyav", 2, 1
    loader = VideoTextLoader(cfg, tokenizer=load_tokenizer(cfg.model.text.path))
    batch = next(iter(loader))
    print(" ".join(map(str, loader._pool.pids)), flush=True)
    if sys.argv[3] == "wait":
        time.sleep(60)
"""


def test_no_worker_outlives_its_parent(dataset, tmp_path):
    """Three parents at once: one returns without close(), one gets SIGKILL, one SIGTERM (default action)."""
    script = tmp_path / "parent.py"
    script.write_text(WORKER_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    hows = ["exit", "SIGKILL", "SIGTERM"]
    procs = {how: subprocess.Popen([sys.executable, str(script), str(ROOT), str(dataset),
                                    "exit" if how == "exit" else "wait"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for how in hows}
    for how, proc in procs.items():
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2, proc.stderr.read()[-3000:]
        if how != "exit":
            assert all(_alive(p) for p in pids)
            proc.send_signal(getattr(signal, how))
        proc.wait(timeout=30)
        assert _wait_gone(pids, 10) == [], f"workers left running after the parent's {how}"


def test_decode_workers_is_validated():
    with pytest.raises(ConfigError, match="data.decode_workers"):
        Config().data.__class__(decode_workers=-1)
    assert Config().data.decode_workers == "auto"  # the cores left after the ranks (>= 1 on a CPU machine)
