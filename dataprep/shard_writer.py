"""Reproducible WebDataset tars and their DALI index, written atomically.

`ShardWriter` writes members in call order with fixed metadata (mtime 0, uid/gid 0, no user or
group names, mode 0644, ustar headers), so the same samples give the same bytes whoever writes
them and whenever. It records where each member's data starts, which is both the manifest's
offsets and the DALI index (`wds2idx` format: a line `v1.2 <samples>`, then per sample
`<ext> <data offset> <size> <member name>` for each of its members, space separated).

Files are written under a temporary name in the same folder and renamed into place
(`os.replace`, names from pipeline/atomic_write.py), so a shard appears only whole.

Owns: the tar layout and the DALI index text.
Must not touch: what a sample holds (worker, manifest).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from hiervl.atomic_write import temp_path

INDEX_VERSION = "v1.2"  # what DALI's wds2idx writes


class ShardWriter:
    """Write one tar shard; `members` lists (name, data offset, size) in order."""

    def __init__(self, final_path: str | Path):
        self.final = Path(final_path)
        self.tmp = temp_path(self.final)
        self._file = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.members: list[tuple[str, int, int]] = []

    def add(self, name: str, data: bytes) -> tuple[int, int]:
        """Append a member; return (offset of its data in the tar, size)."""
        if "/" in name or name.startswith(".") or len(name.encode()) > 100:
            raise ValueError(f"unsafe member name {name!r}")
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        header_at = self._tar.offset
        self._tar.addfile(info, io.BytesIO(data))
        offset = header_at + tarfile.BLOCKSIZE  # one 512-byte ustar header precedes the data
        self.members.append((name, offset, len(data)))
        return offset, len(data)

    def close(self) -> int:
        """Finish the tar and rename it into place; return its size in bytes."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.final)
        return self.final.stat().st_size

    def abort(self) -> None:
        try:
            self._tar.close()
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def split_name(name: str) -> tuple[str, str]:
    """WebDataset/DALI split: key up to the first dot, extension after it."""
    dot = name.find(".")
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def index_text(members: list[tuple[str, int, int]]) -> str:
    """The DALI index for a tar's members, byte-identical to what `wds2idx` writes."""
    groups: list[list[tuple[str, int, int, str]]] = []
    last = None
    for name, offset, size in members:
        base, ext = split_name(name)
        if not base:
            continue
        if base != last:
            groups.append([])
            last = base
        groups[-1].append((ext, offset, size, name))
    if not groups:
        raise ValueError("no members: DALI refuses an empty index")
    lines = [f"{INDEX_VERSION} {len(groups)}\n"]
    lines += [" ".join(" ".join(map(str, c)) for c in g) + "\n" for g in groups]
    return "".join(lines)


def read_index(path: str | Path) -> list[list[tuple[str, int, int, str]]]:
    """Parse a DALI index back into per-sample member lists (ext, offset, size, name)."""
    lines = Path(path).read_text().splitlines()
    version, count = lines[0].split()
    if version != INDEX_VERSION or int(count) != len(lines) - 1:
        raise ValueError(f"{path}: bad index header {lines[0]!r}")
    out = []
    for line in lines[1:]:
        parts = line.split(" ")
        out.append([(parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3]) for i in range(0, len(parts), 4)])
    return out
