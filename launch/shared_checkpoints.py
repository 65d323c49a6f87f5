"""Before a multi-node run starts: is there one checkpoint location every node sees?

Every rank writes its part of each checkpoint, and a resume (on any node) reads all of them, so a
run on more than one machine needs checkpoints that all its nodes share. hiervl counts them as shared
when
  - checkpoint.dir is an object-store URL (s3://bucket/prefix, gs://...): nothing needs sharing;
  - every host of the run is this machine (127.0.0.1, localhost, an address of this machine);
  - train.out_dir is on a network filesystem (NFS, Lustre, GPFS, CephFS, BeeGFS, GlusterFS, CIFS, ...,
    read from /proc/self/mounts);
  - launch.shared_fs=true declares it (a folder mounted alike on every node that hiervl does not
    recognise); the ranks still check it at start (trainer.py `_check_shared_out_dir`).
Anything else (a plain local disk: ext4, xfs, tmpfs, overlay, ...) is refused in one line before
any rank starts, naming both fixes.

Owns: the shared-checkpoints rule for multi-node submissions.
Must not touch: launching itself (deepspeed_launch.py, slurm.py) or the checkpoint format.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from hiervl.errors import UserError
from hiervl.storage import is_remote

# filesystem types (as /proc/mounts names them) that one folder can be on several machines through
NETWORK_FS = ("nfs", "nfs4", "lustre", "gpfs", "cephfs", "ceph", "beegfs", "glusterfs", "fuse.glusterfs", "cifs",
              "smb3", "smbfs", "wekafs", "panfs", "fuse.juicefs", "fuse.gcsfuse", "fuse.s3fs", "fuse.mountpoint-s3",
              "9p", "virtiofs", "fuse.sshfs", "afs", "orangefs", "pvfs2", "ocfs2", "gfs2")


def filesystem_type(path: str | Path, mounts: str | None = None) -> str:
    """The type of the filesystem that holds `path` (or would, for a folder not made yet): the longest
    mount point of /proc/self/mounts above it."""
    path = Path(path).absolute()
    existing = next((p for p in [path, *path.parents] if p.exists()), Path("/"))
    real = str(existing.resolve() / path.relative_to(existing))  # symlinks above it followed
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return "unknown"
    best, kind = "", "unknown"
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def is_this_machine(host: str) -> bool:
    """Whether `host` names this machine: loopback, its own hostname, or an address it can bind."""
    if host in ("localhost", socket.gethostname()):
        return True
    try:
        addr = socket.getaddrinfo(host, None)[0][4][0]
    except OSError:
        return False
    if ipaddress.ip_address(addr).is_loopback:
        return True
    try:
        with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as s:
            s.bind((addr, 0))  # only an address of this machine can be bound here
        return True
    except OSError:
        return False


def check_shared_checkpoints(cfg, nodes: int, hosts: list[str] | None = None) -> None:
    """Refuse (UserError, one line) a run on `nodes` > 1 machines whose checkpoints are not shared."""
    if nodes <= 1 or is_remote(cfg.checkpoint.dir) or cfg.launch.shared_fs == "true":
        return
    if hosts and all(is_this_machine(h) for h in hosts):
        return
    out = cfg.train.out_dir
    kind = filesystem_type(out)
    if kind in NETWORK_FS:
        return
    raise UserError(f"train.out_dir={out} is on {kind}, a filesystem local to one machine, but this run has {nodes} "
                    "nodes, each writing its part of every checkpoint: set checkpoint.dir=s3://BUCKET/PREFIX (nodes "
                    f"that share no filesystem), or launch.shared_fs=true if {out} is one folder every node sees")
