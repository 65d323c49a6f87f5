"""Video decoding for the loader: DALI (`fn.decoders.video`) or PyAV, then one shared transform.

Both decoders take encoded bytes plus the frame indices to keep and return the same thing:
uint8 RGB frames [T, H, W, 3]. `transform_clip` then resizes the short side, crops, flips and
normalises, identically for both paths, giving [T, C, size, size].

- DALI: a pipeline `fn.external_source` (bytes, frame indices) -> `fn.decoders.video`, `cpu`
  backend on a CPU-only machine (VP8/VP9/MJPEG only) and `mixed` (NVDEC, any codec) on a GPU.
  We feed it ourselves, so the order and position stay ours (DALI refuses checkpointing with
  the video decoder). A DALI pipeline is unusable after an error, so a failing batch is
  rebuilt and retried sample by sample to name the bad one.
- PyAV: the fallback for codecs DALI's CPU backend lacks (H.264, HEVC) or when DALI is not
  installed. It demuxes once, decodes only the GOPs holding a wanted frame (seeking to their
  keyframes) and converts only the wanted frames to RGB.

Owns: DALI and PyAV decoding and the frame transform.
Must not touch: the order of samples or the manifest.
"""

from __future__ import annotations

import bisect
import importlib.util
import io

import numpy as np
import torch
import torch.nn.functional as F

DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def choose_backend(decoder: str, codec: str, device: str, has_dali: bool | None = None, workers: int = 0) -> str:
    """'dali' or 'pyav' for one sample. decoder: auto|dali|pyav; device: cpu|gpu (resolved); workers: the
    loader's PyAV decode processes.

    auto on a CPU machine with decode workers: PyAV in the workers, never DALI's CPU backend, which
    measured no cheaper at 64 px and 1.25x the workers' CPU per clip at 256 px, and runs inside the
    trainer's process (bench/RESULTS.md "Issue #27"). On a GPU, auto is DALI mixed (NVDEC).
    """
    has_dali = dali_available() if has_dali is None else has_dali
    dali_ok = has_dali and (device == "gpu" or codec.lower() in DALI_CPU_CODECS)
    if decoder == "pyav" or (decoder == "auto" and device == "cpu" and workers > 0):
        return "pyav"
    if decoder == "dali":
        if not has_dali:
            raise RuntimeError("data.decoder=dali but nvidia-dali is not installed; install "
                               "nvidia-dali-cuda120 or set data.decoder=auto")
        if not dali_ok:
            # DALI was asked for but cannot decode this codec here: the fallback keeps the run going
            return "pyav"
        return "dali"
    return "dali" if dali_ok else "pyav"


# ---------------------------------------------------------------------------- PyAV


