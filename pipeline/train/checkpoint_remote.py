"""Checkpoints in an object store (`checkpoint.dir=s3://bucket/prefix`): for nodes that share no filesystem.

The layout under the URL is that of a local checkpoints/ folder (pipeline/run_dir.py):

  <url>/stepNNNNNNNN/...        the files every rank wrote, each uploaded by the rank that wrote it
  <url>/stepNNNNNNNN/meta.json  rank 0, after every rank's upload finished: the completion mark and
                                the manifest (size and sha256 of every other file)
  <url>/latest                  rank 0, after meta.json: the tag of the newest complete checkpoint

Writing: each rank saves into its own staging folder in its node's run folder
(`<train.out_dir>/.checkpoint-staging/rank{R}/<tag>/`, so two ranks of one node never mix files),
hashing the bytes as they are written (checkpoint_hash.py), uploads what it wrote and deletes the
staging copy. An object appears whole or not at all (one PUT), so a tag without meta.json is a write
that was killed: it is never resumed, and `latest` never names it.

Resuming: rank 0 takes `latest` (else the newest tag with meta.json), downloads it into its node's cache
(`<train.out_dir>/.checkpoint-cache/<host>/<tag>/`), checking every file's size and sha256 against the
manifest, and falls back to the next older one on a mismatch or a missing file, with one warning.
Then the first rank of every other node downloads the same tag into its own node's cache (and
checks it alike). Loading, and a universal conversion on another world size (done by the first rank
of each node, in its cache), read the cache as a local checkpoint folder.

Reading for inference (`hiervl eval / export / search --checkpoint s3://...`): `fetch_for_inference` copies
the newest complete, intact checkpoint under a checkpoint.dir URL (or the one tag a URL ends in) into
this user's cache (`~/.cache/hiervl/checkpoints/<hash of the URL>/<tag>/`, verified the same way; a copy
that matches the store's meta.json is not downloaded again), and the commands read that folder.

Owns: the object-store checkpoint layout, its upload, commit, prune, and download for resume and inference.
Must not touch: what a checkpoint holds (checkpoint.py) or the training loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from hiervl import distributed as dist
from hiervl import faults
from hiervl.errors import UserError
from hiervl.log import get_logger
from hiervl.run_dir import LATEST, META, UNIVERSAL_SUFFIX, file_manifest, tag_for, verify
from hiervl.storage import join, open_store

log = get_logger(__name__)

STAGING = ".checkpoint-staging"  # in the run folder: each rank's files before upload
CACHE = ".checkpoint-cache"  # in the run folder: downloaded checkpoints, per host
TAG = re.compile(r"step\d{8}")


def staging_dir(out_dir: str | Path, rank: int) -> Path:
    """This rank's DeepSpeed save_dir: the files of tag T land in <this>/T/."""
    return Path(out_dir) / STAGING / f"rank{rank}"


def cache_dir(out_dir: str | Path, host: str | None = None) -> Path:
    """This node's folder of downloaded checkpoints (per host: a run folder that happens to be shared
    never gets two nodes downloading into one place)."""
    return Path(out_dir) / CACHE / (host or socket.gethostname())


