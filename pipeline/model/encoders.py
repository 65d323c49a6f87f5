"""The two backbones: a video encoder (per-frame ViT + temporal transformer) and a text encoder.

Both return every layer's token states so the level heads (pipeline/model/levels.py) can read a lower
layer (HiT's feature level) as well as the top one:

- `VideoEncoder(video [B,T,C,H,W]) -> list of [B,T,W]`: entry 0 is the per-frame token plus a
  learned temporal position embedding, entry i the output of temporal layer i. The position
  embedding makes frame order matter (the synthetic task differs only by order).
- `TextEncoder(input_ids [B,L], attention_mask [B,L]) -> list of [B,L,H]`: the transformers
  model's hidden states (entry 0 = embeddings).

The frame ViT is transformers' `CLIPVisionModel`: loaded from a local CLIP checkpoint directory
when `model.vision.clip_path` is set, else built from `model.vision.*` with random weights.
Nothing ever touches the network (`local_files_only`).

What the video tower can see of motion and layout (`model.vision.*`):
- `frame_diff`: frame t minus frame t-1 (zero for t=0) enters the ViT as 3 more input channels,
  so a single frame's token already carries where things move. A 3-channel CLIP checkpoint keeps
  its RGB patch embedding and gets a zero one for the difference channels (unchanged at init).
- `frame_token`: `cls` is the ViT's pooled CLS token (one vector per frame that need not say
  where anything is); `layout` adds a linear layer over the frame's patch tokens, concatenated
  in grid order, so the token keeps the spatial layout (each patch token is first projected to
  `layout_dim` so the linear stays small: 196 x 16 -> 768 at ViT-B/16 224 px).
- `space_time=factorised`: TimeSformer-style divided attention: before each spatial ViT layer
  (every one, or the last `space_time_layers`), each patch position attends over the T frames
  (CLS excluded), so patches see motion inside the ViT rather than only after pooling.
New layers start as no-ops (zero output projections), so a pretrained CLIP behaves as before.
On the synthetic corpus (tiny.yaml tower trained with a supervised probe, 124 held-out videos,
2 seeds) held-out accuracy of direction of event 1 / event 2 / first mover: cls 28-33 / 29-35 /
48-50%, frame_diff 65-79 / 77-85 / 73-74%, frame_diff + factorised 94-97 / 96-98 / 98-99%.

`train.activation_checkpointing` recomputes, in backward, the frame ViT's layers, the
space-time blocks, the temporal layers and the text layers instead of storing their
activations (only in training with gradients on; non-reentrant `torch.utils.checkpoint`).

Owns: the video tower's ViT and temporal transformer, the text tower's wrapper, activation
checkpointing.
Must not touch: losses, queues or data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hiervl.config import Config
from hiervl.errors import UserError
from hiervl.model.text_model import load_text_model
from torch import nn
from torch.utils.checkpoint import checkpoint

RGB = 3  # input channels of a frame; frame_diff doubles them


def _enable_hf_checkpointing(model: nn.Module, what: str) -> None:
    """transformers' own per-layer activation checkpointing, non-reentrant (frozen inputs still get grads).

    Both transformers 5 APIs: `activation_checkpointing_enable` (5.2x, which deprecates the other) and
    `gradient_checkpointing_enable` (the only one before, e.g. 5.17 on the GPU machine).
    """
    kwargs = {"use_reentrant": False}
    try:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except ValueError as exc:  # the architecture has no GradientCheckpointingLayer
        raise UserError(f"train.activation_checkpointing=true but the {what} ({type(model).__name__}) does not "
                        f"support it ({exc}); set train.activation_checkpointing=false") from exc


def _add_diff_channels(model: nn.Module) -> None:
    """Widen a 3-channel CLIP patch embedding to 6: RGB weights kept, difference weights zero."""
    conv = model.embeddings.patch_embedding
    wide = nn.Conv2d(2 * RGB, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
                     bias=conv.bias is not None, dtype=conv.weight.dtype, device=conv.weight.device)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, :RGB].copy_(conv.weight)  # [W, 6, p, p] <- [W, 3, p, p]
        if conv.bias is not None:
            wide.bias.copy_(conv.bias)
    model.embeddings.patch_embedding = wide
    model.config.num_channels = 2 * RGB


def build_frame_vit(cfg: Config, vision_config=None) -> nn.Module:
    """transformers' CLIP vision tower, from `model.vision.clip_path` or random init from the config
    (MLP activation `model.vision.act`; a checkpoint keeps its own).

    With `model.vision.frame_diff` it takes 6 input channels (RGB, then the frame difference).
    `vision_config` (a CLIPVisionConfig: what `hiervl export` writes) builds exactly that
    architecture with random weights instead, ignoring `clip_path`: the caller loads the weights.
    `clip_path` may name a CLIP vision checkpoint or a whole CLIP (CLIPModel) checkpoint: the
    vision half is taken.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vis = cfg.model.vision
    channels = 2 * RGB if vis.frame_diff else RGB
    if vision_config is not None:
        if int(vision_config.num_channels) != channels:
            raise UserError(f"the exported vision config takes {vision_config.num_channels} input channels but "
                            f"model.vision.frame_diff={str(vis.frame_diff).lower()} needs {channels}; the export's "
                            "config.yaml and vision/config.json disagree: export the run again")
        return CLIPVisionModel(vision_config)
    if vis.clip_path:
        from pathlib import Path

        if not (Path(vis.clip_path).expanduser() / "config.json").is_file():
            raise UserError(f"model.vision.clip_path={vis.clip_path} has no config.json; point it at a local "
                            "CLIP (or CLIP vision) checkpoint directory, or set it to null for a random-init ViT")
        from transformers.utils import logging as hf_logging

        level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            model = CLIPVisionModel.from_pretrained(str(Path(vis.clip_path).expanduser()), local_files_only=True,
                                                    attention_dropout=cfg.model.dropout)
        finally:
            hf_logging.set_verbosity(level)
            if bar:
                hf_logging.enable_progress_bar()
        have = int(model.config.num_channels)
        if have == RGB and channels == 2 * RGB:
            _add_diff_channels(model)
        elif have != channels:
            raise UserError(f"model.vision.clip_path={vis.clip_path} takes {have} input channels but "
                            f"model.vision.frame_diff={str(vis.frame_diff).lower()} needs {channels}; "
                            "use a 3-channel (RGB) CLIP checkpoint")
        return model
    config = CLIPVisionConfig(hidden_size=vis.width, intermediate_size=4 * vis.width, num_hidden_layers=vis.layers,
                              num_attention_heads=vis.heads, image_size=cfg.data.size, patch_size=vis.patch_size,
                              num_channels=channels, attention_dropout=cfg.model.dropout, hidden_act=vis.act)
    return CLIPVisionModel(config)


