"""A minimal writer of "newc" cpio archives (the initramfs format), and the guest's file tree.

Written in Python rather than with ``cpio`` + ``mknod`` so that building an initramfs needs no
root (device nodes are just archive entries) and is byte-for-byte reproducible (fixed inode
numbers, mtime 0, owner 0:0, sorted entries).

The archive is left UNCOMPRESSED on purpose: where guest kernel code is emulated, inflating a
gzip initramfs costs ~53 s of boot; copying an uncompressed one costs nothing measurable.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Entry", "Tree", "write_newc"]


@dataclass(frozen=True)
class Entry:
    """One file in the archive. ``kind`` is ``file``, ``dir``, ``symlink``, ``chardev`` or
    ``blockdev``; ``data`` is the content (for a symlink: the target)."""

    path: str
    kind: str
    mode: int = 0o755
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


@dataclass
class Tree:
    """An in-memory file tree, written out as a cpio archive or into a directory (for ext4)."""

    entries: dict[str, Entry] = field(default_factory=dict)

    def _parents(self, path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.entries:
                self.entries[d] = Entry(d, "dir", 0o755)

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = Entry(path, "dir", mode)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = Entry(path, "file", mode, data)

    def add_symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = Entry(path, "symlink", 0o777, target.encode())

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = Entry(path, "chardev", mode, b"", (major, minor))

    def write_cpio(self, out: Path) -> None:
        write_newc(out, sorted(self.entries.values(), key=lambda e: e.path))

    def write_dir(self, root: Path, *, devices: bool = False) -> None:
        """Materialise the tree under ``root`` (device nodes only with ``devices``: needs root;
        an ext4 root does not need them, devtmpfs provides /dev)."""
        import os

        for e in sorted(self.entries.values(), key=lambda e: e.path):
            p = root / e.path
            if e.kind == "dir":
                p.mkdir(parents=True, exist_ok=True)
                p.chmod(e.mode)
            elif e.kind == "file":
                p.write_bytes(e.data)
                p.chmod(e.mode)
            elif e.kind == "symlink":
                p.symlink_to(e.data.decode())
            elif devices:
                kind = stat.S_IFCHR if e.kind == "chardev" else stat.S_IFBLK
                os.mknod(p, kind | e.mode, os.makedev(*e.rdev))


_KIND = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "chardev": stat.S_IFCHR,
    "blockdev": stat.S_IFBLK,
}


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(
    ino: int, mode: int, nlink: int, size: int, rdev: tuple[int, int], name: bytes
) -> bytes:
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def write_newc(out: Path, entries: Iterable[Entry]) -> None:
    """Write ``entries`` (parents before children) as an uncompressed newc archive."""
    chunks: list[bytes] = []
    pos = 0

    def emit(b: bytes) -> None:
        nonlocal pos
        chunks.append(b)
        pos += len(b)

    ino = 1
    for e in entries:
        name = e.path.encode()
        mode = _KIND[e.kind] | (e.mode & 0o7777)
        hdr = _header(ino, mode, 2 if e.kind == "dir" else 1, len(e.data), e.rdev, name)
        emit(hdr + name + b"\0")
        emit(_pad4(pos))
        emit(e.data)
        emit(_pad4(pos))
        ino += 1
    name = b"TRAILER!!!"
    emit(_header(0, 0, 1, 0, (0, 0), name) + name + b"\0")
    emit(_pad4(pos))
    emit(b"\0" * (-pos % 512))
    tmp = Path(str(out) + ".partial")
    tmp.write_bytes(b"".join(chunks))
    tmp.replace(out)
