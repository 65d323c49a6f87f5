"""The real-world video matrix (issue 25): each variant a user hands us (HEVC, 10-bit, an odd size
853x479, variable frame rate, MKV, AVI, a phone's rotation, audio only, a cut-short download, a cut
MP4 that lost its index) through each path (`hiervl prep`, `hiervl.load(...).encode_video`,
`hiervl search index --videos`). Every file is made here with PyAV from one small clip. The
decodable ones go through every path, upright; the others are refused with the same words on
every path ("no video stream", "truncated")."""

from __future__ import annotations

import csv
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from fixtures import write_shards
from test_evaluate import SMALL, TINY, make_model, write_fake_checkpoint

pytestmark = pytest.mark.integration

GOOD = ["clip.mp4", "clip.mkv", "hevc.mp4", "h264_10bit.mp4", "hevc_10bit.mp4", "odd_853x479.webm",
        "odd_853x479_444.mp4", "vfr.mp4", "xvid.avi", "rotated.mp4"]
NO_PICTURE = ["audio_only.mp4"]  # audio_only.m4a is not a video file name: reported by search index, not read
CUT = ["truncated.mp4"]  # faststart MP4 cut at 30%: its index survives, most of its frames do not
LOST_INDEX = ["lost_index.mp4"]  # MP4 with its index at the end, cut: does not open at all


