"""Reading torch pickles someone else wrote without running their code.

A `.pt` file is a pickle: `torch.load(weights_only=False)` calls whatever callable the file names
(`os.system`, `subprocess.Popen`...), so a checkpoint handed to `hiervl.load`, `eval`, `export`,
`search` (through the checkpoint an index names) or `train.resume` could run anything, and its
`meta.json` sha256 manifest does not help: whoever hands you the files writes the manifest too.

Every torch file hiervl reads goes through `load` (torch's `weights_only=True` unpickler: tensors,
containers, numbers, strings, plus the few classes in SAFE_GLOBALS that our own and DeepSpeed's
checkpoints hold). DeepSpeed reads its own files with `weights_only=False`; `deepspeed_loads_safely`
makes those reads go through `load` too, and `check_files` refuses a folder holding a file that
names any other global before a subprocess (the universal-checkpoint converter) reads it. A file
that names a global outside the list is refused in one line naming the file and the global: it
never runs.

Owns: which Python objects a torch file may hold.
Must not touch: checkpoint layout (pipeline/train/checkpoint.py).
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import torch
from hiervl.errors import UserError


def _safe_globals() -> list:
    """The classes a hiervl or DeepSpeed checkpoint legitimately holds besides tensors: NumPy's RNG
    state (rank{R}.pt) and DeepSpeed's ZeRO optimizer bookkeeping. None of them runs code when built."""
    import numpy as np

    found = [np.ndarray, np.dtype]
    core = getattr(np, "_core", None) or np.core
    found.append(core.multiarray._reconstruct)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)]
    try:  # DeepSpeed's optimizer-state files (ZeRO 1-3); absent when DeepSpeed is not installed (an export user)
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        found += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:
        pass
    return found


SAFE_GLOBALS_CACHE: list = []


def safe_globals() -> list:
    if not SAFE_GLOBALS_CACHE:
        SAFE_GLOBALS_CACHE.extend(_safe_globals())
    return SAFE_GLOBALS_CACHE


class UnsafeFileError(UserError):
    """A torch file that would run code (or build an object we do not allow) when loaded."""


def _refusal(path, exc: BaseException) -> UnsafeFileError:
    text = str(exc)
    glob = None
    for marker in ("Unsupported global: GLOBAL ", "GLOBAL "):
        if marker in text:
            glob = text.split(marker, 1)[1].split()[0].rstrip(".,;:")
            break
    what = f"names the Python object {glob}" if glob else f"is not a plain tensor file ({text.splitlines()[0][:200]})"
    return UnsafeFileError(f"{path} {what}, which loading would build or run; refused (hiervl loads only tensors "
                           "from checkpoints): use a checkpoint you trust, or an export (model.safetensors)")


_real_torch_load = torch.load


def load(path, map_location="cpu", **kwargs):
    """`torch.load(path, weights_only=True)` with SAFE_GLOBALS allowed; an UnsafeFileError naming the
    file and the global for anything else (nothing in the file runs)."""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return _real_torch_load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None
    except RuntimeError as exc:
        if "weights_only" in str(exc) or "Unsupported" in str(exc):
            raise _refusal(path, exc) from None
        raise


@contextlib.contextmanager
def deepspeed_loads_safely():
    """Inside: every `torch.load` (DeepSpeed's engine.load_checkpoint, zero_to_fp32) is `load` above,
    whatever `weights_only` its caller passed."""
    def patched(f, map_location=None, *_, **kwargs):
        kwargs.pop("weights_only", None)
        kwargs.pop("pickle_module", None)
        return load(f, map_location=map_location, **kwargs)

    torch.load = patched
    try:
        yield
    finally:
        torch.load = _real_torch_load


def unsafe_globals(path) -> list[str]:
    """Globals a torch file names beyond torch's own safe set and SAFE_GLOBALS (read without loading)."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in safe_globals()}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # noqa: BLE001 - not a torch zip file at all
        raise UnsafeFileError(f"{path} is not a torch checkpoint file ({type(exc).__name__}); use a checkpoint you "
                              "trust") from None
    return [n for n in names if n not in allowed and n.replace("numpy._core", "numpy.core") not in allowed
            and n.replace("numpy.core", "numpy._core") not in allowed]


def check_files(folder: Path, skip_unreadable: bool = False) -> None:
    """Refuse (UnsafeFileError) when any `*.pt` file under `folder` names a global outside the safe set:
    before a subprocess that loads them with weights_only=False (DeepSpeed's universal converter).
    `skip_unreadable`: a file that is not a torch zip at all (truncated, damaged) is left to the
    caller's integrity check and fallback (every in-process load is weights_only anyway)."""
    for path in sorted(Path(folder).rglob("*.pt")):
        try:
            bad = unsafe_globals(path)
        except UnsafeFileError:
            if skip_unreadable:
                continue
            raise
        if bad:
            raise _refusal(path, RuntimeError(f"GLOBAL {bad[0]}"))
