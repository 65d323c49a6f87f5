"""The public Python API (`import hiervl`) on a tiny model and a tiny real dataset: videos given as
files embed exactly as the eval loader embeds them from the shards, captions as eval tokenizes them,
similarities are eval's; uint8 frames == the same video's file; an export equals its checkpoint;
user errors are one line; and the README's example runs as written."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import write_shards
from hiervl.model.text_model import load_tokenizer
from test_evaluate import SMALL, TINY, make_model, write_fake_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NUM_VIDEOS = 6


def extract_videos(shards: Path, out: Path, split: str = "test") -> dict[str, Path]:
    """Every video of `split` as its own file (the bytes the manifest points at in the tars)."""
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    rows = pq.read_table(shards / "manifest.parquet").to_pylist()
    paths = {}
    for r in sorted((r for r in rows if r["split"] == split), key=lambda r: (r["shard"], r["index_in_shard"])):
        with open(shards / r["shard"], "rb") as f:
            f.seek(r["video_offset"])
            data = f.read(r["video_size"])
        paths[r["key"]] = out / f"{r['key']}.{r['video_ext']}"
        paths[r["key"]].write_bytes(data)
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from hiervl.config import load_config

    root = tmp_path_factory.mktemp("api")
    data = write_shards(root / "shards", NUM_VIDEOS, "vp9", split="test", per_shard=4)
    cfg = load_config(TINY, SMALL + [f"data.path={data}"])
    model = make_model(cfg)
    run = write_fake_checkpoint(model, cfg, root / "run")
    return cfg, model, run, data, extract_videos(data, root / "videos")


def eval_embeddings(model, cfg):
    from hiervl.data.loader import iter_eval
    from hiervl.eval.evaluate import embed_batches

    return embed_batches(model, iter_eval(cfg, split="test", tokenizer=load_tokenizer(cfg.model.text.path)))


def test_files_and_captions_embed_as_eval_does(setup):
    import hiervl

    cfg, model, run, _, paths = setup
    split = eval_embeddings(model, cfg)
    api = hiervl.load(run, device="cpu")
    assert api.levels == ["feature", "semantic"] and api.preprocessing.num_frames == cfg.data.num_frames
    v = api.encode_video([paths[k] for k in split.keys], batch_size=4)
    t = api.encode_text(split.captions)
    assert v.keys() == split.videos.keys() and t.keys() == split.texts.keys()
    for name in split.videos:
        torch.testing.assert_close(v[name], split.videos[name], atol=1e-5, rtol=0)
    for name in split.texts:
        torch.testing.assert_close(t[name], split.texts[name], atol=1e-5, rtol=0)
    got, want = api.similarity(t, v), model.similarity(split.texts, split.videos)
    assert set(got) == {"feature", "semantic", "fused"}
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0)
    # a random model still ranks: what eval would put first for caption 0 is the API's first too
    assert int(got["fused"][0].argmax()) == int(want["fused"][0].argmax())


def test_frames_equal_the_same_videos_file_and_one_video_is_accepted(setup):
    import av
    import hiervl

    _, _, run, _, paths = setup
    api = hiervl.load(run, device="cpu", decoder="pyav")  # frames below come from PyAV: compare like with like
    path = paths["test00003"]
    with av.open(str(path)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])  # [T, H, W, 3] all frames
    assert len(frames) == 10 + (3 * 7) % 15  # the fixture's frame count for test00003
    from_file = api.encode_video(path)  # one path, not a list
    from_frames = api.encode_video(frames)  # one [T, H, W, 3] array
    from_tensor = api.encode_video([torch.from_numpy(frames)])
    for name in from_file:
        assert from_file[name].shape[0] == 1
        torch.testing.assert_close(from_frames[name], from_file[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(from_tensor[name], from_file[name], atol=1e-6, rtol=0)
    # frames are sampled over the whole clip: dropping its second half changes the embedding
    half = api.encode_video(frames[: len(frames) // 2])
    assert not torch.allclose(half["semantic"], from_file["semantic"], atol=1e-4)


def test_an_export_equals_its_checkpoint_and_needs_no_deepspeed(setup, tmp_path):
    import subprocess

    from hiervl.launch.cli import main

    _, _, run, _, paths = setup
    out = tmp_path / "model"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "hiervl-export.json", "model.safetensors",
                                                     "text", "vision"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all(n.startswith(("video.", "text.")) for n in names)  # no video_key.*, no queues
    assert not any("_key." in n or "queue" in n for n in names)
    assert main(["export", str(run), "--out", str(out)]) == 1  # exists: refused without --force
    assert main(["export", str(run), "--out", str(out), "--force"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "other"), "model.preset=flat"]) == 1  # would be ignored
    assert not (tmp_path / "other").exists()

    code = ("import sys, json, hiervl, torch\n"
            f"m = hiervl.load({str(out)!r}, device='cpu')\n"
            f"t = m.encode_text(['clip 2 caption 0']); v = m.encode_video([{str(paths['test00002'])!r}])\n"
            "s = m.similarity(t, v)\n"
            "print(json.dumps({k: float(x[0, 0]) for k, x in s.items()}))\n"
            "print('deepspeed' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    scores_line, ds_line = res.stdout.strip().splitlines()[-2:]
    assert ds_line == "False"  # loading an export never imports DeepSpeed
    import json

    import hiervl

    ckpt = hiervl.load(run, device="cpu")
    want = ckpt.similarity(ckpt.encode_text(["clip 2 caption 0"]), ckpt.encode_video([paths["test00002"]]))
    got = json.loads(scores_line)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(float(want[k][0, 0]), abs=1e-6), k


def test_user_errors_are_one_line(setup, tmp_path):
    import hiervl
    from hiervl.errors import UserError

    _, _, run, _, paths = setup
    api = hiervl.load(run, device="cpu")
    with pytest.raises(UserError, match="does not exist"):
        hiervl.load(tmp_path / "nothing")
    with pytest.raises(UserError, match="no complete checkpoint"):
        hiervl.load(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        api.encode_video([tmp_path / "missing.webm"])
    (tmp_path / "bad.webm").write_bytes(b"not a video at all")
    with pytest.raises(UserError, match="bad.webm is not a readable video"):
        api.encode_video([tmp_path / "bad.webm"])
    with pytest.raises(UserError, match=r"uint8 \[T, H, W, 3\]"):
        api.encode_video([np.zeros((4, 8, 8), np.uint8)])
    with pytest.raises(UserError, match=r"uint8 \[T, H, W, 3\]"):
        api.encode_video([np.zeros((4, 8, 8, 3), np.float32)])
    with pytest.raises(UserError, match="non-empty list of strings"):
        api.encode_text([])
    with pytest.raises(UserError, match="decoder="):
        hiervl.load(run, decoder="ffmpeg")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            hiervl.load(run, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_embeddings_match_cpu(setup):
    import hiervl

    _, _, run, _, paths = setup
    cpu, gpu = hiervl.load(run, device="cpu", decoder="pyav"), hiervl.load(run, device="cuda", decoder="pyav")
    videos = [paths["test00000"], paths["test00001"]]
    a, b = cpu.encode_video(videos), gpu.encode_video(videos)
    assert b["semantic"].device.type == "cuda"
    for name in a:
        torch.testing.assert_close(b[name].cpu(), a[name], atol=1e-3, rtol=0)
    s = gpu.similarity(gpu.encode_text(["clip 0 caption 0"]), b)
    torch.testing.assert_close(s["fused"].cpu(), cpu.similarity(cpu.encode_text(["clip 0 caption 0"]), a)["fused"],
                               atol=1e-3, rtol=0)


def readme_example() -> str:
    """The Python block of the README section "Using a trained model from Python"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using a trained model from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(setup, tmp_path, monkeypatch):
    """The README's code, unchanged, in a directory laid out like the demo's (runs/demo/train,
    runs/demo/model, a held-out video of runs/demo/corpus), against the tiny model."""
    import shutil

    from hiervl.launch.cli import main

    _, model, run, _, paths = setup
    code = readme_example()
    demo = tmp_path / "runs" / "demo"
    shutil.copytree(run, demo / "train")
    videos = re.findall(r"runs/demo/corpus/videos/[\w.]+", code)
    assert videos, "the README example embeds a video of the demo corpus"
    for v in videos:
        (tmp_path / v).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(paths["test00001"], tmp_path / v)
    monkeypatch.chdir(tmp_path)
    commands = re.findall(r"^hiervl (export .*)$", (ROOT / "README.md").read_text().split(
        "## Using a trained model from Python", 1)[1].split("```python")[0], re.M)
    assert commands == ["export runs/demo/train --out runs/demo/model"]
    assert main(commands[0].split()) == 0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    import hiervl

    m = hiervl.load(demo / "model", device="cpu")
    caption = re.search(r'encode_text\(\["([^"]+)"\]\)', code).group(1)
    want = m.similarity(m.encode_text([caption]), m.encode_video([tmp_path / videos[0]]))
    shown = printed.getvalue()
    for name, s in want.items():
        assert f"'{name}': {round(float(s[0, 0]), 3)}" in shown, (name, shown)


