"""Owns: the training library in subpackages: data, model, train, eval; shared at the top: config,
presets, errors, log, distributed, atomic_write, faults; and the public inference API: api (installed
as the package `hiervl`, from _hiervl/) and export (the self-contained model directory).
Must not touch: SLURM, Ray clusters or process launching (launch/).
"""
