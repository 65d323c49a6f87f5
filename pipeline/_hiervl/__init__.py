"""hiervl: use a trained hierarchical video-text retrieval model from Python.

    import hiervl
    model = hiervl.load("runs/demo/model")      # an export (hiervl export), a run or a checkpoint
    t = model.encode_text(["first the green square slides right"])
    v = model.encode_video(["clip.webm"])
    s = model.similarity(t, v)                  # {level: [Nt, Nv], "fused": [Nt, Nv]}

This package is the public name of `pipeline.api` (the code lives there; packaging maps the
folder pipeline/_hiervl/ to `hiervl`): see that module for the preprocessing it applies.
"""

from importlib.metadata import PackageNotFoundError, version

from pipeline.api import HierVLModel, Preprocessing, load, resolve_device

__all__ = ["HierVLModel", "Preprocessing", "load", "resolve_device"]
try:
    __version__ = version("hiervl")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "unknown"
