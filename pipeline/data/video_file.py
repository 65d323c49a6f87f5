"""A video file a user hands us: probed, checked for truncation and decoded upright, one way.

`hiervl prep` (dataprep/transcode.py), `hiervl.load(...).encode_video(path)`, `hiervl search index
--videos` and the search contact sheets all read user files through this module, so a phone video
(landscape frames + a display matrix) comes out upright everywhere, and a file cut short (an
interrupted download or copy) is refused everywhere with a reason that starts "truncated".

    info = probe_video_file(data, "clip.mp4")   # VideoFileInfo(frames, codec, turns); UserError if unusable
    frames = decode_video_file(data, frame_indices(info.frames, 8, None), "clip.mp4")  # uint8 [T, H, W, 3]

Truncation, told without decoding everything: the container's own frame count (MP4's sample
table, which survives when the data after it is cut) is larger than the packets present, a
packet is flagged corrupt (cut mid-packet), or the packets end well before the stated duration.
A file whose header is lost as well (an MP4 with its index at the end, cut) does not open: that
is "truncated or corrupt". Decoding a wanted frame that the stream does not give is refused the
same way (the loader, for prepared shards, takes the nearest frame instead: `decode_pyav`).

Frame size: decoding outside prep holds each wanted frame whole as RGB (data.num_frames of them,
3 bytes a pixel, plus the decoder's own buffers), so a frame above MAX_PIXELS (8K UHD, 7680 x 4320:
about 100 MB of RGB) is refused from its header, before any frame is decoded (a 16384 x 16384
stream would need 0.8 GB a frame). `hiervl prep` streams and scales frames one at a time: it takes them.

Owns: what a user's video file must be to be used, and the wording of why not.
Must not touch: prepared shards (the loader), the frame plan (sampler), resizing (transform_clip).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from hiervl.errors import UserError

TRUNCATED = "truncated"  # the word every refusal of a cut-short file starts with
MAX_PIXELS = 7680 * 4320  # the largest frame (width x height) decoded whole outside prep: 8K UHD
# container magic numbers: a file that starts like a video but will not open is truncated/corrupt
_MAGIC = (b"\x1a\x45\xdf\xa3", b"RIFF", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3", b"\x30\x26\xb2\x75", b"FLV")


def looks_like_video(head: bytes) -> bool:
    """Whether a file's first bytes are a video container's (MP4/MOV boxes, Matroska/WebM, AVI, MPEG-PS/ES, ASF, FLV)."""
    return head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide") or any(head.startswith(m) for m in _MAGIC)


@dataclass(frozen=True)
class VideoFileInfo:
    frames: int  # packets with a timestamp: the frames decode_pyav indexes
    codec: str
    turns: int  # quarter turns counter-clockwise (np.rot90's k) that show it upright


def upright_turns(rotation) -> int:
    """np.rot90's k from a display matrix's rotation (PyAV's `frame.rotation`: degrees the matrix
    turns the picture counter-clockwise; a phone held upright writes -90)."""
    rot = int(round(float(rotation or 0))) % 360
    return {0: 0, 90: 1, 180: 2, 270: 3}.get(int(round(rot / 90.0)) * 90 % 360, 0)


def truncation(container, stream, packets: list | None = None) -> str | None:
    """'truncated: ...' when `stream`'s packets stop short of what the container says it holds, else
    None. `packets`: the stream's demuxed packets, when the caller has them already."""
    if packets is None:
        packets = list(container.demux(stream))
    timed = [p for p in packets if p.size > 0 and p.pts is not None]
    declared = int(stream.frames or 0)
    if declared and len(timed) < declared:
        return f"{TRUNCATED}: {len(timed)} of the {declared} frames its header lists are present"
    if any(p.is_corrupt for p in packets):
        return f"{TRUNCATED}: its last packet is cut short ({len(timed)} frames present)"
    if timed and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base) if stream.duration else (
            container.duration / 1e6 if container.duration else None)
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        step = 1.0 / rate if rate else 0.1
        last = max(float(p.pts * stream.time_base) for p in timed)
        if duration and last + 2 * step < duration - max(0.25, 2 * step):
            return f"{TRUNCATED}: frames end at {last:.2f}s of {duration:.2f}s"
    return None


def check_frame_size(width: int, height: int, name: str) -> None:
    """A UserError when a `width` x `height` frame is above MAX_PIXELS (0 x 0: not known yet, passes)."""
    if int(width or 0) * int(height or 0) > MAX_PIXELS:
        raise UserError(f"{name} has {width}x{height} frames ({width * height / 1e6:.0f} Mpx), above the "
                        f"{MAX_PIXELS / 1e6:.0f} Mpx (8K) decoded whole outside prep; scale it down first "
                        "(ffmpeg -i IN -vf scale=-2:1080 OUT), or `hiervl prep` it (prep scales frames as it reads them)")


def probe_video_file(data: bytes, name: str) -> VideoFileInfo:
    """Frame count, codec and display rotation of an encoded video; a UserError naming `name` when it
    is not a readable video, has no video stream or frames, or is truncated."""
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise UserError(f"{name} has no video stream")
            stream = container.streams.video[0]
            codec = stream.codec_context.name
            check_frame_size(stream.codec_context.width, stream.codec_context.height, name)  # before decoding
            packets = list(container.demux(stream))
            cut = truncation(container, stream, packets)
            timed = [p for p in packets if p.size > 0 and p.pts is not None]
            turns = 0
            if timed and not cut:
                ctx = stream.codec_context
                ctx.thread_count = 1
                for pkt in [*packets, None]:  # the first frame carries the display matrix
                    frames = ctx.decode(pkt)
                    if frames:
                        turns = upright_turns(getattr(frames[0], "rotation", 0))
                        break
    except UserError:
        raise
    except (av.error.FFmpegError, EOFError, OSError) as exc:
        if not data:
            raise UserError(f"{name} is not a readable video: an empty file (0 bytes)") from None
        if looks_like_video(data[:16]):
            raise UserError(f"{name} is {TRUNCATED} or corrupt: it does not open as a video ({type(exc).__name__})") from None
        raise UserError(f"{name} is not a readable video (no known container: {type(exc).__name__})") from None
    if cut:
        raise UserError(f"{name} is {cut} (an interrupted download or copy?); use the complete file")
    if not timed:
        raise UserError(f"{name} has no video frames")
    return VideoFileInfo(len(timed), codec, turns)


def decode_video_file(data: bytes, frames, name: str, turns: int | None = None):
    """Frames `frames` (display-order indices) of a user's video, upright, uint8 [T, H, W, 3];
    a UserError naming `name` when they cannot all be decoded (truncated or corrupt)."""
    import numpy as np
    from hiervl.data.decode import decode_pyav

    try:
        out = decode_pyav(data, frames, strict=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is the caller's, name it
        text = str(exc)
        if text.startswith(TRUNCATED):
            raise UserError(f"{name} is {text}; use the complete file") from None
        raise UserError(f"{name}: PyAV could not decode it ({type(exc).__name__}: {text})") from None
    if turns is None:
        turns = probe_video_file(data, name).turns
    return np.ascontiguousarray(np.rot90(out, turns, axes=(1, 2))) if turns else out