def frame_differences(video: torch.Tensor) -> torch.Tensor:
    """video [B,T,C,H,W] -> [B,T,2C,H,W]: each frame, then itself minus the previous frame (zero at t=0)."""
    diff = torch.cat([torch.zeros_like(video[:, :1]), video[:, 1:] - video[:, :-1]], dim=1)  # [B, T, C, H, W]
    return torch.cat([video, diff], dim=2)


class DividedTimeAttention(nn.Module):
    """TimeSformer's temporal half of divided attention: each patch position attends over the T frames.

    x [B*T, 1+P, W] -> same shape; the CLS token (position 0) passes through. Pre-norm residual
    with its own temporal position embedding (so order is visible) and a zero output projection,
    so the block is the identity at init and a pretrained ViT is unchanged.
    """

    def __init__(self, width: int, heads: int, max_frames: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.time_pos = nn.Parameter(torch.randn(max_frames, width) * 0.02)  # [Tmax, W]
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        n, tokens, w = x.shape
        b = n // t
        patches = x[:, 1:].reshape(b, t, tokens - 1, w).transpose(1, 2).reshape(-1, t, w)  # [B*P, T, W]
        h = self.norm(patches + self.time_pos[:t])
        h = self.attn(h, h, h, need_weights=False)[0]  # [B*P, T, W]
        h = h.reshape(b, tokens - 1, t, w).transpose(1, 2).reshape(n, tokens - 1, w)  # [B*T, P, W]
        return torch.cat([x[:, :1], x[:, 1:] + h], dim=1)


class LayoutToken(nn.Module):
    """Frame token that keeps where things are: pooled CLS + a linear layer over the flattened patch grid.

    patches [N, P, W] (grid gh x gw), pooled [N, W] -> [N, W]. Each patch token is normalised and
    projected to `dim`, the (grid x grid x dim) concatenation in grid order goes through one
    linear layer (zero-initialised: the token starts as the CLS token), so moving an object to
    another patch changes the token even where the CLS pools it away. A grid other than the
    configured one (frames resized with interpolated positions) is average-pooled to it.
    """

    def __init__(self, width: int, grid: int, dim: int):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(width)
        self.reduce = nn.Linear(width, dim)  # per patch token: [W] -> [dim]
        self.mix = nn.Linear(grid * grid * dim, width)  # [grid*grid*dim] -> [W]
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, patches: torch.Tensor, pooled: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        n = patches.shape[0]
        x = self.reduce(self.norm(patches))  # [N, P, dim]
        if (gh, gw) != (self.grid, self.grid):
            x = x.transpose(1, 2).reshape(n, -1, gh, gw)  # [N, dim, gh, gw]
            x = F.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2)  # [N, grid*grid, dim]
        return pooled + self.mix(x.reshape(n, -1))  # [N, W]


