"""Per-sample media work with PyAV: read, probe, validate, decode, resample, resize, encode.

`process_sample(sample, prep)` returns `(video_bytes, ext, meta)` or raises `SampleRefused`
with the stage (`probe`, `validate`, `decode`, `transcode`) and a reason a user can act on.

Outputs are reproducible: the encoder runs single-threaded with bitexact flags, so the same
input and config give the same bytes (the shard writer's idempotence rests on it). Every
output has a keyframe at least every `prep.keyframe_interval` seconds so decoders can seek.

Owns: one sample's probe, validation, decoding and encoding, and `SampleRefused`.
Must not touch: tars, manifests or Ray.
"""

from __future__ import annotations

import io
import math
import os
from fractions import Fraction

import av

from pipeline.storage import is_remote, open_store, parent

OUTPUT = {"vp9": ("libvpx-vp9", "webm", "webm"), "h264": ("libx264", "mp4", "mp4")}
# container magic numbers: a file that starts like a video but will not open is truncated/corrupt
_MAGIC = (b"\x1a\x45\xdf\xa3", b"RIFF", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3", b"\x30\x26\xb2\x75", b"FLV")


class SampleRefused(Exception):
    """An input that cannot become a sample; quarantined with `stage` and `reason`."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason = stage, reason


def read_source(path: str) -> bytes:
    """The source file's bytes (local path or fsspec URL)."""
    if is_remote(path):  # s3://, gs://, http(s)://: pipeline/storage.py (retries, credentials from the env)
        store = open_store(parent(path))
        try:
            return store.read(path.rsplit("/", 1)[1])
        except FileNotFoundError:
            raise SampleRefused("probe", "missing file") from None
        except OSError as exc:  # retries exhausted
            raise SampleRefused("probe", f"cannot read ({exc})") from None
    if "://" in path and not path.startswith("file://"):
        import fsspec
        try:
            with fsspec.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise SampleRefused("probe", "missing file") from None
        except Exception as exc:  # network, auth, unknown protocol
            raise SampleRefused("probe", f"cannot read ({type(exc).__name__}: {exc})") from None
    path = path[len("file://"):] if path.startswith("file://") else path
    if not os.path.isfile(path):
        raise SampleRefused("probe", "missing file")
    with open(path, "rb") as f:
        return f.read()


def _looks_like_video(head: bytes) -> bool:
    return head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide") or any(head.startswith(m) for m in _MAGIC)


def probe(data: bytes) -> dict:
    """Container facts without decoding: duration, fps, size, codec. Refuses non-videos."""
    if not data:
        raise SampleRefused("probe", "zero-byte file")
    try:
        container = av.open(io.BytesIO(data))
    except (av.error.FFmpegError, EOFError, OSError) as exc:
        if _looks_like_video(data[:16]):
            raise SampleRefused("probe", f"truncated or corrupt video ({type(exc).__name__})") from None
        raise SampleRefused("probe", "not a video (no known container)") from None
    with container:
        if not container.streams.video:
            raise SampleRefused("probe", "no video stream")
        s = container.streams.video[0]
        rate = s.average_rate or s.guessed_rate
        duration = None
        if s.duration is not None and s.time_base is not None:
            duration = float(s.duration * s.time_base)
        elif container.duration is not None:
            duration = container.duration / 1e6
        return {"duration": duration, "fps": float(rate) if rate else None, "width": s.codec_context.width,
                "height": s.codec_context.height, "codec": s.codec_context.name,
                "format": container.format.name}


def _out_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    scale = short_side / min(width, height)
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def _decode_clip(data: bytes, start: float, end: float, fps: float, size: tuple[int, int]):
    """Frames resampled to `fps` on [start, end), resized to `size`, as yuv420p VideoFrames; and the
    time of the last decoded source frame (to tell a truncated file)."""
    n_out = max(1, int(math.floor((end - start) * fps + 1e-6)))
    targets = [start + i / fps for i in range(n_out)]  # output frame i shows the source at targets[i]
    out, prev, prev_small, last_t = [], None, None, None

    def small():  # resize the held frame once, only if it is used
        nonlocal prev_small
        if prev_small is None:
            prev_small = prev.reformat(width=size[0], height=size[1], format="yuv420p", interpolation="AREA",
                                        threads=1)  # swscale otherwise starts a thread per core
        return prev_small

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        if start > 1.0 and stream.time_base:
            container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
        rate = float(stream.average_rate or 25)
        for i, frame in enumerate(container.decode(stream)):
            t = frame.time if frame.time is not None else i / rate
            last_t = t
            # the held frame covers every target before this frame's time
            while prev is not None and len(out) < n_out and targets[len(out)] < t - 1e-6:
                out.append(small())
            if len(out) >= n_out:
                break
            prev, prev_small = frame, None
        while prev is not None and len(out) < n_out and targets[len(out)] < last_t + 1.0 / rate - 1e-6:
            out.append(small())
    return out, last_t


def encode(frames: list, codec: str, fps: float, crf: int, keyframe_interval: float) -> bytes:
    """Encode yuv420p frames to webm/VP9 or mp4/H.264 bytes, reproducibly."""
    enc, fmt, _ = OUTPUT[codec]
    gop = max(1, int(math.floor(keyframe_interval * fps + 1e-6)))
    buf = io.BytesIO()
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(buf, "w", format=fmt, options={"fflags": "+bitexact"}) as out:
        st = out.add_stream(enc, rate=rate)
        st.width, st.height = frames[0].width, frames[0].height
        st.pix_fmt = "yuv420p"
        st.codec_context.gop_size = gop
        opts = {"flags": "+bitexact", "threads": "1", "crf": str(crf), "g": str(gop)}
        if codec == "vp9":
            opts.update({"b": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "0", "lag-in-frames": "0",
                         "auto-alt-ref": "0"})
        else:
            opts.update({"preset": "veryfast", "tune": "zerolatency",
                         "x264-params": f"keyint={gop}:min-keyint=1:scenecut=0"})
        st.options = opts
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f.to_ndarray(), format="yuv420p") if f.pts != i else f
            frame.pts = i
            frame.time_base = Fraction(1) / rate
            for pkt in st.encode(frame):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return buf.getvalue()


