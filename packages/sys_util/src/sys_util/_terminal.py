"""Terminal raw mode with guaranteed restore.

``crosvm run`` puts stdin in raw mode so the guest's serial console sees every key. If the VMM then
dies without restoring the terminal, the user's shell is left unusable; so :class:`RawTerminal`
restores the saved mode on normal exit, on any exception, at interpreter exit, and when a
terminating signal (SIGTERM, SIGHUP, SIGQUIT, SIGINT) arrives before the signal takes effect.
"""

from __future__ import annotations

import atexit
import os
import signal
import termios
import threading
from types import FrameType, TracebackType
from typing import Any, Self

from sys_util._fd import AsRawFd, raw_fd

__all__ = ["RawTerminal", "restore_mode", "set_raw_mode"]

#: Signals whose default action kills the process, during which the terminal is restored first.
RESTORE_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGINT)

Attrs = list[Any]


def set_raw_mode(fd: int | AsRawFd) -> Attrs:
    """Put the terminal ``fd`` in raw mode (cfmakeraw); return the attributes to restore."""
    n = raw_fd(fd)
    saved = termios.tcgetattr(n)
    raw = termios.tcgetattr(n)
    # cfmakeraw(3): no input processing, no echo, no canonical mode, no signals, 8-bit chars.
    raw[0] &= ~(
        termios.IGNBRK
        | termios.BRKINT
        | termios.PARMRK
        | termios.ISTRIP
        | termios.INLCR
        | termios.IGNCR
        | termios.ICRNL
        | termios.IXON
    )
    raw[1] &= ~termios.OPOST
    raw[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    raw[2] &= ~(termios.CSIZE | termios.PARENB)
    raw[2] |= termios.CS8
    raw[6][termios.VMIN] = 1
    raw[6][termios.VTIME] = 0
    termios.tcsetattr(n, termios.TCSAFLUSH, raw)
    return saved


def restore_mode(fd: int | AsRawFd, attrs: Attrs) -> None:
    """Restore attributes returned by :func:`set_raw_mode`."""
    termios.tcsetattr(raw_fd(fd), termios.TCSAFLUSH, attrs)


class RawTerminal:
    """Context manager: raw mode inside, the original mode restored however the block ends.

    Signal handlers are only chained when entered from the main thread (Python allows signal
    handlers nowhere else); the atexit and ``finally`` restores work from any thread.
    """

    def __init__(self, fd: int | AsRawFd = 0) -> None:
        self._fd = raw_fd(fd)
        self._saved: Attrs | None = None
        self._previous: dict[int, Any] = {}
        # Re-entrant: restore() may run from a signal handler that interrupted restore() itself
        # in the main thread (a plain Lock would deadlock there; a double restore is harmless).
        self._lock = threading.RLock()

    @property
    def active(self) -> bool:
        return self._saved is not None

    def restore(self) -> None:
        """Restore the saved mode now (idempotent; safe from a signal handler or atexit)."""
        with self._lock:
            saved, self._saved = self._saved, None
        if saved is None:
            return
        try:
            restore_mode(self._fd, saved)
        except (OSError, termios.error):
            pass  # the terminal went away (hangup): nothing left to restore

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.restore()
        previous = self._previous.get(signum, signal.SIG_DFL)
        self._uninstall_handlers()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            # Re-deliver with the default action (terminate), now that the terminal is sane.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in RESTORE_SIGNALS:
            previous = signal.getsignal(signum)
            if previous == signal.SIG_IGN:
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._on_signal)

    def _uninstall_handlers(self) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def __enter__(self) -> Self:
        self._saved = set_raw_mode(self._fd)
        atexit.register(self.restore)
        try:
            self._install_handlers()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()
        atexit.unregister(self.restore)
        if threading.current_thread() is threading.main_thread():
            self._uninstall_handlers()
