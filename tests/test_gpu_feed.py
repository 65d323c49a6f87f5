"""The hybrid decoders on a GPU, checked by `make gpu-check` (skipped where CUDA is absent, as in CI).

DALI `mixed` (NVDEC) and PyAV worker processes decode one eval batch of the H.264 GPU test data
($HIERVL_GPU_DATA, bench/gpu_data.py) together: the keys are the CPU reference batch's, both decoders
took part, the video arrives on the GPU (the pool's clips in one pinned, asynchronous copy) and its
pixels match the CPU loader's PyAV pixels. Needs PyAV on the GPU machine (bench/gpu_prepare.sh brings it).
"""

import os
from pathlib import Path

import pytest
import torch
from hiervl.model.text_model import load_tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HIERVL_GPU_DATA", ROOT / ".dev" / "gpu-data"))


def test_dali_mixed_and_pyav_processes_fill_one_gpu_batch_that_matches_the_cpu_reference():
    pytest.importorskip("av", reason="PyAV is not installed here: carry .dev/av (bench/gpu_prepare.sh)")
    from hiervl.config import load_config
    from hiervl.data.loader import VideoTextLoader

    if not (DATA / "reference.pt").is_file():
        pytest.fail(f"no GPU test data at {DATA}: run `.venv/bin/python bench/gpu_data.py` on a CPU machine")
    ref = torch.load(DATA / "reference.pt", weights_only=False)
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"data.path={DATA / 'shards'}", "data.device=gpu",
                                                   "data.decode_workers=2", f"model.text.path={DATA / 'text'}"])
    loader = VideoTextLoader(cfg, split="test", train=False, batch_size=len(ref["keys"]), tokenizer=load_tokenizer(cfg.model.text.path))
    try:
        batch = next(iter(loader))
        assert loader.hybrid and batch["keys"] == ref["keys"] and bool(batch["valid"].all())
        assert batch["video"].is_cuda
        assert loader.stats["decode_path"]["dali"] > 0 and loader.stats["pool_decoded"] > 0, loader.stats
        std = torch.tensor(cfg.data.std).view(1, 1, 3, 1, 1)
        diff = ((batch["video"].float().cpu() - ref["video"].float()).abs() * std * 255).mean().item()
        assert diff < 4.0, f"hybrid frames differ from the CPU reference by {diff:.2f}/255 on average"
    finally:
        loader.close()
