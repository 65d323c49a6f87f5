"""Issue 25 (hidden class: stale locks left by interrupted builds): a C++ op build killed mid-way
leaves torch's `<build dir>/lock`, and every later start-up waits on it forever, silently. Before any
rank starts, a lock that no process holds open is removed with one warning; a live build's is kept."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest


@pytest.fixture
def caplog_hiervl(caplog):
    logger = logging.getLogger("hiervl.launch.build_locks")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="hiervl.launch.build_locks")
    yield caplog
    logger.removeHandler(caplog.handler)


def test_an_interrupted_builds_lock_is_removed_and_a_live_builds_kept(tmp_path, caplog_hiervl):
    from hiervl.launch.build_locks import clear_stale_build_locks
    from torch.utils.file_baton import FileBaton

    root = tmp_path / "ext"
    stale, live = root / "py311_cpu" / "deepspeed_shm_comm" / "lock", root / "fused_adam" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir(parents=True)
    # an interrupted build: torch's baton taken by a process that was then SIGKILLed
    code = "import sys; from torch.utils.file_baton import FileBaton; FileBaton(sys.argv[1]).try_acquire()"
    killed = subprocess.Popen([sys.executable, "-c", code + "; import time; time.sleep(60)", str(stale)])
    while not stale.exists():
        time.sleep(0.05)
    killed.kill()
    killed.wait()
    # a build in progress: holds its lock open
    building = subprocess.Popen([sys.executable, "-c", code + "; print('held', flush=True); import time; "
                                 "time.sleep(60)", str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert building.stdout.readline().strip() == "held"
        assert not FileBaton(str(stale)).try_acquire()  # what torch meets: it would wait forever
        removed = clear_stale_build_locks({"TORCH_EXTENSIONS_DIR": str(root)})
        assert removed == [stale] and not stale.exists() and live.exists()
        warnings = sorted({r.getMessage() for r in caplog_hiervl.records if r.levelno == logging.WARNING})
        assert len(warnings) == 1 and str(stale) in warnings[0] and "interrupted" in warnings[0], warnings
        assert f"pid {building.pid} holds {live}" in caplog_hiervl.text
        baton = FileBaton(str(stale))
        assert baton.try_acquire()  # the next build starts instead of waiting
        baton.release()
    finally:
        building.kill()
        building.wait()
    assert clear_stale_build_locks({"TORCH_EXTENSIONS_DIR": str(root)}) == [live]  # its builder died too


def test_every_local_and_node_launch_clears_them_before_the_ranks_start(tmp_path, monkeypatch):
    from hiervl.config import Config
    from hiervl.launch import deepspeed_launch as ds

    lock = tmp_path / "ext" / "op" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    seen = []
    monkeypatch.setattr(ds, "run_forwarding_signals", lambda cmd, env: seen.append(lock.exists()) or 0)
    cfg = Config()
    cfg.launch.master_port = 0
    assert ds.run_local(cfg, tmp_path / "config.yaml", nranks=1, gpus=False) == 0
    lock.touch()
    assert ds.run_node(cfg, ["true"], node_rank=1, env=dict(os.environ)) == 0
    assert seen == [False, False]  # gone before the launcher started, both times
