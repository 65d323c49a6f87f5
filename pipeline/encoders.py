"""The two backbones: a video encoder (per-frame ViT + temporal transformer) and a text encoder.

Both return every layer's token states so the level heads (pipeline/levels.py) can read a lower
layer (HiT's feature level) as well as the top one:

- `VideoEncoder(video [B,T,C,H,W]) -> list of [B,T,W]`: entry 0 is the per-frame ViT feature
  (pooled CLS) plus a learned temporal position embedding, entry i the output of temporal layer i.
  The position embedding makes frame order matter (the synthetic task differs only by order).
- `TextEncoder(input_ids [B,L], attention_mask [B,L]) -> list of [B,L,H]`: the transformers
  model's hidden states (entry 0 = embeddings).

The frame ViT is transformers' `CLIPVisionModel`: loaded from a local CLIP checkpoint directory
when `model.vision.clip_path` is set, else built from `model.vision.*` with random weights.
Nothing ever touches the network (`local_files_only`).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.text_model import load_text_model


def build_frame_vit(cfg: Config) -> nn.Module:
    """transformers' CLIP vision tower, from `model.vision.clip_path` or random init from the config."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vis = cfg.model.vision
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
        return model
    if cfg.data.size % vis.patch_size:
        raise UserError(f"data.size={cfg.data.size} is not a multiple of model.vision.patch_size={vis.patch_size}; "
                        "change one of them")
    config = CLIPVisionConfig(hidden_size=vis.width, intermediate_size=4 * vis.width, num_hidden_layers=vis.layers,
                              num_attention_heads=vis.heads, image_size=cfg.data.size, patch_size=vis.patch_size,
                              num_channels=3, attention_dropout=cfg.model.dropout)
    return CLIPVisionModel(config)


class VideoEncoder(nn.Module):
    """Per-frame ViT, then a temporal transformer over the T frame tokens."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.vit = build_frame_vit(cfg)
        self.width = int(self.vit.config.hidden_size)
        self.image_size = int(self.vit.config.image_size)
        self.max_frames = cfg.model.max_frames
        self.temporal_pos = nn.Parameter(torch.randn(cfg.model.max_frames, self.width) * 0.02)  # [Tmax, W]
        heads = self.vit.config.num_attention_heads
        self.temporal = nn.ModuleList([
            nn.TransformerEncoderLayer(self.width, heads, 4 * self.width, dropout=cfg.model.dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(cfg.model.temporal_layers)])
        self.num_layers = cfg.model.temporal_layers

    def forward(self, video: torch.Tensor) -> list[torch.Tensor]:
        b, t = video.shape[:2]  # video: [B, T, C, H, W]
        if t > self.max_frames:
            raise UserError(f"clips have {t} frames but model.max_frames={self.max_frames}; raise model.max_frames")
        frames = video.reshape(b * t, *video.shape[2:])  # [B*T, C, H, W]
        resize = frames.shape[-1] != self.image_size or frames.shape[-2] != self.image_size
        feats = self.vit(pixel_values=frames, interpolate_pos_encoding=resize).pooler_output  # [B*T, W]
        x = feats.reshape(b, t, self.width) + self.temporal_pos[:t]  # [B, T, W]
        states = [x]
        for layer in self.temporal:
            x = layer(x)  # [B, T, W]
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
        if text.freeze_embeddings:
            self.model.get_input_embeddings().requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return list(out.hidden_states)  # L+1 entries of [B, L, H]
