"""The cyclic garbage collector around a launcher's or a rank's start-up and exit.

Why: importing torch, DeepSpeed and transformers and building the model leaves ~0.7 million
long-lived objects. With the collector on, every full collection during start-up walks all of
them again (~1 s of CPU per rank, a fifth of its import time), and interpreter exit walks them
once more (~3 s per rank under load; ~1 s per process that only imported DeepSpeed). Start-up
runs with the collector off (`off`); once built, the survivors are frozen (`started`): later
collections, and the one at exit, skip them. Start-up's cyclic leftovers are frozen with them, not
collected: a rank's are ~12k small objects (RSS unchanged after collecting them), and finding them
walks all ~0.7 million: ~0.3 s of CPU per rank. `before_exit` freezes what training created, so exit skips that too.
Only process entry points call these (a rank's `__main__`, `hiervl train` before it waits for the
ranks, the local launcher), never library code: a process that imports hiervl keeps its own
collector settings.

Owns: when the collector is off and what is frozen in those processes.
Must not touch: what the processes run.
"""

from __future__ import annotations

import gc


def off() -> bool:
    """Start-up begins: no collections until `started`; returns whether the collector was on
    (`restore` it where the caller is not the process's entry point, e.g. a test calling a CLI's main)."""
    was_on = gc.isenabled()
    gc.disable()
    return was_on


def restore(was_on: bool) -> None:
    """The collector on again if it was before `off` (a no-op after `started`)."""
    if was_on:
        gc.enable()


def started() -> None:
    """Start-up is over: freeze what it built (later collections skip it), collector on again.
    Nothing is collected first: start-up's cyclic garbage stays, frozen (see the module docstring)."""
    gc.freeze()
    gc.enable()


def before_exit() -> None:
    """The process is about to exit: freeze everything, so interpreter exit walks nothing."""
    gc.freeze()
