"""Video and text encoders: the motion/layout options of the video tower and real activation checkpointing.

Each option is checked by what it must change and what it must leave alone: frame differences
are zero on a static video and their channels start with zero weights on a CLIP checkpoint; the
layout token tells apart two frames whose pooled CLS tokens are identical; divided space-time
attention makes a frame's token depend on the other frames, and is the identity at init; and
activation checkpointing gives the same gradients while really running the layers twice.
"""

import copy
from pathlib import Path

import pytest
import torch
from hiervl.config import ConfigError, load_config
from hiervl.errors import UserError
from hiervl.model.encoders import TextEncoder, VideoEncoder, frame_differences

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
SMALL = ["data.num_frames=4", "data.size=32", "model.vision.width=32", "model.vision.heads=2",
         "model.vision.layers=2", "model.vision.patch_size=8", "model.temporal_layers=2",
         # the plain tower, whatever tiny.yaml picks: each test switches on the options it checks
         "model.vision.frame_diff=false", "model.vision.frame_token=cls", "model.vision.space_time=none"]
DIFF, LAYOUT, FACTORISED = "model.vision.frame_diff=true", "model.vision.frame_token=layout", \
    "model.vision.space_time=factorised"
CKPT = "train.activation_checkpointing=true"


@pytest.fixture(params=["activation_checkpointing_enable", "gradient_checkpointing_enable only"])
def hf_checkpointing_api(request, monkeypatch):
    """Both transformers 5 checkpointing APIs: this one's (5.2x: `activation_checkpointing_enable`), and the
    GPU machine's 5.17, which has only `gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`
    (simulated: the newer method removed, the older one doing what 5.17's does)."""
    from transformers import PreTrainedModel

    if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):  # an older transformers: the real thing
        if request.param == "activation_checkpointing_enable":
            pytest.skip("this transformers has only gradient_checkpointing_enable")
        return request.param
    if request.param != "activation_checkpointing_enable":

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, every_n_layers=1, offload=False):
            if not self.supports_gradient_checkpointing:
                raise ValueError(f"{type(self).__name__} does not support gradient checkpointing.")
            self._activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)

        monkeypatch.delattr(PreTrainedModel, "activation_checkpointing_enable", raising=False)
        monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_enable", gradient_checkpointing_enable)
    return request.param


def _cfg(*extra):
    return load_config(TINY, [*SMALL, *extra])


def _encoder(*extra, seed=0):
    torch.manual_seed(seed)
    return VideoEncoder(_cfg(*extra))


def _video(b=2, t=4, size=32, seed=0):
    return torch.randn(b, t, 3, size, size, generator=torch.Generator().manual_seed(seed))  # [B, T, C, H, W]


def _copy_shared(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Give dst every parameter src has (same name and shape); dst's extra modules keep their init."""
    mine = dst.state_dict()
    shared = {k: v for k, v in src.state_dict().items() if k in mine and mine[k].shape == v.shape}
    dst.load_state_dict(shared, strict=False)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_config_refuses_unknown_vision_options_naming_the_choices():
    with pytest.raises(ConfigError, match="model.vision.frame_token='patches'.*cls, layout"):
        _cfg("model.vision.frame_token=patches")
    with pytest.raises(ConfigError, match="model.vision.space_time='divided'.*none, factorised"):
        _cfg("model.vision.space_time=divided")
    with pytest.raises(ConfigError, match="model.vision.layout_dim"):
        _cfg("model.vision.layout_dim=0")
    with pytest.raises(ConfigError, match="model.vision.space_time_layers=0"):
        _cfg("model.vision.space_time_layers=0")
    with pytest.raises(ConfigError, match="model.vision.frame_diff"):
        _cfg("model.vision.frame_diff=maybe")


@pytest.mark.parametrize("extra", [(), (DIFF,), (LAYOUT,), (FACTORISED,), (DIFF, LAYOUT, FACTORISED, CKPT)],
                         ids=["cls", "diff", "layout", "factorised", "all"])
def test_every_option_gives_one_token_per_frame_and_layer_at_any_frame_size(extra):
    enc = _encoder(*extra)
    assert enc.vit.embeddings.patch_embedding.in_channels == (6 if DIFF in extra else 3)
    assert (enc.layout is not None) == (LAYOUT in extra)
    assert (enc.space_time is not None and len(enc.space_time) == 2) == (FACTORISED in extra)
    for size in (32, 48):  # 48: positions interpolated, the layout grid pooled back to 4 x 4
        states = enc(_video(size=size))
        assert len(states) == 3 and all(s.shape == (2, 4, 32) for s in states)
        assert all(torch.isfinite(s).all() for s in states)
    states[-1].sum().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None]
    assert not missing, missing  # every new module is in the graph (ZeRO needs no unused parameters)


