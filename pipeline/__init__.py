"""Owns: the training library in subpackages: data, model, train, eval; shared at the top: config,
presets, errors, log, distributed, atomic_write, faults.
Must not touch: SLURM, Ray clusters or process launching (launch/).
"""
