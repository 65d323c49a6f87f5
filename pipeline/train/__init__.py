"""Training: one DeepSpeed run, from config to checkpoints.

Owns: the training loop (`trainer`), the checkpoint and resume contract (`checkpoint`), the
DeepSpeed JSON built from the config (`deepspeed_config`).
Must not touch: SLURM, Ray or process launching (that is `launch/`); model or data internals
beyond their public builders.
"""
