"""`sshd` in every node of a tests/netns.py cluster, under a throwaway key: DeepSpeed's default
pdsh/ssh launch across the namespaces, as on a cluster with passwordless ssh between nodes.

`start_sshd(cluster)` makes a folder `<cluster.root>/ssh` holding a fresh host key and client key
(ed25519, no passphrase, made for this cluster only), `authorized_keys`, a `known_hosts` naming the
nodes (strict host-key checking stays on) and two configs; starts `sshd -D` in each node on port 22
(each node has its own network, so the machine's port 22 is untouched), and binds the client config
over /etc/ssh/ssh_config inside the nodes only, so a plain `ssh n2` or pdsh there uses the
throwaway key: nothing is written to ~/.ssh or /etc/ssh of the machine. The sshd processes live in
the nodes' namespaces: `cluster.close()` kills them with everything else, also after a failure.

Needs openssh-server (sshd, ssh-keygen) and openssh-client; `available()` says in one line what is
missing. pdsh is checked separately (`available(pdsh=True)`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def available(pdsh: bool = False) -> str | None:
    """None when sshd (and pdsh, if asked) can run here, else one line saying what to install."""
    missing = [name for name, found in (("sshd", Path(SSHD).is_file()), ("ssh", shutil.which("ssh")),
                                        ("ssh-keygen", shutil.which("ssh-keygen")))
               if not found]
    if pdsh and not shutil.which("pdsh"):
        missing.append("pdsh")
    if missing:
        return f"{', '.join(missing)} missing: apt-get install openssh-server openssh-client pdsh"
    return None


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "hiervl-netns-throwaway", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)
    return path.with_suffix(".pub").read_text().strip()


def start_sshd(cluster, timeout: float = 30.0) -> Path:
    """Start sshd in every node of `cluster` and wait until `ssh <node> hostname` answers from each
    (from n1); returns the folder with keys, configs and each node's sshd log (sshd-<node>.log)."""
    d = cluster.root / "ssh"
    d.mkdir(mode=0o700)
    host_pub = _keygen(d / "host_ed25519")
    (d / "authorized_keys").write_text(_keygen(d / "id_ed25519") + "\n")
    names = ",".join([*cluster.names, *(cluster.addr[n] for n in cluster.names)])
    (d / "known_hosts").write_text(f"{names} {host_pub}\n")
    (d / "sshd_config").write_text(
        "Port 22\n"
        f"HostKey {d / 'host_ed25519'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PidFile none\n"
        "StrictModes no\n"  # the key folder lies under /tmp (world-writable), which StrictModes refuses
        "UsePAM no\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "MaxStartups 64\n"  # pdsh opens one session per node at once
        "LogLevel ERROR\n")
    (d / "ssh_config").write_text(
        "Host *\n"
        f"  IdentityFile {d / 'id_ed25519'}\n"
        "  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {d / 'known_hosts'}\n"
        "  StrictHostKeyChecking yes\n"
        "  BatchMode yes\n"
        "  ConnectTimeout 10\n")
    for f in ("host_ed25519", "id_ed25519"):
        os.chmod(d / f, 0o600)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation folder (built in)
    cluster.bind(d / "ssh_config", "/etc/ssh/ssh_config")
    for node in cluster.names:
        with open(d / f"sshd-{node}.log", "ab") as log:
            cluster.popen(node, [SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    for node in cluster.names:
        while True:
            res = cluster.run(cluster.names[0], ["ssh", node, "hostname"], timeout=20)
            if res.returncode == 0 and res.stdout.strip() == node:
                break
            if time.time() > deadline:
                logs = "".join((d / f"sshd-{n}.log").read_text(errors="replace")[-500:] for n in cluster.names)
                raise RuntimeError(f"ssh {node} hostname from {cluster.names[0]} failed for {timeout:.0f} s: "
                                   f"{res.stdout.strip()[-500:]}\nsshd logs: {logs}")
            time.sleep(0.3)
    return d


def stop_sshd(cluster) -> None:
    """Kill sshd in every node and whatever its sessions left running; the nodes stay up."""
    cluster.kill_all()
    cluster.unbind("/etc/ssh/ssh_config")