class RemoteCheckpoints:
    """The checkpoints under one object-store URL (see the module docstring)."""

    def __init__(self, url: str, storage=None):
        self.url, self.storage = url.rstrip("/"), storage
        self.store = open_store(self.url, storage)

    def _tag_store(self, tag: str):
        return open_store(join(self.url, tag), self.storage)

    # ------------------------------------------------------------------ reading

    def latest(self) -> str | None:
        try:
            return self.store.read(LATEST).decode().strip() or None
        except FileNotFoundError:
            return None

    def read_meta(self, tag: str) -> dict | None:
        try:
            return json.loads(self._tag_store(tag).read(META))
        except (FileNotFoundError, ValueError):
            return None

    def tags(self) -> list[str]:
        """Every checkpoint folder's tag (complete or not), oldest first."""
        return sorted(d for d in self.store.list_dirs() if TAG.fullmatch(d))

    def candidates(self) -> list[tuple[str, dict]]:
        """(tag, meta) of the complete checkpoints, the one `latest` names first, then newest first."""
        named = self.latest()
        metas = {t: m for t in self.tags() if (m := self.read_meta(t)) is not None}
        if named is not None and named not in metas:
            log.warning("checkpoint %s named by %s/%s is incomplete; looking for an older complete one",
                        named, self.url, LATEST)
        order = ([named] if named in metas else []) + [t for t in reversed(sorted(metas)) if t != named]
        return [(t, metas[t]) for t in order]

    def download(self, tag: str, meta: dict, dest: Path) -> str | None:
        """Copy checkpoint `tag` into `dest`/<tag>/ checking each file against the manifest; None when
        it is intact, else what is wrong (the partial copy is removed). A copy already there that
        verifies against the same meta.json is kept (no second download)."""
        local = dest / tag
        if local.is_dir() and json.loads((local / META).read_text() if (local / META).is_file() else "null") == meta:
            if verify(dest, tag) is None:
                return None
        shutil.rmtree(local, ignore_errors=True)
        shutil.rmtree(dest / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)
        files = meta.get("files")
        if not isinstance(files, dict):
            return f"{self.url}/{tag}/{META} has no file manifest"
        store = self._tag_store(tag)
        for name, want in sorted(files.items()):
            try:
                size, sha = store.get_file(name, local / name)
            except FileNotFoundError:
                shutil.rmtree(local, ignore_errors=True)
                return f"{self.url}/{tag}/{name} is missing"
            if (size, sha) != (want.get("size"), want.get("sha256")):
                shutil.rmtree(local, ignore_errors=True)
                return (f"{self.url}/{tag}/{name} has {size} bytes" + (f", its manifest says {want.get('size')}"
                        if size != want.get("size") else f" that do not match its sha256 in {META} (corrupted)"))
        (local / META).write_text(json.dumps(meta, indent=2))  # last: a local copy with meta.json is whole
        return None

    def fetch_newest_intact(self, dest: Path) -> tuple[str, dict] | None:
        """Download the newest complete, intact checkpoint into `dest` (see `download`): (tag, meta),
        or None when there is none. Damaged ones are skipped with one warning each; when every one is
        damaged, a UserError says so (starting over silently would throw the run away)."""
        damaged = []
        for tag, meta in self.candidates():
            problem = self.download(tag, meta, dest)
            if problem is None:
                for bad_tag, bad in damaged:
                    log.warning("checkpoint %s/%s is damaged: %s; resuming from %s instead", self.url, bad_tag, bad, tag)
                keep_only(dest, tag)
                return tag, meta
            damaged.append((tag, problem))
        if damaged:
            raise UserError(f"every checkpoint under {self.url} is damaged (newest, {damaged[0][0]}: {damaged[0][1]}); "
                            "delete them to start over, or set checkpoint.dir to another prefix")
        return None

    # ------------------------------------------------------------------ writing

    def upload(self, local_tag_dir: Path, tag: str) -> None:
        """Upload every file under `local_tag_dir` to <url>/<tag>/ (the same relative names)."""
        store = self._tag_store(tag)
        for path in sorted(p for p in local_tag_dir.rglob("*") if p.is_file()):
            store.put_file(path.relative_to(local_tag_dir).as_posix(), path)

    def commit(self, tag: str, meta: dict) -> None:
        """meta.json (the completion mark), then `latest`: never a `latest` naming a partial checkpoint."""
        self._tag_store(tag).put(META, json.dumps(meta, indent=2).encode())
        self.store.put(LATEST, tag.encode())

    def remove(self, tag: str) -> None:
        self.store.delete_tree(tag)

    def prune(self, keep: int, protect: tuple = ()) -> None:
        """Keep the newest `keep` complete checkpoints (and protected ones); delete the older ones and
        every incomplete one older than the newest complete (left by a killed write)."""
        tags = self.tags()
        complete = [t for t in tags if self.read_meta(t) is not None]
        newest = complete[-1] if complete else None
        for tag in tags:
            if tag in protect or tag in complete[-keep:]:
                continue
            if tag in complete or (newest is not None and tag < newest):
                self.remove(tag)


