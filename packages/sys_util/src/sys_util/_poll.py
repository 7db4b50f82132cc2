"""epoll(7) with typed tokens, after crosvm's ``PollContext``/``PollToken``.

Each watched fd is registered with a *token* of the caller's choosing, typically a member of an
``enum.Enum`` (``Token.EXIT``, ``Token.CONTROL``) or an int (a queue index). ``wait`` returns
``(token, events)`` pairs, so a dispatch loop is a ``match`` on the token and never deals in fds.
"""

from __future__ import annotations

import enum
import errno
import select
from collections.abc import Iterable
from types import TracebackType
from typing import Generic, Self, TypeVar

from sys_util._fd import AsRawFd, ebadf, raw_fd
from sys_util.errors import PollError

__all__ = ["PollContext", "PollEvents"]

T = TypeVar("T")


class PollEvents(enum.IntFlag):
    """epoll event bits. ``wait`` returns plain ints; test them with ``&``."""

    READABLE = select.EPOLLIN
    WRITABLE = select.EPOLLOUT
    PRIORITY = select.EPOLLPRI
    ERROR = select.EPOLLERR
    HANGUP = select.EPOLLHUP
    READ_HANGUP = select.EPOLLRDHUP


class PollContext(Generic[T]):
    """An epoll set whose members carry tokens of type ``T``.

    The kernel drops an fd from the set by itself when its last descriptor is closed, but this
    object cannot see that: ``delete`` an fd before closing it, or a later fd with the same number
    would be reported with the stale token.
    """

    __slots__ = ("__weakref__", "_epoll", "_tokens")

    def __init__(self) -> None:
        self._epoll: select.epoll | None = select.epoll()  # EPOLL_CLOEXEC
        self._tokens: dict[int, T] = {}

    @classmethod
    def build_with(cls, members: Iterable[tuple[int | AsRawFd, T]]) -> Self:
        """Create a context watching each ``(fd, token)`` for readability."""
        ctx = cls()
        try:
            for fd, token in members:
                ctx.add(fd, token)
        except BaseException:
            ctx.close()
            raise
        return ctx

    def _ep(self) -> select.epoll:
        ep = self._epoll
        if ep is None:
            raise ebadf("PollContext")
        return ep

    def add(self, fd: int | AsRawFd, token: T, events: int = PollEvents.READABLE) -> None:
        """Watch ``fd`` for ``events`` (readability by default), reporting it as ``token``."""
        ep = self._ep()
        n = raw_fd(fd)
        try:
            ep.register(n, int(events))
        except FileExistsError as err:
            raise PollError(errno.EEXIST, n, f"fd {n} is already in the poll context") from err
        self._tokens[n] = token

    def modify(self, fd: int | AsRawFd, token: T, events: int = PollEvents.READABLE) -> None:
        """Change the token and events of a watched fd."""
        ep = self._ep()
        n = raw_fd(fd)
        try:
            ep.modify(n, int(events))
        except FileNotFoundError as err:
            raise PollError(errno.ENOENT, n, f"fd {n} is not in the poll context") from err
        self._tokens[n] = token

    def delete(self, fd: int | AsRawFd) -> None:
        """Stop watching ``fd`` (call before closing it)."""
        ep = self._ep()
        n = raw_fd(fd)
        try:
            ep.unregister(n)
        except FileNotFoundError as err:
            self._tokens.pop(n, None)
            raise PollError(errno.ENOENT, n, f"fd {n} is not in the poll context") from err
        except OSError as err:
            # EBADF: the fd was closed already. The kernel dropped it; forget the token too.
            self._tokens.pop(n, None)
            if err.errno != errno.EBADF:
                raise
            return
        del self._tokens[n]

    def wait(self, timeout: float | None = None, maxevents: int = -1) -> list[tuple[T, int]]:
        """Wait for events; return ``(token, events)`` pairs (empty on timeout).

        ``timeout`` is in seconds; ``None`` waits forever. Interrupted waits are retried (PEP 475)
        unless a Python signal handler raises.
        """
        ep = self._ep()
        tokens = self._tokens
        ready = ep.poll(-1 if timeout is None else timeout, maxevents)
        return [(tokens[fd], ev) for fd, ev in ready if fd in tokens]

    def __len__(self) -> int:
        return len(self._tokens)

    def fileno(self) -> int:
        """The epoll fd itself (so a PollContext can be nested in another one)."""
        return self._ep().fileno()

    @property
    def closed(self) -> bool:
        return self._epoll is None

    def close(self) -> None:
        """Close the epoll fd. Idempotent."""
        ep, self._epoll = self._epoll, None
        self._tokens.clear()
        if ep is not None:
            ep.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