def _frames(n: int, w: int, h: int, noise: bool = False) -> list[np.ndarray]:
    """Frames [h, w, 3] uint8: a grey level that changes per frame, a red left half and a white 8x8
    block in the stored top-left corner (to tell orientation); with `noise`, random pixels (large packets)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8) if noise else np.full((h, w, 3), 40 + 9 * i, np.uint8)
        if not noise:
            img[:, : w // 2, 0] = 230  # a red left half: any crop shows which way is up
        img[:8, :8] = 255
        out.append(img)
    return out


def _encode(path: Path, frames: list[np.ndarray], codec="libx264", fmt=None, pix_fmt="yuv420p", rate=8,
            rotation=None, pts=None, options=None, audio=False, video=True) -> Path:
    with av.open(str(path), "w", format=fmt, options=options or {}) as c:
        if video:
            quiet = {"x265-params": "log-level=error"} if codec == "libx265" else {}
            s = c.add_stream(codec, rate=rate, options=quiet)
            s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix_fmt
            if pts is not None:
                s.codec_context.time_base = pts[1]
            if rotation is not None:
                s.set_display_rotation(rotation)
            for i, img in enumerate(frames):
                f = av.VideoFrame.from_ndarray(img, format="rgb24")
                f.pts = pts[0][i] if pts is not None else i
                if pts is not None:
                    f.time_base = pts[1]
                for p in s.encode(f):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        if audio:
            a = c.add_stream("aac", rate=16000)
            a.layout = "mono"
            samples = (np.sin(np.arange(16000 * 2) / 5.0) * 0.2).astype(np.float32)[None]
            for lo in range(0, samples.shape[1], 1024):
                fr = av.AudioFrame.from_ndarray(samples[:, lo:lo + 1024], format="fltp", layout="mono")
                fr.sample_rate, fr.pts = 16000, lo
                for p in a.encode(fr):
                    c.mux(p)
            for p in a.encode():
                c.mux(p)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    from fractions import Fraction

    d = tmp_path_factory.mktemp("real_videos") / "videos"
    d.mkdir()
    small = _frames(16, 64, 48)
    _encode(d / "clip.mp4", small)
    _encode(d / "clip.mkv", small, fmt="matroska")
    _encode(d / "hevc.mp4", small, codec="libx265")
    _encode(d / "h264_10bit.mp4", small, pix_fmt="yuv420p10le")
    _encode(d / "hevc_10bit.mp4", small, codec="libx265", pix_fmt="yuv420p10le")
    odd = _frames(4, 853, 479)
    _encode(d / "odd_853x479.webm", odd, codec="libvpx-vp9", fmt="webm")
    _encode(d / "odd_853x479_444.mp4", odd, pix_fmt="yuv444p")  # x264 refuses 4:2:0 at an odd size
    gaps = [0, 100, 150, 400, 450, 500, 900, 1000, 1100, 1500, 1550, 1600, 1900, 1950, 2000, 2100]  # ms
    _encode(d / "vfr.mp4", small, pts=(gaps, Fraction(1, 1000)))
    _encode(d / "xvid.avi", small, codec="mpeg4", fmt="avi")
    _encode(d / "rotated.mp4", small, rotation=-90)  # a phone held upright: shown turned 90 deg clockwise
    _encode(d / "audio_only.mp4", [], audio=True, video=False)
    _encode(d / "audio_only.m4a", [], audio=True, video=False, fmt="ipod")
    noisy = _frames(80, 64, 48, noise=True)
    raw = _encode(d.parent / "fs.mp4", noisy, options={"movflags": "faststart"}).read_bytes()
    (d / "truncated.mp4").write_bytes(raw[:int(len(raw) * 0.3)])
    raw = _encode(d.parent / "tail.mp4", noisy).read_bytes()  # the index (moov) after the frames
    (d / "lost_index.mp4").write_bytes(raw[:int(len(raw) * 0.3)])
    return d


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    from hiervl.config import load_config

    root = tmp_path_factory.mktemp("real_videos_model")
    data = write_shards(root / "shards", 2, "vp9", split="test", per_shard=4)
    cfg = load_config(TINY, SMALL + [f"data.path={data}"])
    return write_fake_checkpoint(make_model(cfg), cfg, root / "run")


def _all_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])  # [N, H, W, 3] as stored


def test_prep_matrix(videos, tmp_path):
    import pyarrow.parquet as pq
    from hiervl.config import Config
    from hiervl.dataprep import driver

    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "caption", "key"])
        for name in GOOD + NO_PICTURE + CUT + LOST_INDEX:
            w.writerow([str(videos / name), f"a video called {name}", name])
    cfg = Config()
    cfg.prep.distributor, cfg.prep.num_workers, cfg.prep.short_side, cfg.prep.fps = "local", 1, 32, 8.0
    cfg.prep.min_seconds, cfg.prep.max_failure_rate = 0.4, 1.0
    summary = driver.prepare(cfg, str(manifest), str(tmp_path / "shards"), progress=False)
    rows = {r["orig_key"]: r for r in pq.read_table(tmp_path / "shards" / "manifest.parquet").to_pylist()}
    refused = {r["key"]: r["reason"] for r in pq.read_table(tmp_path / "shards" / "quarantine.parquet").to_pylist()}
    assert sorted(rows) == sorted(GOOD), refused
    assert rows["rotated.mp4"]["height"] > rows["rotated.mp4"]["width"]  # upright: portrait
    assert rows["clip.mp4"]["width"] > rows["clip.mp4"]["height"]
    assert refused["audio_only.mp4"] == "no video stream"
    assert refused["truncated.mp4"].startswith("truncated: "), refused["truncated.mp4"]
    assert refused["lost_index.mp4"].startswith("truncated or corrupt"), refused["lost_index.mp4"]
    lines = driver.quarantine_lines(summary)  # what `hiervl prep` prints below its summary line
    assert any(str(videos / "truncated.mp4") in ln and "decode: truncated" in ln for ln in lines), lines


def test_api_matrix(videos, model_run):
    import hiervl
    from hiervl.errors import UserError

    model = hiervl.load(model_run, device="cpu")
    emb = model.encode_video([str(videos / n) for n in GOOD])
    assert all(bool(torch.isfinite(x).all()) and len(x) == len(GOOD) for x in emb.values())
    # the phone video: the frames the model sees are the landscape frames turned upright
    plain = _all_frames(videos / "clip.mp4")  # [16, 48, 64, 3]
    upright = np.ascontiguousarray(np.rot90(plain, 3, axes=(1, 2)))  # shown turned 90 deg clockwise
    assert upright.shape[1:3] == (64, 48) and upright[:, :8, -8:].mean() > 200  # the block now top-right
    turned = model.preprocess_video(str(videos / "rotated.mp4"))
    assert torch.allclose(turned, model.preprocess_video(upright), atol=0.05)
    assert not torch.allclose(turned, model.preprocess_video(str(videos / "clip.mp4")), atol=0.05)
    with pytest.raises(UserError, match="audio_only.mp4 has no video stream"):
        model.encode_video(str(videos / "audio_only.mp4"))
    with pytest.raises(UserError, match=r"truncated.mp4 is truncated: \d+ of the 80 frames its header lists"):
        model.encode_video(str(videos / "truncated.mp4"))
    with pytest.raises(UserError, match="lost_index.mp4 is truncated or corrupt"):
        model.encode_video(str(videos / "lost_index.mp4"))


def test_search_index_matrix(videos, model_run, tmp_path):
    import hiervl
    from hiervl.eval.search import SearchIndex, build_video_index

    summary = build_video_index(model_run, tmp_path / "index", videos=videos, num_threads=1)
    index = SearchIndex.load(tmp_path / "index")
    want = sorted(n.rsplit(".", 1)[0] if n.rsplit(".", 1)[0] != "clip" else n for n in GOOD)
    assert sorted(index.keys) == want  # clip.mkv beside clip.mp4: two keys, no refusal
    skipped = dict(summary["skipped_videos"])
    assert set(skipped) == {"audio_only", "truncated", "lost_index"}
    assert "has no video stream" in skipped["audio_only"]
    assert "truncated.mp4 is truncated: " in skipped["truncated"]
    assert "lost_index.mp4 is truncated or corrupt" in skipped["lost_index"]
    assert summary["audio_files"] == ["audio_only.m4a"]
    # the index embeds a file as the API does: the rotated one upright, not as its landscape twin
    model = hiervl.load(model_run, device="cpu")
    api = model.encode_video([str(videos / "rotated.mp4"), str(videos / "clip.mp4")])
    i, j = index.keys.index("rotated"), index.keys.index("clip.mp4")
    for level, x in api.items():
        assert torch.allclose(index.videos[level][i], x[0], atol=1e-5), level
        assert torch.allclose(index.videos[level][j], x[1], atol=1e-5), level
    g = next(iter(api))
    assert not torch.allclose(index.videos[g][i], index.videos[g][j], atol=1e-3)
