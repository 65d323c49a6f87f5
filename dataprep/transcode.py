"""Per-sample media work with PyAV: read, probe, validate, decode, resample, resize, encode.

`process_sample(sample, prep)` returns `(video_bytes, ext, meta)` or raises `SampleRefused`
with the stage (`probe`, `validate`, `decode`, `transcode`) and a reason a user can act on.

The source is streamed (FFmpeg reads the local file, or PyAV a ranged-read file object from the
store for an s3:// / gs:// / http(s):// URL, pipeline/storage.py, in blocks),
never read whole, so memory does not grow with its size. Frames come out upright: a display
matrix (a phone's rotation) is applied before resizing. Before a demuxer sees a local path it is
checked: missing (the reason names the absolute path it looked for), a directory, a symlink loop,
a broken symlink, not a regular file, zero bytes; a still image (PNG, JPEG) is "not a video".
A container that reports a duration of 0 is treated as of unknown duration: its frames decide.

Outputs are reproducible: the encoder runs single-threaded with bitexact flags, so the same
input and config give the same bytes (the shard writer's idempotence rests on it). Every
output has a keyframe at least every `prep.keyframe_interval` seconds so decoders can seek.

Owns: one sample's probe, validation, decoding and encoding, and `SampleRefused`.
Must not touch: tars, manifests or Ray.
"""

from __future__ import annotations

import errno
import io
import math
import os
import signal
import stat
from contextlib import contextmanager
from fractions import Fraction

import av
import numpy as np
from hiervl import faults
from hiervl.data.video_file import looks_like_video, truncation, upright_turns
from hiervl.storage import as_local_path, is_remote, open_store, parent

OUTPUT = {"vp9": ("libvpx-vp9", "webm", "webm"), "h264": ("libx264", "mp4", "mp4")}


