"""Where data lives: a local folder or an object-store prefix, behind one small interface.

    store = open_store("s3://bucket/prefix", cfg.storage)   # or gs://..., http(s)://..., a local path
    store.read_range("train-000000.tar", offset, size)     # bytes: one ranged GET (local: one pread)
    store.read(name) / store.size(name) (None = absent) / store.exists(name) / store.list()
    store.open_input(name)                                  # a seekable file read by ranges (av.open takes it)
    store.put(name, data) / store.put_file(name, local_path)  # the whole object appears at once
    store.delete(name) / store.check(write=True)            # clear UserError before heavy work
    store.list_dirs() / store.delete_tree(name)             # sub-folders (prefixes); a folder and all in it
    store.get_file(name, local_path)                        # streamed download: (size, sha256 of the bytes)

Layer: `pyarrow.fs` (S3FileSystem, GcsFileSystem; pyarrow is already a dependency, its C++ S3 client
releases the GIL during requests and was faster than s3fs on ranged reads here, bench/RESULTS.md
"Issue #16"); http(s) is read-only through urllib Range requests. Nothing here stores a
credential: S3 keys come from the AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, ~/.aws), GCS from its default chain; only the endpoint, region and retry
settings come from `storage.*` (pipeline/config.py StorageConfig) or AWS_ENDPOINT_URL / AWS_REGION.

Atomicity: an S3/GCS PUT makes an object visible only complete, so `put_file` uploads a finished
local file under its final name; a local `put` is write-temp-then-rename (pipeline/atomic_write.py).

Retries: connection errors, timeouts and 5xx are retried `storage.retries` times with exponential
backoff from `storage.backoff_s` (capped at 8 s); a wrong key, a denied request or a missing bucket
is a `UserError` at once (retrying cannot fix it), unless this store has already been answered: then
the same key worked a moment ago, and a denial or a missing bucket is a server restarting (SeaweedFS
answers 403 until it has reloaded its identities) or IAM propagating, retried as a 5xx is, and the
`UserError` comes after the last retry. A missing object is FileNotFoundError.

Owns: URL parsing, the store classes, retries and the error classification.
Must not touch: what is stored (shards, manifests: their owners), the loader's order or read-ahead
(pipeline/data/byte_source.py).
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from functools import lru_cache
from pathlib import Path

from hiervl.atomic_write import write_atomic
from hiervl.errors import UserError
from hiervl.log import get_logger
from hiervl.redact import redact

log = get_logger(__name__)
REMOTE_SCHEMES = ("s3", "gs", "http", "https")
WRITABLE_SCHEMES = ("s3", "gs")
MAX_BACKOFF_S = 8.0
stats = {"retries": 0}  # retries made in this process (the fault tests read it; logs say each one)

# defaults for a process whose caller passed no options (a Ray prep worker sets them: configure())
_DEFAULTS = {"endpoint_url": None, "region": None, "retries": 6, "backoff_s": 0.25, "connect_timeout_s": 5.0,
             "request_timeout_s": 60.0}
_defaults_lock = threading.Lock()


def is_remote(path) -> bool:
    """True for s3://, gs://, http(s):// URLs (a local path, file:// or Path is not). The one URL test:
    a file:// URL is a local path everywhere (`as_local_path`), any other scheme an error of its reader."""
    return isinstance(path, str) and urllib.parse.urlsplit(path).scheme in REMOTE_SCHEMES


def as_local_path(path) -> str:
    """A local path or file:// URL as a path (file:///data/x -> /data/x); anything else as written."""
    path = str(path)
    return path[len("file://"):] if path.startswith("file://") else path


def join(base: str, name: str) -> str:
    """`base` / `name` for a URL or a local path (a URL keeps its `//`)."""
    if is_remote(base):
        return base.rstrip("/") + "/" + name.lstrip("/")
    return str(Path(base) / name)


def parent(path: str) -> str:
    """The folder of a URL or path (what relative names in a manifest resolve against)."""
    if is_remote(path):
        return path.rstrip("/").rsplit("/", 1)[0]
    return str(Path(path).parent)


