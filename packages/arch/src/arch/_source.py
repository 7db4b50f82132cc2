"""Random-access reads of an image (kernel, initrd) from a path, an open file or bytes.

Images are copied into guest memory with ``os.preadv`` straight into memoryviews of the shared
guest mapping, so a 20 MB vmlinux or a 100 MB initrd is never held in a Python ``bytes``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import BinaryIO

__all__ = ["ImageInput", "ImageSource", "open_image"]

#: What callers may pass as a kernel or initrd.
ImageInput = str | os.PathLike[str] | BinaryIO | bytes | bytearray | memoryview


class ImageSource:
    """An image opened for positional reads. Close it (or use ``with``) when done."""

    def __init__(
        self,
        name: str | None,
        size: int,
        fd: int | None = None,
        data: memoryview | None = None,
        owned: bool = False,
    ) -> None:
        self.name = name
        self.size = size
        self._fd = fd
        self._data = data
        self._owned = owned

    def close(self) -> None:
        if self._owned and self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._data = None

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pread(self, length: int, offset: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer at end of file)."""
        if offset >= self.size or length <= 0:
            return b""
        length = min(length, self.size - offset)
        if self._data is not None:
            return bytes(self._data[offset : offset + length])
        assert self._fd is not None
        chunks = []
        while length > 0:
            chunk = os.pread(self._fd, length, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(chunks)

    def read_into(self, views: Sequence[memoryview], offset: int) -> int:
        """Fill ``views`` from ``offset``; return the number of bytes copied (short at EOF)."""
        if self._data is not None:
            done = 0
            for view in views:
                piece = self._data[offset + done : offset + done + len(view)]
                view[: len(piece)] = piece
                done += len(piece)
                if len(piece) < len(view):
                    break
            return done
        assert self._fd is not None
        pending = [v.cast("B") if v.format != "B" else v for v in views if len(v)]
        done = 0
        while pending:
            got = os.preadv(self._fd, pending, offset + done)
            if got == 0:
                break
            done += got
            while pending and got >= len(pending[0]):
                got -= len(pending[0])
                pending.pop(0)
            if pending and got:
                pending[0] = pending[0][got:]
        return done


def open_image(image: ImageInput) -> ImageSource:
    """Open ``image`` for reading. Raises ``OSError`` for a missing or unreadable file."""
    if isinstance(image, bytes | bytearray | memoryview):
        view = memoryview(image).cast("B")
        return ImageSource(None, len(view), data=view)
    if isinstance(image, str | os.PathLike):
        path = os.fspath(image)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        return ImageSource(path, size, fd=fd, owned=True)
    name = getattr(image, "name", None)
    name = name if isinstance(name, str) else None
    try:
        fd = image.fileno()
    except (AttributeError, OSError, ValueError):
        data = image.read()
        view = memoryview(data).cast("B")
        return ImageSource(name, len(view), data=view)
    return ImageSource(name, os.fstat(fd).st_size, fd=fd)
