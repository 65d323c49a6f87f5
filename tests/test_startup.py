"""`hiervl train`'s start-up and exit: the local CPU launch skips DeepSpeed's runner without changing
what it would start, only ranks get the preemption signals, and the collector is off during a
rank's start-up and its start-up objects frozen, and a rank that compiles nothing loads no compiler
(launch/local_launch.py, launch/quiet_gc.py, launch/train.py)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from hiervl.config import load_config
from hiervl.launch import deepspeed_launch as ds
from hiervl.launch.processes import RANK_MODULE, runs_rank_module

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny.yaml")

# DeepSpeed's runner with Popen recorded instead of run: the launcher command it would start
RUNNER_CMD = textwrap.dedent("""
    import json, sys
    from deepspeed.launcher import runner

    class Recorded:
        returncode = 0
        def __init__(self, cmd, env=None):
            print(json.dumps(cmd))
        def wait(self):
            return 0

    runner.subprocess.Popen = Recorded
    runner.main(sys.argv[1:])
""")


def test_local_cpu_command_is_what_deepspeeds_runner_would_start(tmp_path):
    cfg = load_config(TINY, ["launch.master_port=29677"])
    config, logs = tmp_path / "run" / "config.yaml", tmp_path / "run" / "logs" / "stdout"
    for log_dir in (logs, None):
        ours = ds.local_command(cfg, config, nranks=3, gpus=False, log_dir=log_dir)
        runner_argv = ["--master_port", "29677", "--num_accelerators", "3"]
        runner_argv += ["--enable_each_rank_log", str(log_dir)] if log_dir else []
        runner_argv += ["--module", RANK_MODULE, "--config", str(config)]
        env = dict(os.environ, DS_ACCELERATOR="cpu", LOCAL_SIZE="3")  # LOCAL_SIZE: CPU "devices" on this host
        env.pop("CUDA_VISIBLE_DEVICES", None)
        res = subprocess.run([sys.executable, "-c", RUNNER_CMD, *runner_argv], env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr
        theirs = __import__("json").loads(res.stdout.strip().splitlines()[-1])
        assert theirs[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.launch"]
        assert ours[:4] == [sys.executable, "-u", "-m", ds.LOCAL_LAUNCH_MODULE]
        assert ours[4:] == theirs[4:]  # the same launcher arguments, rank module and config


def test_gpu_runs_keep_deepspeeds_runner(tmp_path):
    cfg = load_config(TINY)
    argv = ds.local_command(cfg, tmp_path / "config.yaml", nranks=2, gpus=True)
    assert argv[1:4] == ["-u", "-m", "deepspeed.launcher.runner"] and argv[argv.index("--num_gpus") + 1] == "2"


def test_only_the_rank_processes_count_as_ranks(tmp_path):
    cfg = load_config(TINY)
    config = tmp_path / "config.yaml"
    local = ds.local_command(cfg, config, nranks=2, gpus=False)
    runner = ds.local_command(cfg, config, nranks=2, gpus=True)
    deepspeed_launch = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", "--world_info=x", "--module",
                        RANK_MODULE, "--config", str(config)]
    pdsh = ds.pdsh_command(cfg, config, tmp_path / "hostfile", master_addr="n1")
    rank = [sys.executable, "-u", "-m", RANK_MODULE, "--local_rank=0", "--config", str(config)]
    assert all(RANK_MODULE in argv for argv in (local, runner, deepspeed_launch, pdsh, rank))
    assert [runs_rank_module(a) for a in (local, runner, deepspeed_launch, pdsh, rank)] == [False] * 4 + [True]
    assert not runs_rank_module([sys.executable, "-m"])


def test_quiet_gc_start_up_freezes_its_objects_and_turns_the_collector_back_on():
    script = textwrap.dedent("""
        import gc, weakref
        from hiervl.launch import quiet_gc

        assert quiet_gc.off() is True and not gc.isenabled()

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle: only the collector frees it
        gone = weakref.ref(a)
        del a, b
        kept = [Node() for _ in range(1000)]
        assert gone() is not None  # off: nothing collected it
        frozen_before = gc.get_freeze_count()
        quiet_gc.started()
        assert gc.isenabled() and gc.get_freeze_count() >= frozen_before + 1000
        gc.collect()
        assert gone() is not None, "frozen: later collections skip start-up's objects, its cycles too"

        quiet_gc.restore(False)
        assert gc.isenabled()  # restore after started: a no-op
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


def test_a_cli_train_error_in_process_leaves_the_collector_on(tmp_path, capsys):
    import gc

    from hiervl.launch.cli import main

    assert gc.isenabled()
    code = main(["train", "--config", TINY, f"data.path={tmp_path / 'no-data'}", f"train.out_dir={tmp_path / 'run'}"])
    assert code == 2 and "data.path" in capsys.readouterr().err
    assert gc.isenabled()


def test_a_rank_without_train_compile_loads_no_inductor_for_deepspeeds_zero_check():
    """deepspeed.initialize with ZeRO on imports DeepSpeed's Muon optimizer (its check of the optimizer
    type), whose @torch.compile decorators load torch's inductor (~0.6 s of CPU per rank). A rank with
    train.compile off turns TorchDynamo off first; a value the user set is kept."""
    script = textwrap.dedent("""
        import os, sys
        from hiervl.launch.train import compiler_off

        os.environ.pop("TORCHDYNAMO_DISABLE", None)
        compiler_off()
        import deepspeed.runtime.zero.muon.muon_optimizer  # what the ZeRO check imports
        assert "torch._inductor.compile_fx" not in sys.modules, "the inductor was loaded"
        os.environ["TORCHDYNAMO_DISABLE"] = "0"
        compiler_off()
        assert os.environ["TORCHDYNAMO_DISABLE"] == "0"
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-2000:] + res.stderr[-3000:]
