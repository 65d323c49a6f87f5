"""The public Python API, importable as `hiervl`: load a trained model, embed captions and videos, score them.

    import hiervl

    model = hiervl.load("runs/demo/train")                # a run, a checkpoint, or `hiervl export` output
    t = model.encode_text(["first the green square slides right"])      # {level: [1, ...], ...}
    v = model.encode_video(["clip.webm", frames])         # paths, or uint8 frames [T, H, W, 3]
    s = model.similarity(t, v)                            # {level: [1, 2], "fused": [1, 2]}

Preprocessing is the evaluation's, the same code as the eval loader's (`hiervl.data.preprocess`),
read from the model's own config: a video's `data.num_frames` frames are the centres of that many
equal segments of the whole clip, decoded by DALI or PyAV exactly as the eval loader picks
them (`hiervl.data.decode.choose_backend`), then the clip transform resizes the short side to
`data.short_side`, centre-crops `data.size`, and normalises with `data.mean` / `data.std`; frame
differences and the rest of the video tower's inputs are made inside the model. Captions are
tokenized like the eval loader's (padded to `data.max_words`, truncated). So for a video of a
prepared dataset, the embeddings are those `hiervl eval` computes. `hiervl prep`'s own step
(re-timing to `prep.fps`, scaling to `prep.short_side`) is not repeated: pass a prepared clip, or
frames at the rate and size the model was trained on, for the same numbers as on the dataset.

Outputs are dicts of float32 tensors on the model's device: per level `[N, D]` (global levels) or
`[N, n, D]` (token levels, with a `<level>_mask` [N, n] bool for text, and with
`model.token_align=directed` a `<level>_dir` [N] direction logit), L2-normalised.
`similarity` gives `[Nt, Nv]` per level and `fused` (the `model.level_weights` mean), the scores
eval ranks by.

Owns: `load`, `HierVLModel` (encode_text, encode_video, similarity). `Preprocessing` is
pipeline/data/preprocess.py's (re-exported here), so these tensors are the eval loader's.
Must not touch: training, checkpoint writing, or the eval's metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from hiervl.data.preprocess import Preprocessing, probe_video
from hiervl.distributed import resolve_device
from hiervl.errors import UserError

__all__ = ["HierVLModel", "Preprocessing", "load", "probe_video", "resolve_device"]


class HierVLModel:
    """A trained hiervl model ready to embed: see the module docstring. Made by `load`."""

    def __init__(self, towers, cfg, device: torch.device, decoder: str = "auto", source: str = ""):
        self.towers = towers.to(device).eval()  # QueryTowers (or HierarchicalModel): the query towers + heads
        self.cfg = cfg
        self.device = device
        self.decoder = decoder  # auto | dali | pyav, as data.decoder
        self.source = source
        self.preprocessing = Preprocessing.from_config(cfg)
        self._tokenizer = None
        self._dali = None

    def __repr__(self) -> str:
        return (f"HierVLModel(preset={self.cfg.model.preset!r}, levels={self.levels}, device={str(self.device)!r}, "
                f"source={self.source!r})")

    @property
    def levels(self) -> list[str]:
        """The preset's level names (the keys of `similarity` besides 'fused')."""
        return list(self.towers.levels)

    # ------------------------------------------------------------------ text

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from hiervl.model.text_model import load_tokenizer

            self._tokenizer = load_tokenizer(self.cfg.model.text.path)
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask [N, max_words] int64, as the eval loader tokenizes captions."""
        return self.preprocessing.tokenize(self.tokenizer, texts)

    @torch.no_grad()
    def encode_text(self, texts: list[str] | str, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Level embeddings of captions: {level: [N, D] | [N, L', D], level_mask: [N, L']}."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise UserError("encode_text takes a non-empty list of strings")
        parts = []
        for lo in range(0, len(texts), batch_size):
            tok = self.tokenize(texts[lo:lo + batch_size])
            out = self.towers.encode_text(tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))
            parts.append({k: x.float() if x.is_floating_point() else x for k, x in out.items()})
        return _cat(parts)

    # ------------------------------------------------------------------ video

    def _decode(self, data: bytes, frames: np.ndarray, codec: str, name: str, turns: int = 0):
        """Frames `frames` of an encoded video, uint8 [T, H, W, 3] upright, by the eval loader's decoder
        choice (PyAV for a video with a display rotation: pipeline/data/video_file.py turns it)."""
        from hiervl.data.decode import DaliVideoDecoder, choose_backend
        from hiervl.data.decode_pool import resolve_decode_workers
        from hiervl.data.video_file import decode_video_file

        where = "gpu" if self.device.type == "cuda" else "cpu"
        # the eval loader's choice: with decode workers (data.decode_workers, auto on a CPU machine) it is PyAV
        workers = resolve_decode_workers(self.cfg.data.decode_workers, where, 1)
        try:
            backend = "pyav" if turns else choose_backend(self.decoder, codec, where, workers=workers)
        except RuntimeError as exc:  # decoder=dali without DALI installed
            raise UserError(str(exc).replace("data.decoder", "decoder")) from None
        if backend == "dali":
            if self._dali is None:
                self._dali = DaliVideoDecoder(1, 1, where, (self.device.index or 0) if where == "gpu" else None)
            (res,) = self._dali.decode([data], [frames])
            if isinstance(res, Exception):
                raise UserError(f"{name}: DALI could not decode it ({res})")
            return res
        return decode_video_file(data, frames, name, turns)

    def preprocess_video(self, video) -> torch.Tensor:
        """One video (a path, encoded bytes, or uint8 frames [T, H, W, 3] of the whole clip) ->
        the model's input [num_frames, 3, size, size] float32, as the eval loader makes it."""
        p = self.preprocessing
        if isinstance(video, (str, Path, bytes, bytearray)):
            if isinstance(video, (bytes, bytearray)):
                data, name = bytes(video), "video bytes"
            else:
                path = Path(video).expanduser()
                if not path.is_file():
                    raise UserError(f"video {path} does not exist")
                data, name = path.read_bytes(), str(path)
            return p.clip_from_bytes(data, name, lambda data, idx, codec, turns: self._decode(data, idx, codec, name, turns))
        frames = video.cpu() if isinstance(video, torch.Tensor) else np.asarray(video)
        is_uint8 = frames.dtype == (torch.uint8 if isinstance(frames, torch.Tensor) else np.uint8)
        if not is_uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise UserError(f"a video as frames must be uint8 [T, H, W, 3] (RGB); got {tuple(frames.shape)} "
                            f"{frames.dtype}")
        if len(frames) == 0:
            raise UserError("a video as frames has no frames (T = 0)")
        return p.clip_from_frames(frames)  # [T, 3, S, S]

    @torch.no_grad()
    def encode_video(self, videos, batch_size: int = 8) -> dict[str, torch.Tensor]:
        """Level embeddings of videos: {level: [N, D] | [N, T', D]}.

        `videos`: one video or a list; each a path (str / Path), encoded bytes, or uint8 frames
        [T, H, W, 3] (numpy or torch) of the whole clip. A single [N, T, H, W, 3] uint8 array is N clips.
        """
        if isinstance(videos, (str, Path, bytes, bytearray)):
            videos = [videos]
        elif isinstance(videos, (np.ndarray, torch.Tensor)):
            videos = [videos] if videos.ndim == 4 else list(videos)
        videos = list(videos)
        if not videos:
            raise UserError("encode_video takes a non-empty list of videos")
        dtype = next(self.towers.parameters()).dtype
        parts = []
        for lo in range(0, len(videos), batch_size):
            clips = torch.stack([self.preprocess_video(v) for v in videos[lo:lo + batch_size]])  # [B, T, 3, S, S]
            out = self.towers.encode_video(clips.to(device=self.device, dtype=dtype))
            parts.append({k: x.float() if x.is_floating_point() else x for k, x in out.items()})
        return _cat(parts)

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def similarity(self, text_emb: dict, video_emb: dict) -> dict[str, torch.Tensor]:
        """{level: [Nt, Nv], "fused": [Nt, Nv]}: the scores `hiervl eval` ranks by."""
        t = {k: x.to(self.device) for k, x in text_emb.items()}
        v = {k: x.to(self.device) for k, x in video_emb.items()}
        missing = [n for n in self.levels if n not in t or n not in v]
        if missing:
            raise UserError(f"similarity needs embeddings of levels {self.levels}; missing {missing} (embed with "
                            "this model's encode_text / encode_video)")
        return self.towers.similarity(t, v)


def _cat(parts: list[dict]) -> dict:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def load(path: str | Path, device="auto", decoder: str = "auto") -> HierVLModel:
    """A trained model from a training run directory (train.out_dir), one of its checkpoint folders,
    or an export directory (`hiervl export RUN --out DIR`).

    device: 'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'. decoder: auto | dali | pyav
    (as data.decoder: auto picks DALI where it can decode the codec, PyAV otherwise). An export loads
    with neither DeepSpeed nor the checkpoint.
    """
    from hiervl.run_dir import MODEL_PATHS, load_model_for_inference

    dev = resolve_device(device)
    if decoder not in ("auto", "dali", "pyav"):
        raise UserError(f"decoder={decoder!r}: use 'auto', 'dali' or 'pyav'")
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"hiervl.load: {path} does not exist; pass {MODEL_PATHS}")
    towers, cfg = load_model_for_inference(path, setting="hiervl.load's path")  # an export: no DeepSpeed
    return HierVLModel(towers, cfg, dev, decoder, source=str(path))