def _options(storage) -> dict:
    """storage: a StorageConfig, a dict of its fields, or None (the process defaults)."""
    with _defaults_lock:
        opts = dict(_DEFAULTS)
    if storage is None:
        return opts
    d = dataclasses.asdict(storage) if dataclasses.is_dataclass(storage) else dict(storage)
    opts.update({k: v for k, v in d.items() if k in opts and v is not None})
    return opts


def configure(storage) -> None:
    """Set this process's default options (a worker that gets them as a dict, e.g. Ray prep tasks)."""
    opts = _options(storage)
    with _defaults_lock:
        _DEFAULTS.update(opts)


def backoff_delays(retries: int, first: float) -> list[float]:
    """The waits before each retry: first, 2*first, ... capped at MAX_BACKOFF_S."""
    return [min(first * (2 ** k), MAX_BACKOFF_S) for k in range(retries)]


# ---------------------------------------------------------------------------- error classification

_AUTH_MARKERS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY",
                 "SIGNATURE_DOES_NOT_MATCH", "HTTP status 403", "response code 403", "Forbidden", "401")
_BUCKET_MARKERS = ("NoSuchBucket", "NO_SUCH_BUCKET", "bucket does not exist", "Bucket does not exist")


def _fatal(url: str, exc: BaseException, where: str) -> UserError | None:
    """The UserError for a failure retrying cannot fix (credentials, missing bucket), else None.
    `where`: the endpoint's name for the message."""
    text = str(exc)
    if any(m in text for m in _BUCKET_MARKERS):
        bucket = urllib.parse.urlsplit(url).netloc
        return UserError(f"{url}: bucket '{bucket}' does not exist on {where}; create it "
                         "or fix the URL")
    if any(m in text for m in _AUTH_MARKERS):
        return UserError(f"{url}: access denied by {where} (wrong or missing credentials); set "
                         "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the store's credentials) to a key that "
                         "may read and write it")
    return None


