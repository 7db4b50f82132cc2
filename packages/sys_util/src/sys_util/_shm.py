"""memfd_create(2) shared memory with seals."""

from __future__ import annotations

import enum
import fcntl
import os
from typing import Self

from sys_util._fd import OwnedFd
from sys_util.errors import InvalidArgument

__all__ = ["Seals", "SharedMemory"]


class Seals(enum.IntFlag):
    """File seals (fcntl F_ADD_SEALS). Once added, a seal can never be removed."""

    SEAL = fcntl.F_SEAL_SEAL
    SHRINK = fcntl.F_SEAL_SHRINK
    GROW = fcntl.F_SEAL_GROW
    WRITE = fcntl.F_SEAL_WRITE


class SharedMemory(OwnedFd):
    """An anonymous memory file (memfd) of a fixed size, shareable by fd with other processes.

    Seals let the owner promise that the size cannot change: a process that maps the file can then
    trust that no one (say, a compromised device process holding the same fd) can truncate it and
    make every access to the mapping raise SIGBUS.
    """

    __slots__ = ("_name", "_size")

    def __init__(self, name: str, size: int) -> None:
        if size < 0:
            raise InvalidArgument(f"shared memory size must not be negative, got {size}")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        super().__init__(fd)
        self._name = name
        self._size = size

    def _init_from_fd(self) -> None:
        # F_GET_SEALS succeeds only on memfd/shmem files: it doubles as the kind check.
        fcntl.fcntl(self._fd, fcntl.F_GET_SEALS)
        self._name = ""
        self._size = os.fstat(self._fd).st_size

    @property
    def name(self) -> str:
        """The memfd name given at creation ('' for one wrapped with from_fd)."""
        return self._name

    @property
    def size(self) -> int:
        """The size in bytes."""
        return self._size

    def set_size(self, size: int) -> None:
        """Change the size (fails with EPERM once SHRINK or GROW is sealed, as applicable)."""
        os.ftruncate(self.fileno(), size)
        self._size = size

    def add_seals(self, seals: Seals | int) -> None:
        """Add seals (raises EPERM if SEAL is already sealed)."""
        fcntl.fcntl(self.fileno(), fcntl.F_ADD_SEALS, int(seals))

    def get_seals(self) -> Seals:
        """Return the seals currently in force."""
        return Seals(fcntl.fcntl(self.fileno(), fcntl.F_GET_SEALS))

    def try_clone(self) -> Self:
        """Return a new SharedMemory on a dup of this fd."""
        clone = super().try_clone()
        clone._name = self._name
        return clone