class VideoEncoder(nn.Module):
    """Per-frame ViT (optionally with frame differences and divided space-time attention), a frame
    token (CLS or layout), then a temporal transformer over the T frame tokens."""

    def __init__(self, cfg: Config, vision_config=None):
        super().__init__()
        vis = cfg.model.vision
        self.vit = build_frame_vit(cfg, vision_config)  # vision_config: an export's architecture (no clip_path)
        self.width = int(self.vit.config.hidden_size)
        self.image_size = int(self.vit.config.image_size)
        self.patch_size = int(self.vit.config.patch_size)
        self.max_frames = cfg.model.max_frames
        self.frame_diff = vis.frame_diff
        heads = self.vit.config.num_attention_heads
        self.space_time, self.space_time_from = None, 0
        if vis.space_time == "factorised":  # one temporal block before each of the last k spatial ViT layers
            depth = int(self.vit.config.num_hidden_layers)
            k = depth if vis.space_time_layers is None else vis.space_time_layers
            if k > depth:
                raise UserError(f"model.vision.space_time_layers={k} but the frame ViT has {depth} layers; "
                                f"set it to at most {depth} (or null for all)")
            self.space_time_from = depth - k
            self.space_time = nn.ModuleList([
                DividedTimeAttention(self.width, heads, cfg.model.max_frames, cfg.model.dropout) for _ in range(k)])
        self.layout = None
        if vis.frame_token == "layout":
            self.layout = LayoutToken(self.width, self.image_size // self.patch_size, vis.layout_dim)
        self.temporal_pos = nn.Parameter(torch.randn(cfg.model.max_frames, self.width) * 0.02)  # [Tmax, W]
        self.temporal = nn.ModuleList([
            nn.TransformerEncoderLayer(self.width, heads, 4 * self.width, dropout=cfg.model.dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(cfg.model.temporal_layers)])
        self.num_layers = cfg.model.temporal_layers
        self.checkpointing = cfg.train.activation_checkpointing
        if self.checkpointing:
            _enable_hf_checkpointing(self.vit, "frame ViT")

    def _run(self, module: nn.Module, *args):
        """module(*args), recomputed in backward under activation checkpointing while training."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _frames(self, frames: torch.Tensor, t: int, resize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """frames [B*T, C, H, W] -> (last hidden state [B*T, 1+P, W], pooled CLS [B*T, W])."""
        if self.space_time is None:
            out = self.vit(pixel_values=frames, interpolate_pos_encoding=resize)
            return out.last_hidden_state, out.pooler_output
        vit = self.vit  # CLIPVisionModel.forward, with a time block before each layer
        h = vit.pre_layrnorm(vit.embeddings(frames, interpolate_pos_encoding=resize))  # [B*T, 1+P, W]
        for i, layer in enumerate(vit.encoder.layers):
            if i >= self.space_time_from:
                h = self._run(self.space_time[i - self.space_time_from], h, t)
            h = layer(h, None)  # transformers checkpoints its own layers
            h = h[0] if isinstance(h, tuple) else h
        return h, vit.post_layernorm(h[:, 0])

    def forward(self, video: torch.Tensor) -> list[torch.Tensor]:
        b, t = video.shape[:2]  # video: [B, T, C, H, W]
        if t > self.max_frames:
            raise UserError(f"clips have {t} frames but model.max_frames={self.max_frames}; raise model.max_frames")
        if self.frame_diff:
            video = frame_differences(video)  # [B, T, 2C, H, W]
        frames = video.reshape(b * t, *video.shape[2:])  # [B*T, C, H, W]
        height, width = frames.shape[-2:]
        resize = height != self.image_size or width != self.image_size
        hidden, feats = self._frames(frames, t, resize)  # [B*T, 1+P, W], [B*T, W]
        if self.layout is not None:
            feats = self.layout(hidden[:, 1:], feats, height // self.patch_size, width // self.patch_size)
        x = feats.reshape(b, t, self.width) + self.temporal_pos[:t]  # [B, T, W]
        states = [x]
        for layer in self.temporal:
            x = self._run(layer, x)  # [B, T, W]
            states.append(x)
        return states


class TextEncoder(nn.Module):
    """A transformers encoder (default: the packaged MiniLM) returning all hidden states."""

    def __init__(self, cfg: Config):
        super().__init__()
        text = cfg.model.text
        self.model = load_text_model(text.path, text.pretrained, text.num_layers, dropout=cfg.model.dropout)
        self.width = int(self.model.config.hidden_size)
        self.num_layers = int(self.model.config.num_hidden_layers)
        limit = getattr(self.model.config, "max_position_embeddings", None)  # CLIP's text tower: 77
        if limit is not None and cfg.data.max_words > int(limit):
            raise UserError(f"data.max_words={cfg.data.max_words} but the text encoder at model.text.path="
                            f"{text.path} has {limit} positions; set data.max_words to at most {limit}")
        if text.freeze_embeddings:
            self.model.get_input_embeddings().requires_grad_(False)
        if cfg.train.activation_checkpointing:  # transformers recomputes each layer (training only)
            _enable_hf_checkpointing(self.model, "text encoder")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return list(out.hidden_states)  # L+1 entries of [B, L, H]
