"""The model presets, defined once: each preset's levels and its defaults.

Owns: `Level` (a level's name, kind and where each tower's tokens come from), `PRESETS` (the
levels of hit, hcmi, hanet and flat), `PRESET_LOSS` (a preset's default loss and how its levels
combine), `preset_levels`, `level_names` and `learns_temperature`
(the preset default of `model.learnable_temperature`). `pipeline/config.py` validates names against
it at load; `pipeline/model/` builds the heads, losses and queues from it.
Must not touch: torch or any module; it is plain data, read by config and model alike.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Level:
    name: str
    kind: str  # "token" | "global"
    video_source: str  # frames | feature | clusters | windows | pooled
    text_source: str  # words | feature | clusters | pooled
    align: str = "max"  # token levels: max (TI: each token its best partner) | monotonic (time-ordered)


PRESETS: dict[str, tuple[Level, ...]] = {
    "hit": (Level("feature", "token", "feature", "feature"), Level("semantic", "global", "pooled", "pooled")),
    "hcmi": (Level("frame_word", "token", "frames", "words"), Level("clip_phrase", "token", "clusters", "clusters"),
             Level("video_sentence", "global", "pooled", "pooled")),
    "hanet": (Level("individual", "token", "frames", "words"), Level("local", "token", "windows", "clusters"),
              Level("global", "global", "pooled", "pooled")),
    "flat": (Level("global", "global", "pooled", "pooled"),),
}
# model.token_align: how a token level reduces its token x token matrix (pipeline/model/levels.py)
TOKEN_ALIGNS = ("max", "monotonic", "directed")
# (model.loss, model.loss_on) where the config leaves them null: HANet's released code (Roc-Ng/HANet
# mlmatch.py, pipeline/model/FIDELITY.md) trains one VSE++ hinge on the mean of its level scores;
# the other presets' papers train an InfoNCE per level. Not tuned: a fidelity default.
PRESET_LOSS = {"hanet": ("hinge", "fused")}
LEARNED_TEMPERATURE = ("hcmi",)  # presets whose temperature is learnable unless model.learnable_temperature says


def preset_levels(preset: str) -> tuple[Level, ...]:
    return PRESETS[preset]


def level_names(preset: str) -> list[str]:
    return [lv.name for lv in PRESETS[preset]]


def learns_temperature(preset: str, learnable: bool | None) -> bool:
    """`model.learnable_temperature`, or the preset's default when it is None."""
    return learnable if learnable is not None else preset in LEARNED_TEMPERATURE