class SampleRefused(Exception):
    """An input that cannot become a sample; quarantined with `stage` and `reason`."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason = stage, reason


_SEE_VIDEOS = "a relative path in the input resolves against --videos DIR when given, else the manifest's folder"
_IMAGE_DEMUXERS = ("image2",)  # plus every "*_pipe" demuxer (png_pipe, jpeg_pipe, ...): still images


def _local_path(path: str) -> str:
    """A local path checked for what can go wrong before a demuxer sees it; SampleRefused otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise SampleRefused("probe", f"broken symlink ({path} -> {os.readlink(path)})") from None
        raise SampleRefused("probe", f"missing file (looked for {os.path.abspath(path)}; {_SEE_VIDEOS})") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SampleRefused("probe", f"symlink loop ({path}: too many levels of symbolic links)") from None
        raise SampleRefused("probe", f"cannot read ({path}: {exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise SampleRefused("probe", f"a directory, not a video file ({path})")
    if not stat.S_ISREG(st.st_mode):
        raise SampleRefused("probe", f"not a regular file ({path}: a FIFO, socket or device)")
    if st.st_size == 0:
        raise SampleRefused("probe", "zero-byte file")
    if not os.access(path, os.R_OK):
        raise SampleRefused("probe", f"cannot read ({path}: permission denied)")
    return path


@contextmanager
def open_source(path: str):
    """What `av.open` reads the source through: a local path (FFmpeg's file protocol reads it in
    small blocks) or, for an s3:// / gs:// / http(s):// URL, a seekable file from the store
    (pipeline/storage.py `open_input`: ranged reads with retries and credentials from the
    environment; PyAV reads and seeks it). The source is never read whole into memory, so a
    worker's memory does not grow with the source's size."""
    if is_remote(path):  # a wrong key or a missing bucket is a UserError: it stops the run in one line
        try:
            f = open_store(parent(path)).open_input(path.rsplit("/", 1)[1])
        except FileNotFoundError:
            raise SampleRefused("probe", f"missing file (looked for {path})") from None
        except OSError as exc:  # retries exhausted
            raise SampleRefused("probe", f"cannot read ({exc})") from None
        try:
            yield f
        finally:
            f.close()
        return
    local = as_local_path(path)  # file:// is a local path (storage.py: the one URL test)
    if "://" in local:  # neither local nor a store's URL (ftp://, ...)
        scheme = local.split("://", 1)[0]
        raise SampleRefused("probe", f"unsupported URL scheme {scheme}:// ({path}); give a local path or an "
                                     "s3://, gs:// or http(s):// URL")
    yield _local_path(local)


def _av_open(src):
    if not isinstance(src, str):
        src.seek(0)
    return av.open(src)


def _head(src, n: int = 16) -> bytes:
    if isinstance(src, str):
        with open(src, "rb") as f:
            return f.read(n)
    src.seek(0)
    return src.read(n)


def _read_all(src) -> bytes:
    """The whole source (only prep.codec=copy needs it: those bytes are its output)."""
    if isinstance(src, str):
        with open(src, "rb") as f:
            return f.read()
    src.seek(0)
    return src.read()


def probe(src) -> dict:
    """Container facts without decoding: duration (None when unknown or reported as 0), fps, size,
    codec. Refuses non-videos. `src` is what `open_source` yields."""
    head = _head(src)
    if not head:
        raise SampleRefused("probe", "zero-byte file")
    try:
        container = _av_open(src)
    except (av.error.FFmpegError, EOFError, OSError) as exc:
        if looks_like_video(head):
            raise SampleRefused("probe", f"truncated or corrupt video ({type(exc).__name__})") from None
        raise SampleRefused("probe", "not a video (no known container)") from None
    with container:
        fmt = container.format.name
        if fmt in _IMAGE_DEMUXERS or fmt.endswith("_pipe"):
            kind = fmt[:-5].upper() if fmt.endswith("_pipe") else "still"
            raise SampleRefused("probe", f"not a video (a {kind} image; give a video file)")
        if not container.streams.video:
            raise SampleRefused("probe", "no video stream")
        s = container.streams.video[0]
        rate = s.average_rate or s.guessed_rate
        duration = None
        if s.duration is not None and s.time_base is not None:
            duration = float(s.duration * s.time_base)
        elif container.duration is not None:
            duration = container.duration / 1e6
        if duration is not None and duration <= 0:  # broken metadata: decode and see how long it is
            duration = None
        return {"duration": duration, "fps": float(rate) if rate else None, "width": s.codec_context.width,
                "height": s.codec_context.height, "codec": s.codec_context.name, "format": fmt}


def _upright_turns(frame) -> int:
    """Quarter turns counter-clockwise (np.rot90's k) that show `frame` upright, from its display
    matrix (the one rule: pipeline/data/video_file.py `upright_turns`)."""
    return upright_turns(getattr(frame, "rotation", 0))


def _truncation(src) -> str | None:
    """'truncated: ...' when the file's packets stop short of what its container lists (the one rule
    of pipeline/data/video_file.py, also used by the API and `search index`), else None."""
    try:
        with _av_open(src) as container:
            return truncation(container, container.streams.video[0])
    except Exception:  # noqa: BLE001 - not even demuxable: the caller's own reason stands
        return None


def _out_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    scale = short_side / min(width, height)
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def _decode_clip(src, start: float, end: float, fps: float, short_side: int):
    """Frames resampled to `fps` on [start, end), upright (display matrix applied), resized to a
    short side of `short_side`, as yuv420p VideoFrames; and the time of the last decoded source
    frame (to tell a truncated file). `src` is what `open_source` yields."""
    n_out = max(1, int(math.floor((end - start) * fps + 1e-6)))
    targets = [start + i / fps for i in range(n_out)]  # output frame i shows the source at targets[i]
    out, prev, prev_small, last_t = [], None, None, None
    size, turns = None, 0  # output (width, height), upright; quarter turns from the first frame

    def small():  # resize the held frame once, only if it is used
        nonlocal prev_small
        if prev_small is None:
            if turns == 0:
                prev_small = prev.reformat(width=size[0], height=size[1], format="yuv420p", interpolation="AREA",
                                            threads=1)  # swscale otherwise starts a thread per core
            else:  # resize as stored, turn upright as RGB ([H, W, 3]), back to yuv420p
                w, h = (size[1], size[0]) if turns % 2 else size
                rgb = prev.reformat(width=w, height=h, format="rgb24", interpolation="AREA", threads=1).to_ndarray()
                upright = np.ascontiguousarray(np.rot90(rgb, turns))
                prev_small = av.VideoFrame.from_ndarray(upright, format="rgb24").reformat(format="yuv420p", threads=1)
        return prev_small

    with _av_open(src) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        if start > 1.0 and stream.time_base:
            container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
        rate = float(stream.average_rate or 25)
        for i, frame in enumerate(container.decode(stream)):
            if size is None:
                turns = _upright_turns(frame)
                w, h = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
                size = _out_size(w, h, short_side)
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


def _injected_decoder_fault(path: str) -> None:
    """Tests only (pipeline/faults.py): the decoder of a file whose path contains $HIERVL_FAULT_MATCH
    hangs in a blocking read that never returns (`decode-hang`) or dies of SIGSEGV (`decode-crash`),
    as FFmpeg does on some corrupt files; only a watchdog that kills the process gets past it."""
    match = os.environ.get("HIERVL_FAULT_MATCH")
    if not match or match not in path:
        return
    if faults.injected("decode-hang"):
        read_end, _write_end = os.pipe()
        os.read(read_end, 1)  # blocks in the kernel forever: nobody writes, the write end stays open
    if faults.injected("decode-crash"):
        os.kill(os.getpid(), signal.SIGSEGV)


def process_sample(sample: dict, prep: dict) -> tuple[bytes, str, dict]:
    """Probe, validate and transcode one sample per the prep config (a PrepConfig as a dict)."""
    _injected_decoder_fault(sample["video"])
    with open_source(sample["video"]) as src:
        return _process(src, sample, prep)


def _process(src, sample: dict, prep: dict) -> tuple[bytes, str, dict]:
    info = probe(src)
    duration = info["duration"]  # None: unknown (or reported as 0): the decoded frames tell
    start = float(sample.get("start") or 0.0)
    end = sample.get("end")
    if start < 0:
        raise SampleRefused("validate", f"clip start {start:.2f}s is negative; clips start at 0 or later")
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
        return _copy(src, info, sample, start, end, prep)
    try:
        frames, last_t = _decode_clip(src, start, end, prep["fps"], prep["short_side"])
    except (av.error.FFmpegError, EOFError, OSError, ValueError) as exc:
        raise SampleRefused("decode", _truncation(src) or f"decode error ({type(exc).__name__}: {exc})") from None
    if last_t is None:
        raise SampleRefused("decode", "no decodable frames (truncated or corrupt)")
    if not frames:
        raise SampleRefused("validate", f"clip start {start:.2f}s is past the last frame ({last_t:.2f}s)")
    step = 1.0 / (info["fps"] or prep["fps"])
    if duration is not None and last_t + 2 * step < min(end, duration) - max(0.25, 2 * step):
        raise SampleRefused("decode", f"truncated: frames end at {last_t:.2f}s of {end:.2f}s")
    if duration is None and len(frames) / float(prep["fps"]) < prep["min_seconds"]:
        raise SampleRefused("validate", f"too short: {len(frames) / float(prep['fps']):.2f}s of frames < "
                                        f"prep.min_seconds={prep['min_seconds']}")
    try:
        blob = encode(frames, codec, prep["fps"], prep["crf"], prep["keyframe_interval"])
    except (av.error.FFmpegError, ValueError) as exc:
        raise SampleRefused("transcode", f"encode error ({type(exc).__name__}: {exc})") from None
    source_s = end - start if duration is not None else min(end - start, last_t + step - start)
    meta = {"num_frames": len(frames), "fps": float(prep["fps"]), "width": frames[0].width,
            "height": frames[0].height, "duration": len(frames) / float(prep["fps"]), "codec": codec,
            "source_duration": source_s}
    return blob, OUTPUT[codec][2], meta


def _copy(src, info: dict, sample: dict, start: float, end: float, prep: dict):
    """codec=copy: keep the source bytes when they are VP9/VP8 webm or H.264 mp4 and need no cut or turn.
    The only mode that holds a whole source in memory: those bytes are its output."""
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
        with _av_open(src) as c:
            n, last_t, turns = 0, None, 0
            for frame in c.decode(video=0):
                n, last_t = n + 1, frame.time
                turns = turns or _upright_turns(frame)
    except (av.error.FFmpegError, EOFError, OSError) as exc:
        raise SampleRefused("decode", _truncation(src) or f"decode error ({type(exc).__name__})") from None
    if n == 0:
        raise SampleRefused("decode", "no decodable frames (truncated or corrupt)")
    if turns:
        raise SampleRefused("transcode", "prep.codec=copy cannot turn a rotated video upright (its display "
                                         "matrix says so); use prep.codec=vp9 or h264")
    fps = info["fps"] or prep["fps"]
    if info["duration"] and (last_t or 0) + 2.0 / fps < info["duration"] - max(0.25, 2.0 / fps):
        raise SampleRefused("decode", f"truncated: frames end at {last_t:.2f}s of {info['duration']:.2f}s")
    data = _read_all(src)
    meta = {"num_frames": n, "fps": float(fps), "width": info["width"], "height": info["height"],
            "duration": n / float(fps), "codec": info["codec"], "source_duration": end - start}
    return data, ext, meta
