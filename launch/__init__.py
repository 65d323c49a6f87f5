"""Owns: the `hiervl` command and everything that starts processes: subcommands, local launches,
DeepSpeed hostfiles, SLURM, Ray jobs.
Must not touch: model or data logic (pipeline/, dataprep/).
"""

if __name__ != "hiervl.launch":  # imported as a top-level `launch` from the repository root
    raise ImportError(f"this folder is the package `hiervl.launch`, not `{__name__}`: `import hiervl.launch`")
