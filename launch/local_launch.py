"""DeepSpeed's per-node launcher (`deepspeed.launcher.launch`) for a local CPU run, started directly.

`python -u -m hiervl.launch.local_launch --world_info=B64 --master_addr=127.0.0.1 --master_port=P
--module [--enable_each_rank_log=DIR] --log_level=info hiervl.launch.train --config FILE`: the
command DeepSpeed's runner (`deepspeed.launcher.runner`) would start for a one-machine CPU run,
rendered by `deepspeed_launch.local_command`, so that runner process is skipped. On one machine
the runner only computes `world_info` ({"localhost": [0..N-1]}) and starts this launcher, yet it
imports torch and DeepSpeed (~3 s of CPU, ~240 MB) and pays their interpreter exit. The launcher
itself (rank environment, per-rank logs, one failed rank stops the others) is DeepSpeed's own
`launch.main`, unchanged; before it the collector is off while DeepSpeed imports, then the
imported objects are frozen, so exit does not walk them (launch/quiet_gc.py).

Owns: this launcher process's entry point.
Must not touch: the launcher's argv (deepspeed_launch.py) or the ranks.
"""

from __future__ import annotations

if __name__ == "__main__":
    from hiervl.launch import quiet_gc

    quiet_gc.off()
    from deepspeed.launcher import launch

    quiet_gc.started()  # only waits from here on
    launch.main()