def process_sample(sample: dict, prep: dict) -> tuple[bytes, str, dict]:
    """Probe, validate and transcode one sample per the prep config (a PrepConfig as a dict)."""
    data = read_source(sample["video"])
    info = probe(data)
    duration = info["duration"]
    start = float(sample.get("start") or 0.0)
    end = sample.get("end")
    if duration is not None and start >= duration:
        raise SampleRefused("validate", f"clip start {start:.2f}s is past the video's end ({duration:.2f}s)")
    end = float(end) if end is not None else duration
    if end is None:
        end = start + prep["max_seconds"]
    if duration is not None:
        end = min(end, duration)
    end = min(end, start + prep["max_seconds"])
    if end - start < prep["min_seconds"]:
        raise SampleRefused("validate", f"too short: {end - start:.2f}s < prep.min_seconds={prep['min_seconds']}")
    codec = prep["codec"]
    if codec == "copy":
        return _copy(data, info, sample, start, end, prep)
    size = _out_size(info["width"], info["height"], prep["short_side"])
    try:
        frames, last_t = _decode_clip(data, start, end, prep["fps"], size)
    except (av.error.FFmpegError, EOFError, OSError, ValueError) as exc:
        raise SampleRefused("decode", f"decode error ({type(exc).__name__}: {exc})") from None
    if not frames or last_t is None:
        raise SampleRefused("decode", "no decodable frames (truncated or corrupt)")
    step = 1.0 / (info["fps"] or prep["fps"])
    if last_t + 2 * step < min(end, duration or end) - max(0.25, 2 * step):
        raise SampleRefused("decode", f"truncated: frames end at {last_t:.2f}s of {end:.2f}s")
    try:
        blob = encode(frames, codec, prep["fps"], prep["crf"], prep["keyframe_interval"])
    except (av.error.FFmpegError, ValueError) as exc:
        raise SampleRefused("transcode", f"encode error ({type(exc).__name__}: {exc})") from None
    meta = {"num_frames": len(frames), "fps": float(prep["fps"]), "width": size[0], "height": size[1],
            "duration": len(frames) / float(prep["fps"]), "codec": codec, "source_duration": end - start}
    return blob, OUTPUT[codec][2], meta


def _copy(data: bytes, info: dict, sample: dict, start: float, end: float, prep: dict):
    """codec=copy: keep the source bytes when they are VP9/VP8 webm or H.264 mp4 and need no cut."""
    if sample.get("start") is not None or sample.get("end") is not None or (info["duration"] or 0) > prep["max_seconds"]:
        raise SampleRefused("transcode", "prep.codec=copy cannot cut a clip; use prep.codec=vp9 or h264")
    if info["codec"] in ("vp9", "vp8") and "webm" in info["format"]:
        ext = "webm"
    elif info["codec"] == "h264" and "mp4" in info["format"]:
        ext = "mp4"
    else:
        raise SampleRefused("transcode", f"prep.codec=copy needs VP9 webm or H.264 mp4, got {info['codec']} "
                                         f"in {info['format']}; use prep.codec=vp9")
    try:
        with av.open(io.BytesIO(data)) as c:
            n, last_t = 0, None
            for frame in c.decode(video=0):
                n, last_t = n + 1, frame.time
    except (av.error.FFmpegError, EOFError, OSError) as exc:
        raise SampleRefused("decode", f"decode error ({type(exc).__name__})") from None
    if n == 0:
        raise SampleRefused("decode", "no decodable frames (truncated or corrupt)")
    fps = info["fps"] or prep["fps"]
    if info["duration"] and (last_t or 0) + 2.0 / fps < info["duration"] - max(0.25, 2.0 / fps):
        raise SampleRefused("decode", f"truncated: frames end at {last_t:.2f}s of {info['duration']:.2f}s")
    meta = {"num_frames": n, "fps": float(fps), "width": info["width"], "height": info["height"],
            "duration": n / float(fps), "codec": info["codec"], "source_duration": end - start}
    return data, ext, meta
