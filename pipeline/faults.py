"""Fault injection for tests: the one place production code asks whether to fail on purpose.

Owns: `injected(name, step)`, true when the environment variable HIERVL_FAULT names the fault
(and, when given, HIERVL_FAULT_AFTER is below `step`). tests/test_train.py sets them to prove that a
run killed while writing a checkpoint resumes from the last complete one (`kill-during-checkpoint`)
and that a non-finite loss is skipped and counted (`nan-loss`); tests/test_checkpoint_integrity.py
sets `disk-full-during-checkpoint` (ENOSPC raised at the per-rank checkpoint write, for machines
where a real full filesystem cannot be mounted); tests/test_train_elastic.py sets `stop-after-step` (the
run stops as on SIGTERM once HIERVL_FAULT_AFTER steps are done: a preemption at an exact step, on every
rank alike); tests/test_prep_watchdog.py sets `decode-hang` / `decode-crash` with HIERVL_FAULT_MATCH (the
prep decoder of a matching file blocks forever in a read, or dies of SIGSEGV: dataprep/transcode.py);
tests/test_async_checkpoint.py sets `slow-checkpoint-write` (a background checkpoint write of step s
is held until step s+1 is in metrics.jsonl, at most HIERVL_FAULT_SLOW_S seconds: a disk slower than
a training step), alone or with another fault.
tests/test_crash_ledger.py sets `inprocess-decode-crash` (the trainer's process dies of SIGSEGV in an
in-process DALI or PyAV decode call that holds a sample matching HIERVL_FAULT_MATCH: pipeline/data/loader.py).
HIERVL_FAULT may name several faults, comma-separated. Unset, every call is false.
Must not touch: anything else; the caller decides what the fault does.
"""

from __future__ import annotations

import os

FAULTS = ("kill-during-checkpoint", "nan-loss", "disk-full-during-checkpoint", "stop-after-step", "decode-hang",
          "decode-crash", "slow-checkpoint-write", "inprocess-decode-crash")


def injected(name: str, step: int | None = None) -> bool:
    """Whether the test harness asked for fault `name` now (at `step`, if the fault counts steps)."""
    if name not in os.environ.get("HIERVL_FAULT", "").split(","):
        return False
    return step is None or step > int(os.environ.get("HIERVL_FAULT_AFTER", 0))
