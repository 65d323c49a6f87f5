"""Mistakes refused before DeepSpeed starts a rank, submit options checked, run folders that work from anywhere.

- `hiervl train` refuses a bad train.resume, a data.path that is not a prepared dataset (or too
  small for one global batch), a missing eval.split, cross-section limits and a DeepSpeed JSON
  that disagrees with the config: exit 2, one line on stderr, no out_dir, no launcher started.
- `hiervl train --dry-run` prints a shell-quoted command and creates nothing.
- `hiervl submit` refuses --nodes 0, negative --gpus-per-node, bad --hosts / --master-addr /
  --node-rank and malformed hostfiles (argparse: exit 2; hostfile and node rank: exit 1).
- A user DeepSpeed JSON without "optimizer" trains with our AdamW and our LR schedule.
- A run started with relative paths stores absolute ones, so `hiervl eval` and `hiervl search`
  work from other directories; with eval and a checkpoint due at the same step, the checkpoint is
  written once.
"""

import base64
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hiervl.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny.yaml")
PY = sys.executable


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR="cpu", RAY_USAGE_STATS_ENABLED="0")
    env.update(extra)
    return env


def hiervl(*args, cwd=ROOT, timeout=300):
    return subprocess.run([PY, "-m", "hiervl.launch.cli", *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    """`hiervl ARGS` in this process (the parent a user's command runs): returncode, stdout, stderr."""
    from hiervl.launch.cli import main

    def run(*args):
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        out, err = capsys.readouterr()
        return Result(code, out, err)
    return run


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """8 train samples in the dataset contract (tars + manifest.parquet), no test split."""
    from fixtures import write_shards

    return write_shards(tmp_path_factory.mktemp("small") / "shards", 8)


def _refused(res, out, *needles):
    """Exit 2, exactly one line on stderr holding every needle; nothing created, no launcher run."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-4000:]
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not Path(out).exists()
    assert "deepspeed.launcher" not in res.stdout + res.stderr and "[rank" not in res.stderr


@pytest.mark.parametrize("overrides,needles", [
    (["train.resume=latest"], ["train.resume=latest", "did you mean auto?"]),
    (["train.resume={tmp}"], ["no complete checkpoint there"]),
    (["data.path={tmp}/nowhere"], ["data.path=", "does not exist", "hiervl prep"]),
    (["data.path={data}/manifest.parquet"], ["is a file, not a dataset folder"]),
    (["train.out_dir={data}/manifest.parquet/run"], ["manifest.parquet is a file, so the folder cannot be made"]),
    (["data.path={tmp}"], ["is not a prepared dataset (no manifest.parquet"]),
    (["data.path={data}", "data.batch_size=8"], ["has 8 samples, fewer than one global batch", "x 2 ranks"]),
    (["data.path={data}", "data.split=val"], ["no samples of data.split=val", "train (8)"]),
    (["data.path={data}", "eval.every_steps=5"], ["eval.split=test", "eval.every_steps=0"]),
    (["data.path={data}", "train.deepspeed_config={tmp}"], ["train.deepspeed_config=", "is not a file"]),
    (["data.path={data}", "data.num_frames=100"], ["data.num_frames=100 exceeds model.max_frames=64"]),
    (["data.path={data}", "data.size=28", "data.short_side=36"], ["not a multiple of model.vision.patch_size=8"]),
    (["data.path={data}", "model.level_weights={{bogus: 1.0}}"], ["model.level_weights names ['bogus']"]),
])
def test_train_refuses_before_any_rank_starts(tmp_path, small_data, cli, monkeypatch, overrides, needles):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    args = [o.format(tmp=tmp_path, data=small_data) for o in overrides]
    res = cli("train", "--config", TINY, f"train.out_dir={out}", "train.ranks=2", "data.batch_size=4",
                 "train.steps=1", *args)
    _refused(res, out, *needles)


def test_train_refuses_a_deepspeed_json_whose_batch_disagrees(tmp_path, small_data):
    out = tmp_path / "run"
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 99}))
    res = hiervl("train", "--config", TINY, f"data.path={small_data}", f"train.out_dir={out}", "train.ranks=2",
                 "data.batch_size=4", "train.steps=1", f"train.deepspeed_config={ds}")
    _refused(res, out, "train_batch_size=99", "4 x 1 x 2 = 8")


@pytest.mark.parametrize("user,needle", [
    ({"train_micro_batch_size_per_gpu": 3}, "train_micro_batch_size_per_gpu=3 but data.batch_size = 16"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2 but train.grad_accum = 1"),
    ({"train_batch_size": 16}, "train_batch_size=16 but data.batch_size x train.grad_accum x ranks"),
    ({"zero_optimization": {"stage": 2}}, "set train.zero_stage=2"),
    ({"fp16": {"enabled": True}}, "enables fp16"),
    ({"bf16": {"enabled": True}}, "bf16 on but train.precision=fp32"),
    ([1, 2], "must hold a JSON object"),
])
def test_a_deepspeed_json_that_disagrees_with_the_config_is_refused(tmp_path, user, needle):
    from hiervl.train.deepspeed_config import build_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    cfg = load_config(TINY, [f"train.deepspeed_config={path}"])
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        build_deepspeed_config(cfg, world_size=2)


def test_a_deepspeed_json_without_optimizer_keeps_our_adamw_and_schedule(tmp_path):
    """Sections the JSON names replace ours; the rest (scheduler, batch, stage) come from the config,
    and agreeing values (train_batch_size = 16 x 1 x 2) are kept."""
    import torch
    from hiervl.train.deepspeed_config import build_deepspeed_config, build_optimizer

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 0, "reduce_bucket_size": 5e7},
                                "steps_per_print": 7}))
    cfg = load_config(TINY, [f"train.deepspeed_config={path}"])
    ds = build_deepspeed_config(cfg, world_size=2)
    assert ds["scheduler"]["type"] == "WarmupCosineLR" and ds["scheduler"]["params"]["total_num_steps"] == 300
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["train_batch_size"] == 32
    assert ds["zero_optimization"] == {"stage": 0, "reduce_bucket_size": 5e7} and ds["steps_per_print"] == 7
    assert "optimizer" not in ds
    assert type(build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg, torch.device("cpu"), ds)) is torch.optim.AdamW


def test_train_dry_run_prints_a_quoted_command_and_creates_nothing(tmp_path, small_data):
    out = tmp_path / "with space" / "it's a run; $HOME"
    res = hiervl("train", "--config", TINY, "--dry-run", f"data.path={small_data}", f"train.out_dir={out}",
                 "train.ranks=2", "data.batch_size=4", "launch.master_port=29631")
    assert res.returncode == 0, res.stderr
    argv = shlex.split(res.stdout.strip())
    assert res.stdout.strip() == shlex.join(argv)
    world = next(a for a in argv if a.startswith("--world_info="))  # CPU: DeepSpeed's launcher, 2 local ranks
    assert json.loads(base64.urlsafe_b64decode(world.split("=", 1)[1])) == {"localhost": [0, 1]}
    assert argv[-2:] == ["--config", str(out / "config.yaml")]
    assert not (tmp_path / "with space").exists()


# ------------------------------------------------------------------------------ submit


@pytest.mark.parametrize("args,needle", [
    (["slurm", "--nodes", "0"], "argument --nodes: 0 nodes is too few"),
    (["slurm", "--gpus-per-node", "-3"], "argument --gpus-per-node: -3 GPUs per node is negative"),
    (["local", "--gpus-per-node", "two"], "'two' is not a whole number"),
    (["deepspeed", "--hosts", "a,,b"], "has an empty host name"),
    (["deepspeed", "--hosts", "a,b;reboot"], "'b;reboot' is not a host name or IP address"),
    (["deepspeed", "--hosts", "n1,n1"], "names a host twice"),
    (["deepspeed", "--hosts", "n1,n2", "--master-addr", "$(id)"], "argument --master-addr: '$(id)' is not a host"),
])
def test_submit_refuses_bad_cluster_options(tmp_path, cli, args, needle):
    out = tmp_path / "run"
    res = cli("submit", *args, "--config", TINY, "--dry-run", f"train.out_dir={out}")
    assert res.returncode == 2, res.stdout + res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert not out.exists() and not res.stdout.strip()


def test_submit_checks_node_rank_and_hostfile_lines(tmp_path, cli):
    out = tmp_path / "run"
    res = cli("submit", "deepspeed", "--config", TINY, "--hosts", "n1,n2", "--no-ssh", "--node-rank", "2",
                 "--dry-run", f"train.out_dir={out}")
    assert res.returncode == 1 and "--node-rank 2 but the hostfile names 2 hosts" in res.stderr
    for text, needle in [("n1 slots=8\nn2 slots=zero\n", "line 2: 'n2 slots=zero' is not `host slots=N`"),
                         ("n1 slots=8\nn1 slots=8\n", "host n1 is listed twice"),
                         ("bad/host slots=1\n", "line 1: 'bad/host' is not a host name"),
                         ("# nothing\n", "names no hosts")]:
        hostfile = tmp_path / "hosts"
        hostfile.write_text(text)
        res = cli("submit", "deepspeed", "--config", TINY, "--hostfile", str(hostfile), "--dry-run",
                     f"train.out_dir={out}")
        assert res.returncode == 1 and needle in res.stderr, res.stderr
    ok = cli("submit", "deepspeed", "--config", TINY, "--hosts", "node-1.cluster,10.1.2.3", "--master-addr",
                "fe80::1", "--dry-run", f"train.out_dir={out}")
    assert ok.returncode == 0, ok.stderr
    argv = shlex.split(ok.stdout.strip())
    assert argv[argv.index("--master_addr") + 1] == "fe80::1"


def test_submit_nodes_option_is_used_as_given(tmp_path, cli):
    res = cli("submit", "slurm", "--config", TINY, "--nodes", "3", "--dry-run", f"train.out_dir={tmp_path / 'r'}",
                 "launch.nodes=5")
    assert res.returncode == 0 and "#SBATCH --nodes=3" in res.stdout


# ------------------------------------------------------------------------------ a run folder from anywhere


def test_recorded_relative_paths_are_found_from_the_run_folder(tmp_path, monkeypatch):
    """A run older than absolute paths recorded `runs/demo/shards`: found from the checkpoint's ancestors."""
    from hiervl.run_dir import absolute_paths, find_recorded

    (tmp_path / "runs/demo/shards").mkdir(parents=True)
    ckpt = tmp_path / "runs/demo/train/checkpoints/step00000004"
    ckpt.mkdir(parents=True)
    monkeypatch.chdir(ckpt)
    assert find_recorded("runs/demo/shards", ckpt) == str(tmp_path / "runs/demo/shards")
    assert find_recorded("s3://bucket/shards", ckpt) == "s3://bucket/shards"
    assert find_recorded("runs/none", ckpt) == "runs/none"
    cfg = absolute_paths(load_config(TINY, ["data.path=rel/shards", "train.deepspeed_config=ds.json",
                                            "data.split=train"]))
    assert cfg.data.path == str(ckpt / "rel/shards") and cfg.train.deepspeed_config == str(ckpt / "ds.json")
    assert cfg.train.resume == "auto" and cfg.model.text.path == "default"


def _free_port() -> str:
    """launch.master_port for a run: a port free now, not the shared default 29500 (runs of other
    checkouts on this machine that picked it too would join this run's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"launch.master_port={sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def relative_run(one_rank_run):
    """`hiervl train` from directory A with relative data.path, train.out_dir and a user DeepSpeed
    JSON without "optimizer"; 7 steps, eval and checkpoint both every 3 steps, 4 warmup steps
    (conftest.py's `one_rank_run`, which test_monitoring.py checks too)."""
    return one_rank_run


@pytest.mark.integration
def test_eval_and_periodic_checkpoint_on_one_step_write_it_once(relative_run):
    log = (relative_run["out"] / "logs" / "rank0.log").read_text()
    assert log.count("checkpoint step00000003 written") == 1, log
    assert log.count("checkpoint step00000006 written") == 1, log
    assert len((relative_run["out"] / "eval.jsonl").read_text().splitlines()) == 2  # both evals ran


@pytest.mark.integration
def test_a_deepspeed_json_without_optimizer_trains_with_our_schedule(relative_run):
    metrics = {json.loads(line)["step"]: json.loads(line) for line in
               (relative_run["out"] / "metrics.jsonl").read_text().splitlines()}
    # linear warmup over 4 steps from 0 (our WarmupCosineLR: step s at 3e-4 * (s - 1) / 4), not the JSON's
    # missing scheduler's constant 3e-4
    assert metrics[2]["lr"] == pytest.approx(3e-4 / 4) and metrics[4]["lr"] == pytest.approx(3 * 3e-4 / 4)
    written = json.loads((relative_run["out"] / "deepspeed_config.json").read_text())
    assert "optimizer" not in written and written["scheduler"]["type"] == "WarmupCosineLR"
    assert written["steps_per_print"] == 1000


@pytest.mark.integration
def test_eval_and_search_work_from_another_directory(relative_run):
    out, shards, root = relative_run["out"], str(relative_run["shards"]), relative_run["root"]
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert stored["data"]["path"] == shards and stored["train"]["out_dir"] == str(out)
    meta = json.loads((out / "checkpoints" / "step00000006" / "meta.json").read_text())
    assert meta["config"]["data"]["path"] == shards

    b, c = root / "b", root / "c"
    b.mkdir(), c.mkdir()
    res = hiervl("eval", "--checkpoint", str(out), "--split", "test", "--no-diagnostics", cwd=b)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    index = json.loads((out / "eval-test" / "index.json").read_text())
    assert index["data"] == shards and index["checkpoint"] == str(out)
    res = hiervl("search", "a square moves", "--index", str(out / "eval-test"), "-k", "2", cwd=c)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "(2 of 2 videos with frames)" in res.stdout