def test_frame_differences_are_the_previous_frame_subtracted_and_zero_when_static():
    video = _video(b=2, t=3)
    out = frame_differences(video)
    assert out.shape == (2, 3, 6, 32, 32)
    torch.testing.assert_close(out[:, :, :3], video)
    torch.testing.assert_close(out[:, 0, 3:], torch.zeros(2, 3, 32, 32))
    torch.testing.assert_close(out[:, 2, 3:], video[:, 2] - video[:, 1])
    static = video[:, :1].expand(-1, 3, -1, -1, -1)
    assert frame_differences(static)[:, :, 3:].abs().max() == 0


def test_frame_diff_channels_are_the_only_change_a_static_video_cancels_them():
    diff, rgb = _encoder(DIFF), _encoder()
    _copy_shared(rgb, diff)
    with torch.no_grad():  # the RGB encoder sees what the 6-channel one sees in its RGB channels
        rgb.vit.embeddings.patch_embedding.weight.copy_(diff.vit.embeddings.patch_embedding.weight[:, :3])
    static = _video(t=1).expand(-1, 4, -1, -1, -1).contiguous()
    moving = _video()
    with torch.no_grad():
        torch.testing.assert_close(diff(static)[-1], rgb(static)[-1])
        assert (diff(moving)[-1] - rgb(moving)[-1]).abs().max() > 1e-3  # the difference channels are read


def test_layout_token_sees_where_an_object_is_when_the_pooled_cls_cannot():
    # no position embedding: the ViT treats patches as a set, so its CLS is blind to where the object is
    cls, layout = _encoder(), _encoder(LAYOUT)
    _copy_shared(layout, cls)
    video = torch.zeros(2, 1, 3, 32, 32)  # two one-frame clips: the same 8x8 square in two patch cells
    video[0, 0, :, 0:8, 0:8] = 2.0
    video[1, 0, :, 24:32, 16:24] = 2.0
    with torch.no_grad():
        for enc in (cls, layout):
            enc.vit.embeddings.position_embedding.weight.zero_()
        frame_cls = cls(video)[0][:, 0]  # [2, W]
        frame_layout = layout(video)[0][:, 0]
        torch.testing.assert_close(frame_layout, frame_cls)  # the layout term starts at zero (CLIP unchanged)
        torch.nn.init.normal_(layout.layout.mix.weight, std=0.1)
        frame_layout = layout(video)[0][:, 0]
    torch.testing.assert_close(frame_cls[0], frame_cls[1], atol=1e-5, rtol=1e-5)
    assert (frame_layout[0] - frame_layout[1]).abs().max() > 1e-2


@pytest.mark.parametrize("layers", ["null", "1"])
def test_factorised_space_time_is_the_plain_vit_at_init_then_mixes_frames(layers):
    plain, st = _encoder(), _encoder(FACTORISED, f"model.vision.space_time_layers={layers}")
    assert len(st.space_time) == (2 if layers == "null" else 1)  # time blocks before the last N of 2 layers
    _copy_shared(st, plain)
    video = _video()
    later = video.clone()
    later[:, 3] = _video(seed=1)[:, 3]  # only the last frame changes
    with torch.no_grad():
        # zero output projections: identical to the plain per-frame ViT (also checks the layer loop)
        torch.testing.assert_close(st(video)[0], plain(video)[0])
        torch.testing.assert_close(plain(later)[0][:, 0], plain(video)[0][:, 0])  # frame 0 blind to frame 3
        for block in st.space_time:
            torch.nn.init.normal_(block.attn.out_proj.weight, std=0.1)
        assert (st(later)[0][:, 0] - st(video)[0][:, 0]).abs().max() > 1e-3  # frame 0 now sees frame 3
    with pytest.raises(UserError, match="space_time_layers=3 but the frame ViT has 2 layers"):
        _encoder(FACTORISED, "model.vision.space_time_layers=3")


def _clip_dir(tmp_path, channels=3):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    ref = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8, num_channels=channels))
    ref.save_pretrained(tmp_path / f"clip{channels}")
    return ref, tmp_path / f"clip{channels}"