def decode_pyav(data: bytes, frames: np.ndarray, strict: bool = False) -> np.ndarray:
    """Frames `frames` (display-order indices) of an encoded video, uint8 [T, H, W, 3], as stored
    (a user's file is turned upright by pipeline/data/video_file.py). A wanted frame the stream
    does not give is replaced by the nearest decoded one, or, with `strict`, a ValueError that
    starts "truncated"."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.size > 0 and p.pts is not None]
        if not packets:
            raise ValueError("no video packets")
        pts_sorted = sorted(p.pts for p in packets)  # display order
        n = len(pts_sorted)
        wanted = [pts_sorted[min(max(int(f), 0), n - 1)] for f in frames]
        key_idx = [i for i, p in enumerate(packets) if p.is_keyframe] or [0]
        key_pts = [packets[i].pts for i in key_idx]
        ctx = stream.codec_context
        ctx.thread_count = 1  # parallelism is across samples; codec threads only add overhead on tiny clips
        got: dict[int, np.ndarray] = {}
        need = set(wanted)
        cursor = None  # next packet (decode order) to feed
        for target in sorted(need):
            if target in got:
                continue
            # the GOP holding `target`: the last keyframe shown at or before it
            gop = key_idx[max(bisect.bisect_right(key_pts, target) - 1, 0)]
            if cursor is None or gop > cursor:
                ctx.flush_buffers()
                cursor = gop
            while target not in got and cursor <= len(packets):
                pkt = packets[cursor] if cursor < len(packets) else None  # None: drain
                cursor += 1
                for frame in ctx.decode(pkt):
                    if frame.pts in need and frame.pts not in got:
                        got[frame.pts] = frame.to_ndarray(format="rgb24", threads=1)  # no swscale thread pool
            if target not in got:
                break
    if not got:
        raise ValueError("no frame decoded")
    missing = [i for i, pts in enumerate(wanted) if pts not in got]
    if strict and missing:
        raise ValueError(f"truncated: frame {int(frames[missing[0]])} of {n} could not be decoded")
    # a frame the stream would not give (truncated tail): use the nearest one decoded
    have = sorted(got)
    out = []
    for pts in wanted:
        if pts not in got:
            j = min(bisect.bisect_left(have, pts), len(have) - 1)
            pts = have[j]
        out.append(got[pts])
    return np.stack(out)  # [T, H, W, 3]


# ---------------------------------------------------------------------------- DALI


class DaliVideoDecoder:
    """A DALI pipeline fed (bytes, frame indices) per sample; outputs frames [T, H, W, 3].

    device 'cpu' returns numpy uint8 arrays; 'gpu' (mixed backend, NVDEC) returns torch uint8
    tensors on cuda:`device_id`.
    """

    def __init__(self, max_batch: int, num_threads: int = 2, device: str = "cpu", device_id: int | None = None):
        self.max_batch = max_batch
        self.num_threads = num_threads
        self.device = device
        self.device_id = device_id if device == "gpu" else None
        self._pipe = None
        self._stream = None  # the loader's own CUDA stream for the copies out of DALI (device gpu)

    def _build(self):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        pipe = Pipeline(batch_size=self.max_batch, num_threads=self.num_threads, device_id=self.device_id,
                        exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            video = fn.decoders.video(encoded, frames=frames, pad_mode="edge",  # an index past the end: last frame
                                      device="mixed" if self.device == "gpu" else "cpu")
            pipe.set_outputs(video)
        pipe.build()
        self._pipe = pipe

    def _run(self, blobs: list[np.ndarray], frames: list[np.ndarray]) -> list:
        if self._pipe is None:
            self._build()
        self._pipe.feed_input("encoded", blobs)
        self._pipe.feed_input("frames", frames)
        (out,) = self._pipe.run()
        if self.device == "gpu":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            # the copies out of DALI's buffers run on a stream of the loader's own, and only they are waited
            # for (an event), not the training stream's queued forward/backward kernels; each clip is then
            # marked as used by the consumer's stream, so its memory is not reused before that stream is done
            dev = torch.device("cuda", self.device_id)
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=dev)
            results = []
            with torch.cuda.stream(self._stream):
                for i in range(len(blobs)):
                    t = out[i]
                    dst = torch.empty(t.shape(), dtype=torch.uint8, device=dev)
                    feed_ndarray(t, dst, cuda_stream=self._stream)
                    results.append(dst)
                done = torch.cuda.Event()
                done.record(self._stream)
            done.synchronize()  # this batch's copies only (DALI reuses its output buffers after the next run)
            consumer = torch.cuda.current_stream(dev)
            for dst in results:
                dst.record_stream(consumer)
            return results
        return [np.array(out.at(i)) for i in range(len(blobs))]  # copies: DALI reuses its buffers

    def decode(self, blobs: list[bytes], frames: list[np.ndarray]) -> list:
        """One result per sample: frames [T, H, W, 3], or the Exception that sample raised."""
        arrays = [np.frombuffer(b, dtype=np.uint8) for b in blobs]
        frames = [np.asarray(f, dtype=np.int32) for f in frames]
        results: list = []
        for lo in range(0, len(arrays), self.max_batch):
            chunk, fr = arrays[lo:lo + self.max_batch], frames[lo:lo + self.max_batch]
            try:
                results.extend(self._run(chunk, fr))
            except Exception:  # noqa: BLE001 - a bad sample; find which, one by one
                self._pipe = None
                for a, f in zip(chunk, fr):
                    try:
                        results.extend(self._run([a], [f]))
                    except Exception as exc:  # noqa: BLE001
                        self._pipe = None
                        results.append(RuntimeError(_first_line(exc)))
        return results


def _first_line(exc: Exception) -> str:
    """The informative line of a DALI error (it comes wrapped in pipeline tracebacks)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "failed" in ln.lower() and not ln.startswith(("Error in", "Critical")):
            return ln[:300]
    return (lines[0] if lines else type(exc).__name__)[:300]


