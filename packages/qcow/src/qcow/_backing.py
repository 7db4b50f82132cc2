"""Backing files and image type detection.

A backing file is anything with ``readinto_at(buf, offset)`` that zero-fills past its own end,
which is what the qcow2 spec asks of a backing file smaller than the image.
"""

from __future__ import annotations

import errno
import os
from typing import Protocol

from qcow._header import MAGIC

__all__ = ["BackingFile", "RawBacking", "detect_image_type"]

_ZEROS = bytes(1 << 20)


def zero_fill(buf: memoryview) -> None:
    """Set ``buf`` to zeros without a Python loop per byte."""
    n = len(buf)
    pos = 0
    while pos < n:
        step = min(n - pos, len(_ZEROS))
        buf[pos : pos + step] = _ZEROS[:step]
        pos += step


class BackingFile(Protocol):
    @property
    def virtual_size(self) -> int: ...

    def readinto_at(self, buf: memoryview, offset: int) -> int: ...

    def keep_fds(self) -> list[int]: ...

    def close(self) -> None: ...


class RawBacking:
    """A raw image used as a read-only backing file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    @property
    def virtual_size(self) -> int:
        return os.fstat(self._fd).st_size

    def readinto_at(self, buf: memoryview, offset: int) -> int:
        """Fill all of ``buf``: file bytes, then zeros past the end of the file."""
        if self._fd < 0:
            raise OSError(errno.EBADF, "backing file is closed")
        n = len(buf)
        done = 0
        while done < n:
            got = os.preadv(self._fd, [buf[done:]], offset + done)
            if got <= 0:
                zero_fill(buf[done:])
                break
            done += got
        return n

    def keep_fds(self) -> list[int]:
        return [self._fd] if self._fd >= 0 else []

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def detect_image_type(path_or_fd: str | os.PathLike[str] | int) -> str:
    """``"qcow2"`` if the file starts with the qcow2 magic, else ``"raw"`` (as qemu probes)."""
    if isinstance(path_or_fd, int):
        head = os.pread(path_or_fd, 4, 0)
    else:
        with open(path_or_fd, "rb") as f:
            head = f.read(4)
    return "qcow2" if head == MAGIC else "raw"