def inference_cache(url: str) -> Path:
    """Where `fetch_for_inference` keeps the checkpoints of `url` on this machine ($XDG_CACHE_HOME or ~/.cache)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hiervl" / "checkpoints"
    return root / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def fetch_for_inference(url: str, storage=None) -> Path:
    """A local, verified copy of the checkpoint an object-store URL names: a checkpoint.dir URL (its newest
    complete, intact checkpoint, as a resume picks it) or <checkpoint.dir>/stepNNNNNNNN (that one).
    Returns the local checkpoint folder; one line naming the URL when there is none or it is damaged."""
    url = url.rstrip("/")
    dest = inference_cache(url)
    base, last = url.rsplit("/", 1)
    if TAG.fullmatch(last):
        remote = RemoteCheckpoints(base, storage)
        meta = remote.read_meta(last)
        if meta is None:
            raise UserError(f"--checkpoint {url}: no complete checkpoint there (no {META}); point it at the "
                            "checkpoint.dir URL to take the newest complete one")
        problem = remote.download(last, meta, dest)
        if problem is not None:
            raise UserError(f"--checkpoint {url} is damaged ({problem}); point it at another checkpoint, or at "
                            "the checkpoint.dir URL to take the newest intact one")
        tag = last
    else:
        got = RemoteCheckpoints(url, storage).fetch_newest_intact(dest)
        if got is None:
            raise UserError(f"--checkpoint {url}: no complete checkpoint there (no stepNNNNNNNN/{META}); give the "
                            "checkpoint.dir URL the run was trained with")
        tag = got[0]
    log.info("checkpoint %s/%s is in %s", url if tag != last else base, tag, dest / tag)
    return dest / tag


def keep_only(dest: Path, tag: str) -> None:
    """Remove the cached checkpoints other than `tag` (and its universal conversion): the cache holds one."""
    if not dest.is_dir():
        return
    for p in dest.iterdir():
        if p.is_dir() and p.name not in (tag, f"{tag}{UNIVERSAL_SUFFIX}"):
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------- save (every rank)


def save_remote(engine, remote: RemoteCheckpoints, out_dir: str | Path, step: int, client_state: dict,
                rank_state: dict, meta: dict, keep: int, protect: tuple = ()) -> str:
    """`checkpoint.save` for an object store: every rank stages and uploads its own files; after all
    uploads finished, rank 0 writes meta.json (the manifest of every rank's files) and then `latest`.
    A failure on any rank is one CheckpointWriteError on every rank; `latest` still names the previous
    checkpoint, and the partial tag is deleted (by the next save of that step, or by prune)."""
    from hiervl.train.checkpoint import CheckpointWriteError
    from hiervl.train.checkpoint_hash import WriteRecorder

    tag = tag_for(step)
    rank = dist.get_rank()
    root = staging_dir(out_dir, rank)
    tag_dir = root / tag
    t0 = time.time()

    def one_line(exc: BaseException, doing: str) -> str:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        return (f"checkpoint {tag}: {doing} failed on rank {rank} ({first}); {remote.url}/{LATEST} still names "
                f"{remote.latest() or 'no checkpoint'}: fix the store or its credentials, or set checkpoint.dir")

    def fail_on_every_rank(problem: str | None) -> None:
        if problem is not None:
            raise CheckpointWriteError(problem)

    problem = None
    try:
        if dist.is_main():
            remote.remove(tag)  # a tag of this step is stale: half-written by a killed run
        shutil.rmtree(tag_dir, ignore_errors=True)
        tag_dir.mkdir(parents=True)
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
        problem = one_line(exc, "preparing")
    fail_on_every_rank(next((p for p in dist.all_gather_object(problem) if p), None))

    problem, files, deepspeed_done = None, {}, False
    written = WriteRecorder(tag_dir)
    try:
        with written.deepspeed(engine):
            engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        deepspeed_done = True
        written.save(rank_state, tag_dir / f"rank{rank}.pt")
        files = file_manifest(tag_dir, known=written.files)  # this rank's files; others were recorded as written
        if faults.injected("kill-during-checkpoint", step) and rank == int(os.environ.get("HIERVL_FAULT_RANK", rank)):
            _upload_some_then_die(remote, tag_dir, tag)
        remote.upload(tag_dir, tag)
    except Exception as exc:  # noqa: BLE001
        problem = one_line(exc, "writing or uploading")
        if not deepspeed_done:
            dist.barrier()  # DeepSpeed's save ends in a barrier the other ranks are waiting in
    finally:
        shutil.rmtree(tag_dir, ignore_errors=True)
    gathered = dist.all_gather_object((problem, files))
    fail_on_every_rank(next((p for p, _ in gathered if p), None))

    problem = None
    if dist.is_main():
        manifest = {}
        for _, rank_files in gathered:
            manifest.update(rank_files)
        try:
            remote.commit(tag, {**meta, "tag": tag, "step": step, "saved_at": time.time(),
                                "save_seconds": round(time.time() - t0, 3), "files": dict(sorted(manifest.items()))})
            remote.prune(keep, protect=protect + (tag,))
        except Exception as exc:  # noqa: BLE001
            problem = one_line(exc, "committing")
    fail_on_every_rank(dist.broadcast_object(problem))
    return tag


def _upload_some_then_die(remote: RemoteCheckpoints, tag_dir: Path, tag: str) -> None:
    """The `kill-during-checkpoint` fault on this rank: upload the first of its files, then die hard (a
    node lost in the middle of a checkpoint write)."""
    first = sorted(p for p in tag_dir.rglob("*") if p.is_file())[:1]
    for path in first:
        remote._tag_store(tag).put_file(path.relative_to(tag_dir).as_posix(), path)
    os._exit(9)


# ---------------------------------------------------------------------------- resume (every rank)


def plan_remote(remote: RemoteCheckpoints, out_dir: str | Path) -> dict | None:
    """Rank 0's part of a resume: the newest intact remote checkpoint, downloaded into this node's
    cache; {"tag", "meta", "remote"} (the caller adds the rest of the plan) or None (fresh start)."""
    found = remote.fetch_newest_intact(cache_dir(out_dir))
    if found is None:
        return None
    tag, meta = found
    log.info("resuming from %s/%s (downloaded to %s)", remote.url, tag, cache_dir(out_dir))
    return {"tag": tag, "meta": meta, "remote": remote.url}


def fetch_on_every_node(plan: dict, remote: RemoteCheckpoints, out_dir: str | Path, peers: list[dict]) -> dict:
    """Every rank: the plan pointing at its own node's cache. The first rank of each node other than
    rank 0's downloads the planned tag there (checked against its manifest); all wait for that."""
    mine = dist.get_rank()
    hosts = [p["host"] for p in peers] if peers else [socket.gethostname()] * dist.get_world_size()
    dest = cache_dir(out_dir, hosts[mine])
    problem = None
    if hosts.index(hosts[mine]) == mine and hosts[mine] != hosts[0]:
        try:
            problem = remote.download(plan["tag"], plan["meta"], dest)
            keep_only(dest, plan["tag"])
        except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it
            problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if problem is not None:
            problem = f"{hosts[mine]} could not download checkpoint {remote.url}/{plan['tag']}: {problem}"
    problem = next((p for p in dist.all_gather_object(problem) if p), None)
    if problem is not None:
        err = UserError(problem)
        err.same_on_every_rank = True
        raise err
    return {**plan, "dir": str(dest)}


def converts_here(peers: list[dict]) -> bool:
    """Whether this rank makes its node's universal conversion (the first rank on its host)."""
    mine = dist.get_rank()
    hosts = [p["host"] for p in peers] if peers else [socket.gethostname()] * dist.get_world_size()
    return hosts.index(hosts[mine]) == mine
