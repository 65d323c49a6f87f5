"""Tiny prepared datasets for the loader tests (a helper module: it holds no tests).

`prepared_dataset(root, n, codec)` uses the real path, `hiervl.dataprep.synth.make_corpus` +
`hiervl.dataprep.driver.prepare`, when both exist; otherwise it writes shards to the same contract
itself (common.md: `{split}-{n:06d}.tar` + manifest.parquet with member offsets), from small
videos encoded with PyAV.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import av
import numpy as np


def encode_clip(num_frames: int, seed: int, codec: str = "vp9", width: int = 40, height: int = 32, fps: int = 8,
                gop: int = 4) -> bytes:
    """A moving-square clip with a per-frame colour ramp (so frames are distinguishable)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    container = av.open(buf, "w", format="webm" if codec == "vp9" else "mp4")
    stream = container.add_stream("libvpx-vp9" if codec == "vp9" else "libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.codec_context.gop_size = gop
    base = rng.integers(0, 200, 3)
    for f in range(num_frames):
        img = np.empty((height, width, 3), np.uint8)
        img[:] = (base + f * 12) % 256
        x = (f * 3) % (width - 8)
        img[8:16, x:x + 8] = 255
        for pkt in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            container.mux(pkt)
    for pkt in stream.encode():
        container.mux(pkt)
    container.close()
    return buf.getvalue()


def write_shards(root: Path, n: int, codec: str = "vp9", split: str = "train", per_shard: int = 8,
                 seed: int = 0) -> Path:
    """Write n samples as tars + manifest.parquet (the shared contract), return root."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    ext = "webm" if codec == "vp9" else "mp4"
    rows = []
    for s in range(0, n, per_shard):
        shard = f"{split}-{s // per_shard:06d}.tar"
        samples = []
        with tarfile.open(root / shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for j, i in enumerate(range(s, min(n, s + per_shard))):
                key = f"{split}{i:05d}"
                nf = 10 + (i * 7) % 15
                data = encode_clip(nf, seed * 1000 + i, codec)
                caps = [f"clip {i} caption {c}" for c in range(1 + i % 3)]
                meta = json.dumps({"captions": caps, "num_frames": nf, "fps": 8.0, "width": 40, "height": 32,
                                   "duration": nf / 8, "source": f"{key}.{ext}"}).encode()
                for name, payload in ((f"{key}.{ext}", data), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                samples.append((key, i, j, nf, caps, data))
        with tarfile.open(root / shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
        for key, i, j, nf, caps, data in samples:
            v, js = members[f"{key}.{ext}"], members[f"{key}.json"]
            rows.append({"key": key, "orig_key": key, "video_id": f"vid{i // 2}", "split": split, "shard": shard,
                         "shard_index": s // per_shard, "index_in_shard": j, "video_ext": ext,
                         "video_offset": v.offset_data, "video_size": v.size, "json_offset": js.offset_data,
                         "json_size": js.size, "captions": caps, "num_frames": nf, "fps": 8.0, "width": 40,
                         "height": 32, "duration": nf / 8, "codec": codec, "source": f"{key}.{ext}",
                         "start": None, "end": None, "content_hash": hashlib.sha256(data).hexdigest()})
    manifest = root / "manifest.parquet"
    old = pq.read_table(manifest).to_pylist() if manifest.exists() else []
    pq.write_table(pa.Table.from_pylist(old + rows), manifest)
    return root


def have_dataprep() -> bool:
    try:
        from hiervl.dataprep import driver, synth  # noqa: F401
    except Exception:  # noqa: BLE001 - not there yet (or broken): fall back to our own shards
        return False
    return hasattr(synth, "make_corpus") and hasattr(driver, "prepare")


def prepared_dataset(root: Path, n: int, codec: str = "vp9", seed: int = 0) -> tuple[Path, str]:
    """A prepared dataset of about n samples; returns (directory, how it was made)."""
    if have_dataprep():
        from hiervl.config import Config
        from hiervl.dataprep import driver, synth

        manifest = synth.make_corpus(root / "corpus", n, seed=seed, codec=codec)
        cfg = Config()
        cfg.prep.codec = "copy"  # synth already wrote `codec`; no transcode needed
        cfg.prep.num_workers = 1
        cfg.prep.shard_max_samples = 8
        cfg.prep.short_side = 32
        driver.prepare(cfg, str(manifest), str(root / "shards"))
        return root / "shards", "dataprep"
    write_shards(root / "shards", n, codec)
    return root / "shards", "fixture"
