"""Test data builders (a helper module, not collected: its name is not test_*.py).

- `encode_clip`: a small moving-square clip, encoded with PyAV.
- `write_shards`: such clips as shards + manifest, through dataprep's writer of the shard contract.
- `prepared_dataset`: the real path, `hiervl.dataprep` synth corpus + `prepare` (local distributor).
- `assert_same_queues`: two runs' momentum queues agree (the 2-ranks-vs-1 comparisons).
- `LIGHT_LAUNCH` (`IN_PROCESS_DECODE`, `SMALL_TEXT`): overrides for a training test whose subject is
  neither decoding nor the text encoder.
The session-scoped datasets most tests share are in conftest.py. Import as `from fixtures import ...`
(conftest.py puts tests/ on sys.path).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import av
import numpy as np
from hiervl.data.manifest import MANIFEST_FILE, MANIFEST_SCHEMA, manifest_row, write_table
from hiervl.dataprep.shard_writer import ShardWriter, index_text
from hiervl.model.text_model import resolve_text_model_path

# A BERT of width 32 (2 layers, random weights) that reads captions with the packaged MiniLM's tokenizer.
SMALL_BERT = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 30522, "hidden_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}
MINILM_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def small_text_model() -> Path:
    """A text model folder: SMALL_BERT's config.json beside the packaged MiniLM's tokenizer files, built once
    per machine under the temp dir (named by its content; written to a scratch folder, then renamed, so
    concurrent test workers never see half of it). Its text tower is ~4 MB where MiniLM's is 62 MB."""
    minilm = resolve_text_model_path("default")  # the packaged MiniLM's folder
    config = json.dumps(SMALL_BERT, sort_keys=True)
    tag = hashlib.sha256(config.encode() + b"".join((minilm / n).read_bytes() for n in MINILM_TOKENIZER_FILES))
    final = Path(tempfile.gettempdir()) / f"hiervl-test-small-bert-{tag.hexdigest()[:12]}"
    if not (final / "config.json").is_file():
        scratch = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
        for name in MINILM_TOKENIZER_FILES:
            shutil.copyfile(minilm / name, scratch / name)
        (scratch / "config.json").write_text(config)
        try:
            scratch.rename(final)
        except OSError:  # another worker renamed its copy first
            shutil.rmtree(scratch, ignore_errors=True)
    return final


