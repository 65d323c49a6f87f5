"""The per-clip transform, before and after issue 27, paired: float resize of the full frames vs one uint8
resize at the target size (what the decode workers and the loader's threads now do).

    .venv/bin/python bench/transform.py [--rounds 5] [--clips 40]

`before`: `transform_clip` as it was: frames [T, H, W, 3] uint8 -> float32 copy of the full frames ->
bilinear antialiased resize in float -> crop -> normalise (the float branch of `transform_clip`, which
GPU frames still take). `after`: `resize_crop_uint8` (resize in uint8, channels-last) then
`normalize_clip` into a preallocated batch slot. T = 8 frames; torch with 1 thread (as in a decode
worker). Frame sizes 64 and 256 px to the tiny config's crop (short side 36, crop 32), and 256 px to
base.yaml's (224 / 224). CPU ms per clip (`time.process_time`), rounds alternate before/after.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from hiervl.data.decode import normalize_clip, resize_crop_uint8, transform_clip

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def before(frames, short, size, out):
    out.copy_(transform_clip(torch.as_tensor(frames).float(), short, size, (0.3, 0.6), True, MEAN, STD))


def after(frames, short, size, out):
    normalize_clip(resize_crop_uint8(frames, short, size, (0.3, 0.6), True), MEAN, STD, out=out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clips", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    for px, short, size in ((64, 36, 32), (256, 36, 32), (256, 224, 224)):
        frames = [rng.integers(0, 256, (8, px, px, 3), dtype=np.uint8) for _ in range(4)]
        out = torch.empty(8, 3, size, size)
        got = {"before": [], "after": []}
        for r in range(args.rounds + 1):
            for name, fn in (("before", before), ("after", after)):
                t0 = time.process_time()
                for i in range(args.clips):
                    fn(frames[i % 4], short, size, out)
                if r:  # round 0 warms up
                    got[name].append(1000 * (time.process_time() - t0) / args.clips)
        ratio = sorted(b / a for b, a in zip(got["before"], got["after"]))
        med = {k: statistics.median(v) for k, v in got.items()}
        print(f"{px:3d} px -> short {short}, crop {size}: before {med['before']:6.2f} ms/clip, after {med['after']:5.2f} "
              f"ms/clip; paired before/after min {ratio[0]:.1f} / med {statistics.median(ratio):.1f} / max {ratio[-1]:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