def test_one_clip_is_the_same_tensor_through_every_path(setup):
    """The eval loader (in process and in a decode worker process), `hiervl.load(...).encode_video`
    and `hiervl search index` (video_index.embed_videos) all preprocess a clip through
    data/preprocess.py: the same input tensor, so the same embeddings, bit for bit."""
    import dataclasses

    import hiervl
    from hiervl.data.loader import iter_eval
    from hiervl.data.preprocess import Preprocessing
    from hiervl.eval.video_index import CatalogEntry, embed_videos

    cfg, model, run, _, paths = setup
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, decoder="pyav", prefetch=0))
    pooled = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, decode_workers=1))
    loaded = next(iter_eval(cfg, split="test", batch_size=NUM_VIDEOS, tokenizer=load_tokenizer(cfg.model.text.path)))
    from_pool = next(iter_eval(pooled, split="test", batch_size=NUM_VIDEOS, tokenizer=load_tokenizer(pooled.model.text.path)))
    key = loaded["keys"][1]
    clip = loaded["video"][1]  # [T, 3, S, S] float32
    assert clip.shape == (cfg.data.num_frames, 3, cfg.data.size, cfg.data.size) and clip.abs().sum() > 0
    assert from_pool["keys"][1] == key and torch.equal(from_pool["video"][1], clip)

    api = hiervl.load(run, device="cpu", decoder="pyav")
    assert api.preprocessing == Preprocessing.from_config(cfg)
    assert torch.equal(api.preprocess_video(paths[key]), clip)
    assert torch.equal(api.preprocess_video(paths[key].read_bytes()), clip)
    with torch.no_grad():  # each path's model on the loader's clip: what its own preprocessing must feed it
        want_api = api.towers.encode_video(clip[None])  # level -> [1, ...]
        want_index = model.eval().encode_video(clip[None])
    got_api = api.encode_video([paths[key]])
    _, got_index, skipped = embed_videos(model, [CatalogEntry(key, str(paths[key]))], progress=False)
    assert not skipped and set(got_api) == set(got_index) == set(want_api)
    for name in want_api:
        assert torch.equal(got_api[name], want_api[name].float()), name
        assert torch.equal(got_index[name], want_index[name].float()), name
    # and a caption is tokenized alike by the loader and the API
    tok = api.tokenize([loaded["captions"][1][0]])
    first = int((loaded["caption_index"] == 1).nonzero()[0])
    assert torch.equal(tok["input_ids"][0], loaded["caption_input_ids"][first])
