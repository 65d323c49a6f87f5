"""Owns: the `hiervl` command and everything that starts processes: subcommands, local launches,
DeepSpeed hostfiles, SLURM, Ray jobs.
Must not touch: model or data logic (pipeline/, dataprep/).
"""