# ---------------------------------------------------------------------------- transform


def _resize_crop(x: torch.Tensor, short_side: int, size: int, crop: tuple[float, float], flip: bool) -> torch.Tensor:
    """[T, 3, H, W] -> [T, 3, size, size], same dtype: short side to `short_side` (bilinear, antialiased
    when shrinking), crop at the relative position `crop` = (y, x), optionally flipped horizontally."""
    h, w = x.shape[-2:]
    scale = short_side / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=nh < h)
    top = int(round(crop[0] * (nh - size)))
    left = int(round(crop[1] * (nw - size)))
    x = x[..., top:top + size, left:left + size]  # [T, 3, size, size]
    return x.flip(-1) if flip else x


def resize_crop_uint8(frames: torch.Tensor | np.ndarray, short_side: int, size: int,
                      crop: tuple[float, float] = (0.5, 0.5), flip: bool = False) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] on the CPU -> uint8 [T, 3, size, size], contiguous.

    The resize runs once, in uint8, on the channels-last view of the decoded frames: no float copy of
    the full-size frames (that copy and a float resize cost ~10-20x this on 64-256 px frames). This is
    what the decode workers send (a quarter of float32's bytes) and what `normalize_clip` turns into
    the model's input while the batch is assembled.
    """
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or x.is_cuda:
        raise TypeError(f"resize_crop_uint8 takes uint8 CPU frames, got {x.dtype} on {x.device}")
    return _resize_crop(x.permute(0, 3, 1, 2), short_side, size, crop, flip).contiguous()


def normalize_clip(clip: torch.Tensor, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), dtype: torch.dtype = torch.float32,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [..., 3, S, S] -> (x / 255 - mean) / std in `dtype`, computed in float32, written into `out`
    when given (a batch slot: no intermediate copy for float32). The same arithmetic whichever path
    calls it, so pixels do not depend on where a clip was decoded."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=clip.device).view(3, 1, 1) * 255.0
    s = torch.as_tensor(std, dtype=torch.float32, device=clip.device).view(3, 1, 1) * 255.0
    if out is None:
        out = torch.empty(clip.shape, dtype=dtype, device=clip.device)
    if out.dtype == torch.float32:
        torch.sub(clip, m, out=out)
        out.div_(s)
    else:
        out.copy_((clip.float() - m) / s)
    return out


def transform_clip(frames: torch.Tensor | np.ndarray, short_side: int, size: int, crop: tuple[float, float] = (0.5, 0.5),
                   flip: bool = False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> normalised [T, 3, size, size].

    Resize so the short side is `short_side` (bilinear, antialiased), crop `size` x `size` at the
    relative position `crop` = (y, x) in [0, 1] (0.5 = centre), optionally flip horizontally,
    then (x / 255 - mean) / std. uint8 CPU frames are resized in uint8 (`resize_crop_uint8`, then
    `normalize_clip`); GPU frames (DALI mixed) and float frames in float32.
    """
    x = torch.as_tensor(frames)
    if x.dtype == torch.uint8 and not x.is_cuda:
        return normalize_clip(resize_crop_uint8(x, short_side, size, crop, flip), mean, std, dtype)
    x = _resize_crop(x.permute(0, 3, 1, 2).float(), short_side, size, crop, flip)  # [T, 3, size, size]
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255.0
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255.0
    return ((x - m) / s).to(dtype)
