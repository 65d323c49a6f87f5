"""Data: from a prepared dataset directory to batches.

Owns: the epoch order and rank slicing (`sampler`), decoding and the frame transform (`decode`,
DALI or PyAV), the dataset index and the resumable loader (`loader`), and the manifest contract
(`manifest`: columns, row, quarantine row, `dataset.json` schema version).
Must not touch: the model, the objective, the trainer or checkpoints; it yields batches and positions.
"""