class Store:
    """The interface (see the module docstring); names are relative to the store's root."""

    url: str

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def size(self, name: str) -> int | None:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    def open_input(self, name: str, buffer_size: int = 1 << 20):
        """A seekable, read-only binary file for `name` (FileNotFoundError when absent) that reads
        `buffer_size` bytes at a time through `read_range` (each read retried): e.g. a source video for
        `av.open`, streamed, never read whole. Close it when done."""
        size = self.size(name)
        if size is None:
            raise FileNotFoundError(f"{self.url}/{name}")
        return io.BufferedReader(_RangeFile(self, name, size), buffer_size=buffer_size)

    def release(self, name: str) -> None:
        """Forget any open handle on `name` (after `open_input`'s file is closed)."""

    def list(self) -> list[str]:
        raise NotImplementedError

    def put(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def put_file(self, name: str, local_path: str | Path) -> None:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def list_dirs(self) -> list[str]:
        """Names of the folders (object-store prefixes) directly under the root."""
        raise NotImplementedError

    def delete_tree(self, name: str) -> None:
        """Delete folder `name` and everything under it (absent: nothing to do)."""
        raise NotImplementedError

    def get_file(self, name: str, local_path: str | Path) -> tuple[int, str]:
        """Download `name` to `local_path` in chunks (never whole in memory; FileNotFoundError when
        absent); returns (size, sha256) of the bytes written. The file appears whole or not at all."""
        import hashlib

        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = local_path.with_name(f".{local_path.name}.part-{uuid.uuid4().hex[:8]}")
        sha, size = hashlib.sha256(), 0
        try:
            with self.open_input(name, buffer_size=8 << 20) as src, open(tmp, "wb") as dst:
                while chunk := src.read(8 << 20):
                    sha.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
            os.replace(tmp, local_path)
        finally:
            tmp.unlink(missing_ok=True)
        return size, sha.hexdigest()

    def check(self, write: bool = False) -> None:
        """Raise UserError (one line) when the root cannot be read (or written)."""

    @property
    def remote(self) -> bool:
        return True

    def local_path(self, name: str) -> Path | None:
        """A local file for `name` when the store is a local folder (DALI readers need one), else None."""
        return None


class _RangeFile(io.RawIOBase):
    """`store`'s object `name` of `size` bytes as a raw seekable file: each read is one `read_range`."""

    def __init__(self, store: Store, name: str, size: int):
        self.store, self.name, self.length, self.pos = store, name, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        n = min(len(buf), self.length - self.pos)
        if n <= 0:
            return 0
        data = self.store.read_range(self.name, self.pos, n)
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.store.release(self.name)
        super().close()


class LocalStore(Store):
    """A local folder; reads are os.pread on cached descriptors, writes are atomic renames."""

    def __init__(self, root: str | Path):
        root = str(root)
        self.root = Path(as_local_path(root))
        self.url = str(self.root)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def remote(self) -> bool:
        return False

    def local_path(self, name: str) -> Path:
        return self.root / name

    def open_input(self, name: str, buffer_size: int = 1 << 20):
        return open(self.root / name, "rb", buffering=buffer_size)

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        with self._lock:
            fd = self._fds.get(name)
            if fd is None:
                fd = self._fds[name] = os.open(self.root / name, os.O_RDONLY)
        return os.pread(fd, size, offset)

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def size(self, name: str) -> int | None:
        p = self.root / name
        return p.stat().st_size if p.is_file() else None

    def list(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_file()) if self.root.is_dir() else []

    def put(self, name: str, data: bytes) -> None:
        write_atomic(self.root / name, data)

    def put_file(self, name: str, local_path: str | Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.replace(local_path, self.root / name)

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def list_dirs(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []

    def delete_tree(self, name: str) -> None:
        import shutil
        shutil.rmtree(self.root / name, ignore_errors=True)

    def check(self, write: bool = False) -> None:
        if write:
            self.root.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class _Retrying:
    """Run a store operation with retries and exponential backoff (see the module docstring)."""

    url: str
    opts: dict
    where: str  # the endpoint, for messages
    _answered = False  # an operation of this store has succeeded: a denial is then retried (module docstring)

    def _retry(self, what: str, fn):
        delays = backoff_delays(int(self.opts["retries"]), float(self.opts["backoff_s"]))
        for attempt in range(len(delays) + 1):
            try:
                result = fn()
                self._answered = True
                return result
            except FileNotFoundError:
                raise
            except (OSError, urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                fatal = _fatal(self.url, exc, self.where)
                if fatal is not None:
                    if not self._answered or attempt == len(delays):
                        raise fatal from None
                elif isinstance(exc, urllib.error.HTTPError) and exc.code < 500 and exc.code not in (408, 429):
                    raise OSError(f"{self.url}: {what}: HTTP {exc.code} {exc.reason}") from None
                if attempt == len(delays):
                    raise OSError(f"{self.url}: {what} failed after {attempt + 1} attempts: "
                                  f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
                stats["retries"] += 1
                log.warning("%s: %s failed (%s); retry %d/%d in %.2fs", self.url, what,
                            (str(exc).splitlines() or [type(exc).__name__])[0][:200], attempt + 1, len(delays),
                            delays[attempt])
                time.sleep(delays[attempt])


def _credentials_tag() -> str:
    """A digest of the environment's S3 credentials: a changed key gets a new client (nothing is kept)."""
    import hashlib
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    return hashlib.sha256("\0".join(os.environ.get(n, "") for n in names).encode()).hexdigest()[:16]


@lru_cache(maxsize=16)
def _arrow_fs(scheme: str, endpoint_url: str | None, region: str | None, connect_timeout: float,
              request_timeout: float, credentials: str):
    """One pyarrow filesystem per (scheme, endpoint, region, credentials): clients are thread-safe and
    costly to build. `credentials` is only a cache key (a digest); pyarrow reads the keys itself."""
    from pyarrow import fs

    if scheme == "gs":
        kwargs = {}
        if endpoint_url:
            parts = urllib.parse.urlsplit(endpoint_url)
            kwargs.update(endpoint_override=parts.netloc or endpoint_url, scheme=parts.scheme or "https")
        return fs.GcsFileSystem(retry_time_limit=None, **kwargs)
    kwargs = {"connect_timeout": connect_timeout, "request_timeout": request_timeout,
              # our loop retries with visible backoff; the SDK's own retries would hide a dead endpoint
              "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=1)}
    if endpoint_url:
        parts = urllib.parse.urlsplit(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
        kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    kwargs["region"] = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return fs.S3FileSystem(**kwargs)


class ArrowStore(_Retrying, Store):
    """s3:// or gs:// `bucket/prefix` through pyarrow.fs; every call retried (see `_Retrying`)."""

    def __init__(self, url: str, opts: dict):
        parts = urllib.parse.urlsplit(url)
        self.url, self.opts, self.scheme = url.rstrip("/"), opts, parts.scheme
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        if "@" in parts.netloc:  # s3://KEY:SECRET@bucket: pyarrow would fail on it, and print it
            self.url = redact(self.url)
            raise UserError(f"{self.url}: credentials do not go in the URL; set AWS_ACCESS_KEY_ID and "
                            f"AWS_SECRET_ACCESS_KEY (or ~/.aws) and write {parts.scheme}://BUCKET/PREFIX")
        if not self.bucket:
            raise UserError(f"{url}: no bucket in the URL; write {parts.scheme}://BUCKET/PREFIX")
        endpoint = opts["endpoint_url"] or (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                                            if self.scheme == "s3" else None)
        self.endpoint = endpoint
        self.where = endpoint or {"s3": "AWS S3", "gs": "Google Cloud Storage"}[self.scheme]
        self.fs = _arrow_fs(self.scheme, endpoint, opts["region"], float(opts["connect_timeout_s"]),
                            float(opts["request_timeout_s"]), _credentials_tag())
        self._files: dict[str, object] = {}
        self._lock = threading.Lock()

    def _path(self, name: str = "") -> str:
        return "/".join(p for p in (self.bucket, self.prefix, name) if p)

    def _handle(self, name: str):
        """An open random-access file (its size known): reads on it are single ranged GETs."""
        with self._lock:
            f = self._files.get(name)
        if f is None:
            f = self.fs.open_input_file(self._path(name))
            with self._lock:
                self._files[name] = f
        return f

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        def go():
            try:
                return self._handle(name).read_at(size, offset)
            except OSError:
                with self._lock:
                    self._files.pop(name, None)  # a handle from before a restart: reopen on the retry
                raise
        return self._retry(f"read {name} [{offset}:{offset + size}]", go)

    def read(self, name: str) -> bytes:
        def go():
            with self.fs.open_input_stream(self._path(name)) as f:
                return f.read()
        return self._retry(f"read {name}", go)

    def release(self, name: str) -> None:
        with self._lock:
            f = self._files.pop(name, None)
        if f is not None:
            f.close()

    def size(self, name: str) -> int | None:
        from pyarrow import fs
        info = self._retry(f"stat {name}", lambda: self.fs.get_file_info(self._path(name)))
        return info.size if info.type == fs.FileType.File else None

    def list(self) -> list[str]:
        from pyarrow import fs
        sel = fs.FileSelector(self._path(), allow_not_found=True, recursive=False)
        infos = self._retry("list", lambda: self.fs.get_file_info(sel))
        return sorted(i.base_name for i in infos if i.type == fs.FileType.File)

    def put(self, name: str, data: bytes) -> None:
        def go():
            with self.fs.open_output_stream(self._path(name)) as f:  # one PUT when closed: whole or absent
                f.write(data)
        self._retry(f"write {name}", go)

    def put_file(self, name: str, local_path: str | Path) -> None:
        """Upload a local file in 8-MiB chunks (a multi-GB checkpoint file is never read whole into memory)."""
        def go():
            with open(local_path, "rb") as src, self.fs.open_output_stream(self._path(name)) as dst:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
        self._retry(f"write {name}", go)

    def delete(self, name: str) -> None:
        def go():
            try:
                self.fs.delete_file(self._path(name))
            except FileNotFoundError:
                pass
        self._retry(f"delete {name}", go)

    def list_dirs(self) -> list[str]:
        from pyarrow import fs
        sel = fs.FileSelector(self._path(), allow_not_found=True, recursive=False)
        infos = self._retry("list", lambda: self.fs.get_file_info(sel))
        return sorted(i.base_name for i in infos if i.type == fs.FileType.Directory)

    def delete_tree(self, name: str) -> None:
        def go():
            try:
                self.fs.delete_dir(self._path(name))
            except FileNotFoundError:
                pass
        self._retry(f"delete {name}/", go)

    def check(self, write: bool = False) -> None:
        """One listing (and, for writing, a probe object put then deleted): fails fast with one line."""
        from pyarrow import fs
        info = self._retry("check the bucket", lambda: self.fs.get_file_info(self.bucket))
        if info.type == fs.FileType.NotFound:
            raise UserError(f"{self.url}: bucket '{self.bucket}' does not exist on {self.where}; "
                            "create it or fix the URL")
        self.list()
        if write:
            probe = f".hiervl-write-check-{uuid.uuid4().hex[:8]}"
            self.put(probe, b"")
            self.delete(probe)


class HttpStore(_Retrying, Store):
    """A read-only http(s):// prefix: ranged GETs (`Range: bytes=a-b`) with retries."""

    def __init__(self, url: str, opts: dict):
        parts = urllib.parse.urlsplit(url.rstrip("/"))
        self._auth = None
        if parts.username is not None:  # https://user:token@host/...: HTTP basic auth, never in messages
            import base64

            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            host = parts.hostname + (f":{parts.port}" if parts.port else "")
            parts = parts._replace(netloc=host)
        self.url, self.opts = urllib.parse.urlunsplit(parts), opts  # without the credentials
        self.where = parts.netloc

    def _get(self, name: str, headers: dict, method: str = "GET"):
        if self._auth:
            headers = {**headers, "Authorization": self._auth}
        req = urllib.request.Request(f"{self.url}/{urllib.parse.quote(name)}", headers=headers, method=method)
        return urllib.request.urlopen(req, timeout=float(self.opts["request_timeout_s"]))

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        def go():
            with self._get(name, {"Range": f"bytes={offset}-{offset + size - 1}"}) as r:
                data = r.read()
                if r.status == 200:  # the server ignored Range: it sent the whole object
                    data = data[offset:offset + size]
                return data
        return self._retry(f"read {name} [{offset}:{offset + size}]", lambda: self._not_found(go, name))

    def read(self, name: str) -> bytes:
        def go():
            with self._get(name, {}) as r:
                return r.read()
        return self._retry(f"read {name}", lambda: self._not_found(go, name))

    def size(self, name: str) -> int | None:
        def go():
            with self._get(name, {}, method="HEAD") as r:
                return int(r.headers.get("Content-Length", 0))
        try:
            return self._retry(f"stat {name}", lambda: self._not_found(go, name))
        except FileNotFoundError:
            return None

    @staticmethod
    def _not_found(fn, name):
        try:
            return fn()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise FileNotFoundError(name) from None
            raise

    def _read_only(self, *_args, **_kwargs):
        raise UserError(f"{self.url}: http(s) URLs are read-only; write to s3://, gs:// or a local folder")

    put = put_file = delete = _read_only

    def list(self) -> list[str]:
        self._read_only()

    def check(self, write: bool = False) -> None:
        if write:
            self._read_only()


def open_store(path, storage=None) -> Store:
    """The store for a local path or URL; `storage` a StorageConfig, dict or None (process defaults)."""
    if not is_remote(path):
        return LocalStore(path)
    scheme = urllib.parse.urlsplit(path).scheme
    opts = _options(storage)
    if scheme in ("http", "https"):
        return HttpStore(path, opts)
    return ArrowStore(path, opts)
