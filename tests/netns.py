"""Several "hosts" on one machine: network namespaces joined by a bridge, for multi-node tests.

Each node (n1, n2, ...) is a network namespace with its own loopback, one interface named as on
real clusters and named differently per node (n1: eno1, n2: ens5, n3: enp3s0, so a launch that
sends one GLOO/NCCL_SOCKET_IFNAME to every node fails here as it would there) and an address in
10.77.0.0/24, a private range that exists only inside these namespaces. The bridge lives in a
namespace of its own (`<prefix>-hub`): nothing is added to the machine's own network. A command
started with `Cluster.popen(node, argv)` also gets its own hostname (UTS namespace: `hostname`
says n1) and its own mount namespace, in which `/etc/hosts` names the nodes (the node's own name as 127.0.1.1, as
Debian installs it: a launch that trusts its hostname to find its address gets loopback) and `Cluster.local`
(one path) is that node's private folder: shared-nothing where a test wants it. The hub's bridge
has the address HUB_ADDR (10.77.0.254), where a service every node reaches can run (`hub_argv`). `cut(node)` takes
a node's link down (packets are dropped, no reset: a partition, not a crash); `heal(node)` brings
it back. `close()` kills every process left in the namespaces and deletes them, also after a
failure (the fixture calls it; so does `down`).

Needs root (`ip netns add`); `available()` says in one line why not, for a pytest skip.

A person can use it too:
  python tests/netns.py up --prefix hv1                # start n1, n2; print how to use them
  python tests/netns.py up --prefix hv1 --ssh          # ... with sshd in each (throwaway key)
  python tests/netns.py exec --prefix hv1 n2 -- hostname
  python tests/netns.py down --prefix hv1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUBNET = "10.77.0"  # a private /24 that only these namespaces have
HUB_ADDR = f"{SUBNET}.254"  # the bridge's own address in the hub: a service every node reaches (an S3 server)
IFNAMES = ("eno1", "ens5", "enp3s0", "eth1")  # one per node, different on purpose
STATE = Path(tempfile.gettempdir()) / "hiervl-netns"  # <prefix>.json: what `down` must remove


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def available() -> str | None:
    """None when namespaces can be made here, else one line saying why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run as root to test distinct hosts"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "iproute2's `ip` or util-linux's `unshare` is missing (apt-get install iproute2 util-linux)"
    name = f"hvprobe{os.getpid()}"
    res = _ip("netns", "add", name, check=False)
    if res.returncode != 0:
        return f"cannot create a network namespace here: {res.stderr.strip() or res.stdout.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class Cluster:
    """Nodes n1..nN on a bridge (see the module docstring). Use as a context manager."""

    def __init__(self, nodes: int = 2, prefix: str | None = None, root: str | Path | None = None):
        self.prefix = prefix or f"hv{os.getpid() % 100000}"
        self.names = [f"n{i + 1}" for i in range(nodes)]
        self.addr = {n: f"{SUBNET}.{i + 1}" for i, n in enumerate(self.names)}
        self.ifname = {n: IFNAMES[i % len(IFNAMES)] for i, n in enumerate(self.names)}
        self.root = Path(root or tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.local = self.root / "local"  # one path; each node sees its own folder mounted there
        self.procs: list[subprocess.Popen] = []
        self.hub = f"{self.prefix}-hub"
        self.binds: list[tuple[str, str]] = []  # (source, target): mounted in every node's mount namespace

    def bind(self, source: str | Path, target: str | Path) -> None:
        """From now on, commands started in the nodes see `source` at `target` (an existing file or
        folder of the machine, hidden only inside the nodes: e.g. a throwaway /etc/ssh/ssh_config)."""
        self.binds.append((str(source), str(target)))
        self._save_state()

    def unbind(self, target: str | Path) -> None:
        """Commands started from now on see the machine's own `target` again."""
        self.binds = [b for b in self.binds if b[1] != str(target)]
        self._save_state()

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def node_dir(self, node: str) -> Path:
        """What `node` sees at `self.local` (its private folder), seen from the machine."""
        return self.root / "nodes" / node

    # ------------------------------------------------------------------ up / down

    def up(self) -> Cluster:
        self._save_state(pid=os.getpid())
        try:
            _ip("netns", "add", self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            _ip("-n", self.hub, "addr", "add", f"{HUB_ADDR}/24", "dev", "br0")
            _ip("-n", self.hub, "link", "set", "lo", "up")
            for node in self.names:  # as Debian writes it: a node's own name first maps to 127.0.1.1
                hosts = f"127.0.0.1 localhost\n127.0.1.1 {node}\n" + "".join(
                    f"{a} {n}\n" for n, a in self.addr.items() if n != node)
                (self.root / f"hosts.{node}").write_text(hosts)
            self.local.mkdir(parents=True, exist_ok=True)
            for i, node in enumerate(self.names, 1):
                ns = self.ns(node)
                _ip("netns", "add", ns)
                _ip("-n", self.hub, "link", "add", f"vh{i}", "type", "veth", "peer", "name", self.ifname[node],
                    "netns", ns)
                _ip("-n", self.hub, "link", "set", f"vh{i}", "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{self.addr[node]}/24", "dev", self.ifname[node])
                _ip("-n", ns, "link", "set", self.ifname[node], "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                self.node_dir(node).mkdir(parents=True, exist_ok=True)
        except BaseException:
            self.close()
            raise
        return self

    def _save_state(self, pid: int | None = None) -> None:
        """What `down` (and `remove_stale`, and `exec` for the binds) must know: <STATE>/<prefix>.json."""
        STATE.mkdir(parents=True, exist_ok=True)
        path = STATE / f"{self.prefix}.json"
        info = json.loads(path.read_text()) if path.is_file() else {}
        info.update({"ns": [self.hub] + [self.ns(n) for n in self.names], "root": str(self.root),
                     "binds": self.binds})
        if pid is not None:
            info["pid"] = pid
        path.write_text(json.dumps(info))

    def close(self) -> None:
        """Kill what runs in the namespaces (ours: we made them) and delete them; never raises."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
        teardown(self.prefix, [self.hub] + [self.ns(n) for n in self.names])
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ running things

    def wrap(self, node: str, argv: list[str]) -> list[str]:
        """argv run inside `node`: its network, hostname, /etc/hosts and private `local` folder."""
        setup = ('hostname "$1" && mount --bind "$2" /etc/hosts && mount --bind "$3" "$4" && shift 4 && '
                 'while [ "$1" != -- ]; do mount --bind "$1" "$2" || exit 1; shift 2; done && shift && exec "$@"')
        return ["ip", "netns", "exec", self.ns(node), "unshare", "--uts", "--mount", "--propagation", "private", "--",
                "sh", "-c", setup, "sh", node, str(self.root / f"hosts.{node}"), str(self.node_dir(node)), str(self.local),
                *[w for pair in self.binds for w in pair], "--", *map(str, argv)]

    def popen(self, node: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start argv in `node` (own process group, killed by `close`)."""
        p = subprocess.Popen(self.wrap(node, argv), start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def hub_argv(self, argv: list[str]) -> list[str]:
        """argv run in the hub namespace (the machine's filesystem, the bridge's address HUB_ADDR):
        where a service for every node runs, e.g. the S3 server of a shared-nothing test."""
        return ["ip", "netns", "exec", self.hub, *map(str, argv)]

    def run(self, node: str, argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        p = self.popen(node, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
        try:
            out, _ = p.communicate(timeout=timeout)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        return subprocess.CompletedProcess(p.args, p.returncode, out, None)

    def kill_all(self) -> None:
        """SIGKILL every process in the nodes (daemons a test started, what their sessions left), keeping
        the namespaces up for the next test."""
        kill_in([self.ns(n) for n in self.names])

    def cut(self, node: str) -> None:
        """Partition `node`: its link to the bridge goes down (its packets are dropped, nothing resets)."""
        _ip("-n", self.hub, "link", "set", f"vh{self.names.index(node) + 1}", "down")

    def heal(self, node: str) -> None:
        _ip("-n", self.hub, "link", "set", f"vh{self.names.index(node) + 1}", "up")


def for_test(nodes: int = 2, prefix: str | None = None, root: str | Path | None = None) -> Cluster:
    """A test fixture's cluster (use it in a `with`): skips the test with one line where namespaces
    cannot be made here, and first tears down what a run killed hard (pytest-timeout) left."""
    why = available()
    if why:
        import pytest

        pytest.skip(why)
    remove_stale()
    return Cluster(nodes, prefix=prefix, root=root)


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[str | None]:
    """Each process's output (stdout, one text) once it ends, or None for one still running when
    `timeout` seconds (all of them together, from now) have passed; it is left running."""
    outs, t0 = [], time.time()
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(1.0, timeout - (time.time() - t0)))[0])
        except subprocess.TimeoutExpired:
            outs.append(None)
    return outs


def one_process_reference(args: list[str], shards: str | Path, out: Path, env: dict) -> Path:
    """The run a multi-node test compares its steps with: `hiervl train ARGS` on this machine (no
    namespace), one process at global batch 4, into `out` (returned); a failed run fails the test
    with the tails of its output."""
    res = subprocess.run([sys.executable, "-m", "hiervl.launch.cli", "train", *args, f"data.path={shards}",
                          f"train.out_dir={out}", "train.ranks=1", "data.batch_size=4"], env=env,
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return out


def remove_stale() -> list[str]:
    """Tear down the clusters whose test process died without its teardown (a hard kill, pytest-timeout's
    os._exit); clusters of live processes and `up` from the command line (no pid) are left alone."""
    removed = []
    for path in sorted(STATE.glob("*.json")) if STATE.is_dir() else []:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        pid = info.get("pid")
        if pid is None or Path(f"/proc/{pid}").exists():
            continue
        teardown(path.stem, info["ns"])
        removed.append(path.stem)
    return removed


def teardown(prefix: str, namespaces: list[str]) -> None:
    """SIGKILL every process inside `namespaces` (bounded: 5 rounds) and delete them."""
    kill_in(namespaces)
    for ns in namespaces:
        _ip("netns", "del", ns, check=False)
    (STATE / f"{prefix}.json").unlink(missing_ok=True)


def kill_in(namespaces: list[str]) -> None:
    """SIGKILL every process inside `namespaces` (bounded: 5 rounds each)."""
    for ns in namespaces:
        for _ in range(5):
            res = _ip("netns", "pids", ns, check=False)
            pids = [int(p) for p in res.stdout.split()] if res.returncode == 0 else []
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/netns.py", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("up", "exec", "cut", "heal", "down"))
    p.add_argument("node", nargs="?")
    p.add_argument("--prefix", default="hvdemo")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--ssh", action="store_true", help="up: also sshd in every node under a throwaway key "
                   "(tests/netns_ssh.py): `ssh n2`, pdsh and DeepSpeed's default launch work inside the nodes")
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_intermixed_args(argv[:argv.index("--")] if "--" in argv else argv)
    state = STATE / f"{args.prefix}.json"
    if args.action == "up":
        why = available()
        if why:
            print(f"netns: {why}", file=sys.stderr)
            return 1
        if state.exists():
            print(f"netns: {args.prefix} is up already; `python tests/netns.py down --prefix {args.prefix}` first",
                  file=sys.stderr)
            return 1
        c = Cluster(args.nodes, prefix=args.prefix).up()
        if args.ssh:
            import netns_ssh

            why = netns_ssh.available(pdsh=True)
            if why:
                c.close()
                print(f"netns: {why}", file=sys.stderr)
                return 1
            try:
                print(f"sshd in {', '.join(c.names)}; keys and configs in {netns_ssh.start_sshd(c)}")
            except BaseException:
                c.close()
                raise
        info = json.loads(state.read_text())
        info.pop("pid", None)  # a person's cluster: `down` removes it, not remove_stale
        state.write_text(json.dumps(info))
        for n in c.names:
            print(f"{n}: {c.addr[n]} on {c.ifname[n]}  (python tests/netns.py exec --prefix {c.prefix} {n} -- CMD)")
        print(f"node-private folder: {c.local} (each node sees its own; from here: {c.root / 'nodes'}/<node>)")
        return 0
    if not state.exists():
        print(f"netns: no cluster {args.prefix} is up", file=sys.stderr)
        return 1
    info = json.loads(state.read_text())
    c = Cluster(len(info["ns"]) - 1, prefix=args.prefix, root=info["root"])
    c.binds = [tuple(b) for b in info.get("binds", [])]
    if args.action == "down":
        teardown(args.prefix, info["ns"])
        return 0
    if args.node not in c.names:
        print(f"netns: node {args.node!r} is not one of {', '.join(c.names)}", file=sys.stderr)
        return 2
    if args.action == "cut":
        c.cut(args.node)
        return 0
    if args.action == "heal":
        c.heal(args.node)
        return 0
    return subprocess.call(c.wrap(args.node, cmd or ["hostname"]))


if __name__ == "__main__":
    sys.exit(main())
