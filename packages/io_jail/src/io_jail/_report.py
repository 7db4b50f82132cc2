"""How a jailed process's end is told to its parent: exit status, signal, refused syscall."""

from __future__ import annotations

import errno
import os
import select
import signal
import struct
import time
from dataclasses import dataclass

from io_jail._policy import syscall_name

__all__ = ["JailExit", "SeccompReport", "decode_wait_status", "wait_for_jailed"]

_RECORD = struct.Struct("<4sI")
_MAGIC = b"!SYS"


class SeccompReport:
    """The read end of the pipe a jailed child's SIGSYS reporter writes to (log mode).

    The handler in the child writes one 8-byte record, the number of the refused syscall, just
    before the child dies; :meth:`read_syscall` turns it into a name. Owns its fd.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._syscall: str | None = None

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        if self._fd < 0:
            raise OSError(errno.EBADF, "SeccompReport is closed")
        return self._fd

    def read_syscall(self) -> str | None:
        """The name of the refused syscall, if the child reported one (never blocks)."""
        if self._syscall is not None or self._fd < 0:
            return self._syscall
        ready, _, _ = select.select([self._fd], [], [], 0)
        if not ready:
            return None
        try:
            data = os.read(self._fd, _RECORD.size)
        except BlockingIOError:
            return None
        if len(data) == _RECORD.size:
            magic, nr = _RECORD.unpack(data)
            if magic == _MAGIC:
                self._syscall = syscall_name(nr)
        return self._syscall

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> SeccompReport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class JailExit:
    """How a jailed process ended. ``str()`` is a one-line human description."""

    pid: int
    status: int
    exit_code: int | None
    signal: int | None
    syscall: str | None = None

    @property
    def success(self) -> bool:
        return self.exit_code == 0

    @property
    def seccomp_violation(self) -> bool:
        return self.signal == signal.SIGSYS

    def __str__(self) -> str:
        if self.signal is not None:
            text = f"killed by {signal.Signals(self.signal).name}"
            if self.signal == signal.SIGSYS:
                what = self.syscall or "unknown; use the seccomp log mode to name it"
                text += f" (seccomp refused syscall {what})"
            return text
        return f"exited with status {self.exit_code}"


def decode_wait_status(pid: int, status: int, report: SeccompReport | None = None) -> JailExit:
    """Turn a raw ``waitpid`` status into a :class:`JailExit` (naming a refused syscall)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        syscall = report.read_syscall() if report is not None and sig == signal.SIGSYS else None
        return JailExit(pid, status, None, sig, syscall)
    return JailExit(pid, status, os.waitstatus_to_exitcode(status), None)


def wait_for_jailed(
    pid: int, report: SeccompReport | None = None, timeout: float | None = None
) -> JailExit:
    """Reap ``pid`` and describe its end (``TimeoutError`` if alive after ``timeout`` s)."""
    if timeout is None:
        _, status = os.waitpid(pid, 0)
        return decode_wait_status(pid, status, report)
    deadline = time.monotonic() + timeout
    pidfd = os.pidfd_open(pid)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"process {pid} still running after {timeout} s")
            ready, _, _ = select.select([pidfd], [], [], left)
            if ready:
                break
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    return decode_wait_status(pid, status, report)
