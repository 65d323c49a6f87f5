"""The hybrid split: how many of a batch's DALI-decodable samples the PyAV process pool takes.

On a GPU node two decoders run at once: DALI (`mixed`, NVDEC) in the loader's producer thread,
and the PyAV worker processes on the CPU cores (decode_pool.py). For each batch the loader gives
the pool `pool_share(n)` of the n samples DALI could decode and DALI the rest, so both finish
together: the pool's share is its throughput over the sum of both,

    share = r_pool / (r_pool + r_dali)

with r_dali an EWMA of clips / second over DALI's runs (decode + transform), and r_pool the
pool's own estimate (workers / EWMA seconds per clip, DecodePool.clips_per_s). Both rates are
measured on the running job, so the split follows what each decoder really delivers (a slower
codec, a busy CPU, a second rank on the node). Before both are measured the split is half and
half; while n >= 2 each decoder keeps at least one sample per batch, so neither rate goes stale.

The split changes *who* decodes a sample, never which sample sits in which slot: order,
positions and resume are the sampler's alone. Pixels may differ by decoder (DALI vs PyAV: mean
|diff| ~1/255 on VP9 on CPU, 1.6/255 on H.264 with NVDEC), so a bit-exact replay of pixels needs
`data.decoder=pyav` (or dali); the samples, captions and augmentation draws are the same anyway.

Owns: the split rule and the DALI throughput estimate. Must not touch: decoding or order.
"""

from __future__ import annotations


class DecoderSplit:
    """Adaptive share of DALI-decodable samples sent to the PyAV process pool."""

    def __init__(self, smoothing: float = 0.3):
        self.smoothing = smoothing
        self.dali_rate: float | None = None  # clips / s

    def record_dali(self, clips: int, seconds: float) -> None:
        if clips <= 0 or seconds <= 0:
            return
        rate = clips / seconds
        a = self.smoothing
        self.dali_rate = rate if self.dali_rate is None else (1 - a) * self.dali_rate + a * rate

    def pool_share(self, n: int, pool_rate: float | None) -> int:
        """How many of `n` DALI-decodable samples go to the pool (0..n)."""
        if n <= 0:
            return 0
        if self.dali_rate is None or pool_rate is None:
            share = 0.5
        else:
            share = pool_rate / (pool_rate + self.dali_rate)
        k = int(round(n * share))
        return min(max(k, 1), n - 1) if n >= 2 else k