# A training launch whose test checks something other than decoding or the text encoder (ports, hosts,
# storage, checkpoint writes, world-size changes, numerics) runs with
# - `IN_PROCESS_DECODE`: its ranks decode with PyAV themselves, no decode pool, whose fork server imports torch
#   once more per rank (~1.3 s of CPU per rank, bench/RESULTS.md "Issue #22"). PyAV, as the pool does: left
#   at `auto`, a rank without workers would decode with DALI's CPU backend. Where PyAV runs does not change a
#   batch (test_decode_pool.py: the pool gives the in-process batches bit for bit, exactly once across a stop
#   and a resume; test_train.py's kill test resumes without the pool to the pooled run's exact numbers);
# - `SMALL_TEXT`: the small BERT above, not the packaged MiniLM: a checkpoint of the tiny config with the
#   queue is 62 MB instead of 217, and a 1-rank, 6-step run with 3 checkpoints costs ~7.6 CPU-s instead of ~10.9.
# `LIGHT_LAUNCH` is both. Real launches keep the pool in test_train.py (its straight and SIGTERM runs),
# test_crash_ledger.py and conftest's one_rank_run, and the pretrained MiniLM in one_rank_run (monitoring,
# validation, export), test_checkpoint_integrity.py's full disk (sized to MiniLM's checkpoints),
# test_train_elastic.py (see there) and test_model.py (cut to 1 layer). SMALL_TEXT also serves
# in-process tests: test_evaluate.py's SMALL (and the modules that import it), test_model_distributed.py.
IN_PROCESS_DECODE = ("data.decode_workers=0", "data.decoder=pyav")
SMALL_TEXT = (f"model.text.path={small_text_model()}", "model.text.pretrained=false")
LIGHT_LAUNCH = (*IN_PROCESS_DECODE, *SMALL_TEXT)


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
    """Write n samples of `encode_clip` videos (10-24 frames of 40x32 at 8 fps, 1-3 captions, two
    clips per video id) as shards + DALI index + manifest.parquet under `root`; return root.

    Written through dataprep's own writer of the shard contract (`ShardWriter`, `index_text`,
    `manifest_row`, `MANIFEST_SCHEMA`), without the transcode: quick clips with exact frame counts
    for the unit tests. A second call adds its rows to the manifest (e.g. a test split after train)."""
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    ext = "webm" if codec == "vp9" else "mp4"
    rows = []
    for s in range(0, n, per_shard):
        shard_index = s // per_shard
        tar_name = f"{split}-{shard_index:06d}.tar"
        writer = ShardWriter(root / tar_name)
        for i in range(s, min(n, s + per_shard)):
            key = f"{split}{i:05d}"
            nf = 10 + (i * 7) % 15
            data = encode_clip(nf, seed * 1000 + i, codec)
            caps = [f"clip {i} caption {c}" for c in range(1 + i % 3)]
            meta = {"num_frames": nf, "fps": 8.0, "width": 40, "height": 32, "duration": nf / 8, "codec": codec}
            doc = {"captions": caps, "num_frames": nf, "fps": 8.0, "width": 40, "height": 32, "duration": nf / 8,
                   "source": f"{key}.{ext}"}
            video = writer.add(f"{key}.{ext}", data)
            member = writer.add(f"{key}.json", json.dumps(doc).encode())
            sample = {"key": key, "orig_key": key, "video_id": f"vid{i // 2}", "split": split, "captions": caps,
                      "video": f"{key}.{ext}", "start": None, "end": None}
            rows.append(manifest_row(sample, tar_name, shard_index, i - s, ext, video, member, meta,
                                     hashlib.sha256(data).hexdigest()))
        writer.close()
        (root / f"{split}-{shard_index:06d}.idx").write_text(index_text(writer.members))
    manifest = root / MANIFEST_FILE
    old = pq.read_table(manifest).to_pylist() if manifest.exists() else []
    write_table(manifest, old + rows, MANIFEST_SCHEMA)
    return root


def prepared_dataset(root: Path, n: int, codec: str = "vp9", seed: int = 0) -> Path:
    """A dataset of about n synthetic samples prepared by `hiervl.dataprep` (synth corpus, then
    `prepare` with the local distributor: no Ray), 8 samples per shard, short side 32; returns its
    folder (`root/shards`)."""
    from hiervl.config import Config
    from hiervl.dataprep import driver, synth

    manifest = synth.make_corpus(root / "corpus", n, seed=seed, codec=codec)
    cfg = Config()
    cfg.prep.codec = "copy"  # synth already wrote `codec`; no transcode needed
    cfg.prep.num_workers = 1
    cfg.prep.shard_max_samples = 8
    cfg.prep.short_side = 32
    cfg.prep.distributor = "local"
    driver.prepare(cfg, str(manifest), str(root / "shards"), progress=False)
    return root / "shards"


def assert_same_queues(ref: dict, got: dict, atol: float, what: str = "") -> None:
    """`got`'s queues {name: {buffer: tensor}} equal `ref`'s: float buffers (keys) within `atol`, the
    others (video ids, fill mask, pointer: the order the keys went in) exactly."""
    import torch

    assert set(got) == set(ref), f"{what}: queues {sorted(got)} vs {sorted(ref)}"
    for name, ref_q in ref.items():
        for buf, ref_v in ref_q.items():
            v = got[name][buf]
            if ref_v.is_floating_point():
                torch.testing.assert_close(v, ref_v, atol=atol, rtol=0, msg=f"{what} queue {name}.{buf}")
            else:
                assert torch.equal(v, ref_v), f"{what} queue {name}.{buf}: {v.tolist()} vs {ref_v.tolist()}"


def start_ray(restart: bool = False) -> None:
    """The session's local Ray cluster (conftest.ray_cluster); `restart`: a new one whose workers see this
    process's environment now (Ray's workers keep the environment of `ray.init`, and pytest makes a session
    fixture before a module's, e.g. before a module's S3 credentials are set)."""
    import ray
    if restart and ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, object_store_memory=128 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
