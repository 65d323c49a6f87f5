"""The model a command's --checkpoint / RUN names, made local: an object-store URL (a checkpoint.dir such
as s3://bucket/run/checkpoints, or one stepNNNNNNNN under it) is downloaded into this user's cache and
verified first (pipeline/train/checkpoint_remote.fetch_for_inference); a local path is left as it is.

Owns: where eval, export and search turn a remote checkpoint into a local folder.
Must not touch: how a checkpoint is read (run_dir.load_model_for_inference).
"""

from __future__ import annotations


def local_model_path(path, storage=None):
    """`path` itself, or the local copy of the remote checkpoint it names."""
    from hiervl.storage import is_remote

    if path is None or not is_remote(str(path)):
        return path
    from hiervl.train.checkpoint_remote import fetch_for_inference

    return str(fetch_for_inference(str(path), storage))
