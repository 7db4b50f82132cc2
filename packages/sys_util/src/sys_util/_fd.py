"""The common shape of every fd-owning object in pycrosvm.

An :class:`OwnedFd` owns exactly one file descriptor: ``fileno()``, an idempotent ``close()``, a
``closed`` property, context management, ``detach()`` to give the fd away and ``from_fd()`` to take
one. After ``close()`` the stored fd is ``-1`` and ``fileno()`` raises ``OSError(EBADF)``; subclass
methods go through ``fileno()`` so they fail the same way.
"""

from __future__ import annotations

import errno
import os
import weakref
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

__all__ = ["AsRawFd", "OwnedFd", "check_anon_inode", "ebadf", "raw_fd"]


@runtime_checkable
class AsRawFd(Protocol):
    """Anything with a ``fileno()`` method (files, sockets, every pycrosvm fd object)."""

    def fileno(self) -> int: ...


def ebadf(what: str = "file descriptor") -> OSError:
    """Build the OSError raised by use after close."""
    return OSError(errno.EBADF, f"{os.strerror(errno.EBADF)} ({what} is closed)")


def raw_fd(fd_or_obj: int | AsRawFd) -> int:
    """Return the integer fd of ``fd_or_obj`` (an int or an object with ``fileno()``)."""
    if isinstance(fd_or_obj, int):
        return fd_or_obj
    return fd_or_obj.fileno()


def check_anon_inode(fd: int, kind: str) -> None:
    """Raise OSError unless ``fd`` is an open anonymous-inode fd of ``kind`` (``"eventfd"``...).

    Without ``/proc`` (inside a minimal jail) only the fd's validity can be checked.
    """
    os.fstat(fd)  # EBADF for a closed fd
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        if os.path.isdir("/proc/self/fd"):
            raise
        return
    if target != f"anon_inode:[{kind}]":
        raise OSError(errno.EINVAL, f"fd {fd} is {target}, not an {kind}")


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class OwnedFd:
    """Base class of objects that own one file descriptor."""

    __slots__ = ("__weakref__", "_fd", "_finalizer")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        # A safety net only: an fd object dropped without close() still gets its fd closed when it
        # is garbage collected, instead of leaking into every later fork.
        self._finalizer = weakref.finalize(self, _close_quietly, fd)

    @classmethod
    def from_fd(cls, fd: int) -> Self:
        """Wrap ``fd``, taking ownership: the new object closes it.

        Subclasses check that ``fd`` is of their kind (an eventfd for EventFd...). If wrapping
        fails (``fd`` is not open, or of another kind), ownership stays with the caller: the
        number is not closed, since by the time a finalizer ran it might name someone else's file.
        """
        obj = cls.__new__(cls)
        OwnedFd.__init__(obj, fd)
        try:
            obj._init_from_fd()
        except BaseException:
            obj._finalizer.detach()
            obj._fd = -1
            raise
        return obj

    def _init_from_fd(self) -> None:
        """Hook for subclasses that keep more state than the fd."""

    def try_clone(self) -> Self:
        """Return a new object of the same type on a dup of this fd (close-on-exec)."""
        dup = os.dup(self.fileno())
        try:
            return type(self).from_fd(dup)
        except BaseException:
            os.close(dup)
            raise

    def fileno(self) -> int:
        """Return the fd; raise ``OSError(EBADF)`` once closed."""
        if self._fd < 0:
            raise ebadf(type(self).__name__)
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the fd. Calling it again does nothing."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            self._finalizer.detach()
            os.close(fd)

    def detach(self) -> int:
        """Give up ownership: return the fd, which this object will no longer close."""
        fd = self.fileno()
        self._finalizer.detach()
        self._fd = -1
        return fd

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<{type(self).__name__} {state}>"
