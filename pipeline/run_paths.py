"""Paths a run records (data.path, train.out_dir, index.json "data"): absolute, so they work from anywhere.

`hiervl train` stores its resolved config in the run folder and in every checkpoint, and
`hiervl eval` writes the dataset it read into index.json; `hiervl eval` and `hiervl search` read
them back later, often from another directory. `absolute_paths` makes a config's local paths
absolute before it is stored; `find_recorded` reads a relative path that an older run recorded:
from the current directory, else from the nearest ancestor of the folder that recorded it (the
directory the run was started in, for a run under it). URLs (`s3://`, `gs://`, `http(s)://`) are
left as written.

Owns: which config fields are paths, and resolving them.
Must not touch: what lives at those paths.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hiervl.config import Config


def is_url(path: str) -> bool:
    """An object-store or web address (`s3://`, `gs://`, `http(s)://`): left as written."""
    return "://" in str(path)


def absolute(path: str | None) -> str | None:
    """`path` made absolute (from the current directory) unless it is None, a URL or already absolute."""
    if path is None or is_url(path) or Path(path).is_absolute():
        return path
    return str(Path(path).resolve())


def absolute_paths(cfg: Config) -> Config:
    """A copy of `cfg` whose local paths are absolute: data.path, train.out_dir,
    train.deepspeed_config, a train.resume path, model.vision.clip_path and a model.text.path."""
    t, m = cfg.train, cfg.model
    resume = t.resume if t.resume in ("auto", "never") else absolute(t.resume)
    text_path = m.text.path if m.text.path == "default" else absolute(m.text.path)
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, path=absolute(cfg.data.path)),
        train=dataclasses.replace(t, out_dir=absolute(t.out_dir), deepspeed_config=absolute(t.deepspeed_config),
                                  resume=resume),
        model=dataclasses.replace(m, vision=dataclasses.replace(m.vision, clip_path=absolute(m.vision.clip_path)),
                                  text=dataclasses.replace(m.text, path=text_path)))


def find_recorded(path: str | None, recorded_in: str | Path) -> str | None:
    """A path read from a run folder (a checkpoint's data.path, index.json "data"): as written when it
    is absolute, a URL or exists from here; else the first ancestor of `recorded_in` under which it
    exists; else as written (the reader then names it in its error)."""
    if path is None or is_url(path) or Path(path).is_absolute() or Path(path).exists():
        return path
    for parent in Path(recorded_in).resolve().parents:
        if (parent / path).exists():
            return str(parent / path)
    return path
