"""Model: the hierarchical dual-stream model and its objective.

Owns: the encoders (`encoders`, `text_model`), the level heads and presets' levels (`levels`),
the model that returns embeddings (`hierarchical`), the losses (`losses`), the momentum queue
(`queue`) and the objective that combines them with rank and world size as arguments (`objective`).
Must not touch: data loading, DeepSpeed, checkpoints or files; collectives go through
`hiervl.distributed`.
"""
