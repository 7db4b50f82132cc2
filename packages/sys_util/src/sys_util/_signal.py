"""Signal helpers: blocking, and the per-thread vCPU "kick" signal.

A vCPU thread spends its life inside the ``KVM_RUN`` ioctl. To make it come back (to pause, to
exit), another thread sends it :data:`KICK_SIGNAL` with ``pthread_kill``; the signal has a C-level
no-op handler installed without ``SA_RESTART``, so the only effect is that ``KVM_RUN`` returns
``EINTR`` in that thread. A Python-level handler would not do: it runs only in the main thread.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from sys_util._binding import lib, raise_errno

__all__ = [
    "KICK_SIGNAL",
    "block_signals",
    "blocked_signals",
    "clear_pending_signal",
    "install_kick_handler",
    "kick_handler_installed",
    "kick_thread",
    "signals_blocked",
    "unblock_signals",
]

#: The vCPU kick signal, ``SIGRTMIN+0`` as in crosvm.
KICK_SIGNAL: int = signal.SIGRTMIN + 0


def install_kick_handler(signum: int = KICK_SIGNAL) -> None:
    """Install the no-op C handler for ``signum`` (process wide; idempotent)."""
    if lib.sys_util_install_noop_handler(signum) != 0:
        raise_errno(f"sigaction({signum})")


def kick_handler_installed(signum: int = KICK_SIGNAL) -> bool:
    """True if ``signum`` currently has the no-op handler."""
    result = lib.sys_util_has_noop_handler(signum)
    if result < 0:
        raise_errno(f"sigaction({signum})")
    return bool(result)


def kick_thread(thread_ident: int, signum: int = KICK_SIGNAL) -> None:
    """Send the kick signal to one thread (``threading.Thread.ident``)."""
    signal.pthread_kill(thread_ident, signum)


def block_signals(signums: Iterable[int]) -> set[int]:
    """Block ``signums`` in the calling thread; return the previous mask."""
    return {int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, list(signums))}


def unblock_signals(signums: Iterable[int]) -> set[int]:
    """Unblock ``signums`` in the calling thread; return the previous mask."""
    return {int(s) for s in signal.pthread_sigmask(signal.SIG_UNBLOCK, list(signums))}


def blocked_signals() -> set[int]:
    """The calling thread's current signal mask."""
    return {int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])}


@contextmanager
def signals_blocked(signums: Iterable[int]) -> Iterator[None]:
    """Block ``signums`` in the calling thread for the duration of the block."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, list(signums))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def clear_pending_signal(signum: int) -> bool:
    """Consume a pending (blocked) ``signum`` of this thread; True if one was pending.

    Useful after a kick that arrived while the vCPU was outside ``KVM_RUN`` with the signal
    blocked, so the next ``KVM_RUN`` does not return at once.
    """
    with signals_blocked([signum]):
        return signal.sigtimedwait([signum], 0) is not None