def test_rgb_clip_checkpoint_gets_zero_difference_weights_and_is_unchanged_at_init(tmp_path):
    ref, path = _clip_dir(tmp_path)
    rgb = _encoder(f"model.vision.clip_path={path}")
    diff = _encoder(f"model.vision.clip_path={path}", DIFF)
    _copy_shared(diff, rgb)  # same temporal layers; the ViT came from the checkpoint in both
    w = diff.vit.embeddings.patch_embedding.weight  # [32, 6, 8, 8]
    assert w.shape == (32, 6, 8, 8) and diff.vit.config.num_channels == 6
    torch.testing.assert_close(w[:, :3], ref.embeddings.patch_embedding.weight)
    assert w[:, 3:].abs().max() == 0
    for name, value in ref.state_dict().items():
        if name != "embeddings.patch_embedding.weight":
            torch.testing.assert_close(diff.vit.state_dict()[name], value)
    with torch.no_grad():
        torch.testing.assert_close(diff(_video())[-1], rgb(_video())[-1])  # a moving video: diffs weigh zero
    # a 6-channel checkpoint (this encoder's own ViT saved) loads as it is, and only with frame_diff
    diff.vit.save_pretrained(tmp_path / "clip6")
    again = _encoder(f"model.vision.clip_path={tmp_path / 'clip6'}", DIFF)
    torch.testing.assert_close(again.vit.embeddings.patch_embedding.weight, w)
    with pytest.raises(UserError, match="takes 6 input channels.*frame_diff=false needs 3"):
        _encoder(f"model.vision.clip_path={tmp_path / 'clip6'}")


def _grads(module, loss_fn):
    module.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


class _Calls:
    """Counts forward calls of the hooked modules (a recomputed layer runs twice per step)."""

    def __init__(self, modules):
        self.n = {name: 0 for name in modules}
        for name, m in modules.items():
            m.register_forward_hook(lambda *_, name=name: self.n.__setitem__(name, self.n[name] + 1))


def _video_hooks(enc):
    # each layer's first submodule: transformers checkpoints a layer's forward (its own hooks stay
    # outside), and torch's recompute stops once the last saved activation is rebuilt, before a layer's end
    return {"vit": enc.vit.encoder.layers[0].layer_norm1, "space_time": enc.space_time[0].norm,
            "temporal": enc.temporal[0].norm1}


def test_video_checkpointing_recomputes_the_layers_and_keeps_the_gradients(hf_checkpointing_api):
    ref, ck = _encoder(DIFF, LAYOUT, FACTORISED), _encoder(DIFF, LAYOUT, FACTORISED, CKPT)
    ck.load_state_dict(ref.state_dict())
    video = _video()
    calls_ref, calls_ck = _Calls(_video_hooks(ref)), _Calls(_video_hooks(ck))
    g_ref = _grads(ref, lambda: (ref(video)[-1] ** 2).mean() + ref(video)[1].mean())
    g_ck = _grads(ck, lambda: (ck(video)[-1] ** 2).mean() + ck(video)[1].mean())
    assert g_ref.keys() == g_ck.keys() and len(g_ref) == len(list(ref.parameters()))
    for name in g_ref:
        torch.testing.assert_close(g_ck[name], g_ref[name], msg=name)
    assert calls_ref.n == {"vit": 2, "space_time": 2, "temporal": 2}  # two forwards, no recompute
    assert calls_ck.n == {"vit": 4, "space_time": 4, "temporal": 4}  # each forward recomputed in backward

    ck.eval()  # not training: nothing recomputed, even with gradients on
    calls_ck.n = dict.fromkeys(calls_ck.n, 0)
    ck(video)[-1].sum().backward()
    assert calls_ck.n == {"vit": 1, "space_time": 1, "temporal": 1}

    ck.train()  # the momentum key encoder is a deep copy that runs under no_grad
    key = copy.deepcopy(ck)
    with torch.no_grad():
        torch.testing.assert_close(key(video)[-1], ck(video)[-1])


def test_text_checkpointing_recomputes_the_layers_and_keeps_the_gradients(hf_checkpointing_api):
    torch.manual_seed(0)
    ref = TextEncoder(_cfg("model.text.num_layers=2"))
    ck = TextEncoder(_cfg("model.text.num_layers=2", CKPT))
    ck.load_state_dict(ref.state_dict())
    ref.train(), ck.train()
    ids = torch.randint(1000, 3000, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0
    calls = {m: _Calls({"layer0": enc.model.encoder.layer[0].attention.self.query}) for m, enc in (("ref", ref), ("ck", ck))}
    g_ref = _grads(ref, lambda: ref(ids, mask)[-1].pow(2).mean())
    g_ck = _grads(ck, lambda: ck(ids, mask)[-1].pow(2).mean())
    assert g_ref.keys() == g_ck.keys() and len(g_ref) > 10
    for name in g_ref:
        torch.testing.assert_close(g_ck[name], g_ref[name], msg=name)
    assert calls["ref"].n["layer0"] == 1 and calls["ck"].n["layer0"] == 2
    key = copy.deepcopy(ck)  # the momentum key encoder: a deep copy, run under no_grad
    with torch.no_grad():
        torch.testing.assert_close(key(ids, mask)[-1], ck(ids, mask)[-1])
