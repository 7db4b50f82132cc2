from __future__ import annotations

import ctypes
import ctypes.util
import errno
import signal
import threading
import time

from sys_util import (
    KICK_SIGNAL,
    block_signals,
    blocked_signals,
    clear_pending_signal,
    install_kick_handler,
    kick_handler_installed,
    kick_thread,
    signals_blocked,
    unblock_signals,
)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def test_kick_signal_is_sigrtmin() -> None:
    assert signal.SIGRTMIN == KICK_SIGNAL


def test_kick_interrupts_a_blocking_syscall_in_a_thread() -> None:
    install_kick_handler()
    install_kick_handler()  # idempotent
    assert kick_handler_installed()
    result: list[tuple[int, int]] = []

    def blocked_in_pause() -> None:
        # pause(2) returns only when a handler runs: exactly what KVM_RUN does on a kick.
        rc = _libc.pause()
        result.append((rc, ctypes.get_errno()))

    t = threading.Thread(target=blocked_in_pause)
    t.start()
    deadline = time.monotonic() + 10
    assert t.ident is not None
    while t.is_alive() and time.monotonic() < deadline:
        kick_thread(t.ident)  # repeated: the first kick may land before pause() starts
        t.join(0.01)
    assert not t.is_alive()
    assert result == [(-1, errno.EINTR)]


def test_block_unblock_and_clear_pending() -> None:
    install_kick_handler()
    before = blocked_signals()
    try:
        block_signals([KICK_SIGNAL])
        assert KICK_SIGNAL in blocked_signals()
        assert not clear_pending_signal(KICK_SIGNAL)
        signal.pthread_kill(threading.get_ident(), KICK_SIGNAL)
        assert KICK_SIGNAL in signal.sigpending()
        assert clear_pending_signal(KICK_SIGNAL)
        assert KICK_SIGNAL not in signal.sigpending()
        unblock_signals([KICK_SIGNAL])
        assert KICK_SIGNAL not in blocked_signals()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def test_signals_blocked_context_restores_mask() -> None:
    before = blocked_signals()
    with signals_blocked([signal.SIGUSR2]):
        assert signal.SIGUSR2 in blocked_signals()
    assert blocked_signals() == before
