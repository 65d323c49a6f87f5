"""Full CLIP initialisation: one local CLIP checkpoint directory (a tiny CLIPModel saved with
`save_pretrained`, plus a CLIPTokenizer made offline from a small vocabulary) loads both towers and
the tokenizer; the loaded weights equal the saved ones; conflicts and too-long captions are refused;
an export of a CLIP-initialised model loads without the CLIP directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate import SMALL as EVAL_SMALL
from test_evaluate import TINY

SMALL = [o for o in EVAL_SMALL if not o.startswith("model.text.path=")]  # model.clip_path brings the text tower

POSITIONS = 32  # the tiny CLIP's text positions (real CLIP: 77)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte as a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer(directory: Path):
    """A real CLIPTokenizer from a tiny BPE vocabulary (the byte alphabet, each also as a word end,
    and a few merges), saved into `directory`; returns it."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    merges = [("t", "h"), ("th", "e</w>"), ("r", "e"), ("re", "d</w>")]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)
    tok.save_pretrained(str(directory))  # tokenizer.json (+ its config): what AutoTokenizer reads back
    return tok, len(vocab)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPModel

    d = tmp_path_factory.mktemp("tiny_clip")
    _, vocab_size = write_clip_tokenizer(d)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=POSITIONS, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=16)
    torch.manual_seed(1)
    CLIPModel(config).save_pretrained(str(d))
    return d


def saved_weights(clip_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(clip_dir / "model.safetensors"))


def build(clip_dir: Path, *extra: str):
    from hiervl.config import load_config
    from hiervl.model.hierarchical import build_model

    cfg = load_config(TINY, SMALL + ["model.text.pretrained=true", *extra])
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


@pytest.mark.parametrize("how", ["clip_path", "both_keys"])
def test_one_clip_directory_loads_both_towers_and_the_tokenizer(clip_dir, how):
    from hiervl.model.text_model import load_tokenizer

    keys = ([f"model.clip_path={clip_dir}"] if how == "clip_path"
            else [f"model.vision.clip_path={clip_dir}", f"model.text.path={clip_dir}"])
    cfg, model = build(clip_dir, *keys)
    assert cfg.model.vision.clip_path == str(clip_dir) and cfg.model.text.path == str(clip_dir)
    saved = saved_weights(clip_dir)

    text = model.text.encoder.model.state_dict()  # CLIPTextModel; the CLIPModel file names them text_model.*
    text_saved = {k.removeprefix("text_model."): v for k, v in saved.items() if k.startswith("text_model.")}
    assert type(model.text.encoder.model).__name__ == "CLIPTextModel"
    assert set(text_saved) <= set(text), sorted(set(text_saved) - set(text))[:5]
    for k, v in text_saved.items():
        assert torch.equal(text[k], v), k
    assert not model.text.encoder.model.final_layer_norm.weight.requires_grad  # unused by the levels

    vision = model.video.encoder.vit.state_dict()  # CLIPVisionModel; in the CLIPModel file vision_model.*
    vision_saved = {k.removeprefix("vision_model."): v for k, v in saved.items() if k.startswith("vision_model.")}
    assert vision_saved and set(vision_saved) <= set(vision)
    patch = "embeddings.patch_embedding.weight"
    for k, v in vision_saved.items():
        if k == patch:  # tiny.yaml has frame_diff: RGB weights kept, 3 zero difference channels added
            assert vision[k].shape[1] == 6 and torch.equal(vision[k][:, :3], v) and not vision[k][:, 3:].any()
        else:
            assert torch.equal(vision[k], v), k
    assert model.video.encoder.width == 24 and len(model.video.encoder.vit.encoder.layers) == 3

    tok = load_tokenizer(cfg.model.text.path)
    assert "CLIPTokenizer" in type(tok).__name__
    ids = tok(["the red"])["input_ids"][0]
    vocab = tok.get_vocab()
    assert ids[0] == vocab["<|startoftext|>"] and ids[-1] == vocab["<|endoftext|>"]
    assert vocab["the</w>"] in ids and vocab["red</w>"] in ids  # the merges were applied

    # the whole model runs on the CLIP towers
    tokens = tok(["the red", "a"], padding="max_length", max_length=cfg.data.max_words, truncation=True,
                 return_tensors="pt")
    with torch.no_grad():
        t = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        v = model.encode_video(torch.randn(2, cfg.data.num_frames, 3, cfg.data.size, cfg.data.size))
        s = model.similarity(t, v)
    assert s["fused"].shape == (2, 2) and torch.isfinite(s["fused"]).all()


def test_conflicting_paths_and_too_long_captions_are_refused(clip_dir, tmp_path):
    from hiervl.config import ConfigError, load_config
    from hiervl.errors import UserError

    with pytest.raises(ConfigError, match="model.clip_path=.* sets model.text.path"):
        load_config(TINY, SMALL + [f"model.clip_path={clip_dir}", f"model.text.path={tmp_path}"])
    with pytest.raises(UserError, match=f"data.max_words=40 .* has {POSITIONS} positions"):
        build(clip_dir, f"model.clip_path={clip_dir}", "data.max_words=40")
    (tmp_path / "config.json").write_text((clip_dir / "config.json").read_text())  # weights, no tokenizer
    from hiervl.model.text_model import load_tokenizer

    with pytest.raises(UserError, match="has no tokenizer files"):
        load_tokenizer(str(tmp_path))


def test_export_of_a_clip_model_loads_without_the_clip_directory(clip_dir, tmp_path):
    from hiervl.api import HierVLModel, load, resolve_device
    from hiervl.export import write_export

    moved = tmp_path / "clip"
    shutil.copytree(clip_dir, moved)
    cfg, model = build(moved, f"model.clip_path={moved}")
    out = write_export(model, cfg, tmp_path / "export")
    ckpt = HierVLModel(model, cfg, resolve_device("cpu"))
    captions = ["the red", "a"]
    clip = np.random.default_rng(0).integers(0, 256, (11, 20, 24, 3), dtype=np.uint8)
    want_t, want_v = ckpt.encode_text(captions), ckpt.encode_video([clip])
    shutil.rmtree(moved)  # the export must not need it
    exported = load(out, device="cpu")
    got_t, got_v = exported.encode_text(captions), exported.encode_video([clip])
    assert type(exported.towers.text.encoder.model).__name__ == "CLIPTextModel"
    for want, got in ((want_t, got_t), (want_v, got_v)):
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(want[k], got[k]), k
