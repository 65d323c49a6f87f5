"""hiervl: pretrain, evaluate and use hierarchical video-text retrieval models.

    import hiervl
    model = hiervl.load("runs/demo/model")      # an export (hiervl export), a run or a checkpoint
    t = model.encode_text(["first the green square slides right"])
    v = model.encode_video(["clip.webm"])
    s = model.similarity(t, v)                  # {level: [Nt, Nv], "fused": [Nt, Nv]}

The folder `pipeline/` installs as the package `hiervl` (pyproject `package-dir`), with `launch/` as
`hiervl.launch`, `dataprep/` as `hiervl.dataprep` and `configs/` as `hiervl.configs`.

Owns: the library in subpackages (data, model, train, eval); shared at the bottom: config, presets,
errors, log, distributed, storage, atomic_write, faults; the public API re-exported here lazily (so
`import hiervl.launch.cli` does not import torch).
Must not touch: SLURM, Ray clusters or process launching (hiervl.launch).
"""

from importlib.metadata import PackageNotFoundError, version

if __name__ != "hiervl":  # e.g. `import pipeline` from the repository root: two names, two Config classes
    raise ImportError(f"this folder is the package `hiervl`, not `{__name__}`: `import hiervl` "
                      "(install it with `make install` or `pip install -e .`)")

__all__ = ["HierVLModel", "Preprocessing", "UserError", "load", "resolve_device"]
try:
    __version__ = version("hiervl")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"


def __getattr__(name: str):
    if name == "UserError":
        from hiervl.errors import UserError
        return UserError
    if name in ("HierVLModel", "Preprocessing", "load", "resolve_device"):
        from hiervl import api
        return getattr(api, name)
    raise AttributeError(f"module 'hiervl' has no attribute {name!r}")
