"""What a clip and a caption go through before the towers: the one owner of preprocessing.

    prep = Preprocessing.from_config(cfg.data)
    frames, crop, flip = prep.plan(total_frames)             # eval: centres, centre crop, no flip
    frames, crop, flip = prep.plan(total_frames, rng, flip=True)   # training: random (rng: sample_rng)
    clip = prep.clip(uint8_frames, crop, flip)                # [T, H, W, 3] uint8 -> [T, 3, S, S] float
    u8 = prep.resize_crop(uint8_frames, crop, flip)           # the CPU half: [T, 3, S, S] uint8 (decode workers)
    prep.normalize(u8, out=batch_slot)                        # the other half: -> float, into a batch slot
    clip = prep.clip_from_bytes(encoded, "a.webm")            # probe + eval plan + PyAV decode + clip
    tok = prep.tokenize(tokenizer, ["a caption"])            # input_ids, attention_mask [N, L] int64

Frame plan: `num_frames` frames at the centres (eval) or at a random point (training) of that
many equal segments of the whole clip (`sampler.frame_indices`). Clip: the short side resized to
`short_side` (bilinear, antialiased), a `size` crop (centre in eval), `(x / 255 - mean) / std`
(`decode.transform_clip`). Caption: the model's tokenizer (passed in: data/ does not import the
model), padded to and truncated at `max_words`.

The clip transform comes whole (`clip`) or in its two halves (`resize_crop` in the decode worker
processes, whose uint8 clips are a quarter of float32's bytes, then `normalize` while the loader
assembles the batch): the same arithmetic either way (decode.py).

The eval loader, the decode worker processes, `hiervl.load(...).encode_video`, `hiervl search
index` and the export all call this module, so their tensors for one clip are identical; the
model fingerprint (eval/fingerprint.py) hashes the same fields.

Owns: `Preprocessing` (its fields, the frame plan, the clip transform and its two halves, tokenising) and `probe_video`.
Must not touch: decoding backends (decode.py), sample order (sampler.py) or the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import numpy as np
import torch
from hiervl.data.decode import normalize_clip, resize_crop_uint8, transform_clip
from hiervl.data.sampler import frame_indices

CENTRE = (0.5, 0.5)


@dataclass(frozen=True)
class Preprocessing:
    """The settings a clip and a caption are preprocessed with (the data section's, as trained)."""

    num_frames: int  # frames per clip: one in each of num_frames equal segments
    size: int  # square crop after the resize
    short_side: int  # the short side is resized to this (bilinear, antialiased)
    mean: tuple[float, float, float]  # (x / 255 - mean) / std, RGB
    std: tuple[float, float, float]
    max_words: int  # tokens per caption (padded, truncated)

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The field names: the data settings that change an embedding (the fingerprint hashes them)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_config(cls, data) -> "Preprocessing":
        """From a DataConfig (or a whole Config: its `data`)."""
        d = getattr(data, "data", data)
        return cls(int(d.num_frames), int(d.size), int(d.short_side), tuple(float(x) for x in d.mean),
                   tuple(float(x) for x in d.std), int(d.max_words))

    def to_dict(self) -> dict:
        """For export.json: the fields plus the eval plan in words (for tools that do not read hiervl)."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std),
                "frame_sampling": "centre of each of num_frames equal segments", "crop": "centre"}

    # ------------------------------------------------------------------ video

    def plan(self, total_frames: int, rng: np.random.Generator | None = None,
             flip: bool = False) -> tuple[np.ndarray, tuple[float, float], bool]:
        """(frame indices int32 [T], crop (y, x) in [0, 1], flip) of a clip of `total_frames` frames.
        Without `rng` (eval): segment centres, centre crop, no flip. With it (training): a random frame
        per segment, a random crop and, when `flip` is allowed, a coin flip; drawn in that order."""
        if rng is None:
            return frame_indices(total_frames, self.num_frames, None), CENTRE, False
        frames = frame_indices(total_frames, self.num_frames, rng)
        crop = (float(rng.random()), float(rng.random()))
        return frames, crop, bool(flip and rng.random() < 0.5)

    def check_frames(self, frames) -> None:
        """A ValueError unless the decoder returned the planned `num_frames` frames."""
        if len(frames) != self.num_frames:
            raise ValueError(f"decoder returned {len(frames)} frames, wanted {self.num_frames}")

    def clip(self, frames, crop: tuple[float, float] = CENTRE, flip: bool = False,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The planned frames, uint8 [T, H, W, 3] (CPU, or GPU from DALI mixed) -> the model's input
        [T, 3, size, size] in `dtype`."""
        self.check_frames(frames)
        return transform_clip(frames, self.short_side, self.size, crop, flip, self.mean, self.std, dtype)

    def resize_crop(self, frames, crop: tuple[float, float] = CENTRE, flip: bool = False) -> torch.Tensor:
        """The CPU half of `clip`: uint8 CPU frames [T, H, W, 3] -> uint8 [T, 3, size, size] (resized,
        cropped, flipped; not normalised)."""
        self.check_frames(frames)
        return resize_crop_uint8(frames, self.short_side, self.size, crop, flip)

    def normalize(self, clip: torch.Tensor, dtype: torch.dtype = torch.float32,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """The other half: uint8 [..., 3, S, S] (`resize_crop`'s) -> (x / 255 - mean) / std in `dtype`,
        written into `out` when given (a batch slot)."""
        return normalize_clip(clip, self.mean, self.std, dtype, out=out)

    def clip_from_frames(self, frames) -> torch.Tensor:
        """A whole clip given as frames, uint8 [N, H, W, 3] (numpy or torch) -> [T, 3, S, S] (eval plan)."""
        idx = self.plan(len(frames))[0]
        picked = frames[torch.as_tensor(idx, dtype=torch.long)] if isinstance(frames, torch.Tensor) else frames[idx]
        return self.clip(picked)

    def clip_from_bytes(self, data: bytes, name: str, decode=None) -> torch.Tensor:
        """An encoded video -> [T, 3, S, S] (eval plan), upright (a display rotation applied:
        video_file.py). `decode(data, frame_indices, codec, turns)` -> uint8 frames picks the decoder
        (default PyAV); a video that cannot be read is a UserError naming `name`."""
        from hiervl.data.video_file import decode_video_file, probe_video_file

        info = probe_video_file(data, name)  # UserError: no video stream, unreadable, truncated, no frames
        idx = self.plan(info.frames)[0]
        if decode is not None:
            return self.clip(decode(data, idx, info.codec, info.turns))
        return self.clip(decode_video_file(data, idx, name, info.turns))

    # ------------------------------------------------------------------ text

    def tokenize(self, tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask [N, max_words] int64 (N may be 0)."""
        texts = list(texts)
        tok = tokenizer(texts or [""], padding="max_length", truncation=True, max_length=self.max_words,
                        return_tensors="pt")
        return {"input_ids": tok["input_ids"][:len(texts)].long(),
                "attention_mask": tok["attention_mask"][:len(texts)].long()}


def probe_video(data: bytes, name: str) -> tuple[int, str]:
    """(frame count, codec name) of a user's encoded video, counted as the decoder indexes frames
    (`decode_pyav`: one per non-empty packet with a timestamp); a UserError when it has no video
    stream, is unreadable or truncated (video_file.py)."""
    from hiervl.data.video_file import probe_video_file

    info = probe_video_file(data, name)
    return info.frames, info.codec
