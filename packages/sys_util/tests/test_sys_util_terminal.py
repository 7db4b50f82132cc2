from __future__ import annotations

import os
import signal
import termios
import time
from collections.abc import Iterator

import pytest

from sys_util import RawTerminal, restore_mode, set_raw_mode


@pytest.fixture
def pty() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    try:
        yield master, slave
    finally:
        os.close(master)
        os.close(slave)


def _is_raw(fd: int) -> bool:
    lflag = termios.tcgetattr(fd)[3]
    return not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)


def test_set_and_restore(pty: tuple[int, int]) -> None:
    _, slave = pty
    original = termios.tcgetattr(slave)
    assert not _is_raw(slave)
    saved = set_raw_mode(slave)
    assert _is_raw(slave)
    assert saved == original
    restore_mode(slave, saved)
    assert termios.tcgetattr(slave) == original


def test_context_manager_restores(pty: tuple[int, int]) -> None:
    master, slave = pty
    original = termios.tcgetattr(slave)
    with RawTerminal(slave) as term:
        assert term.active
        assert _is_raw(slave)
        os.write(master, b"\x03")  # ^C is data in raw mode, not SIGINT
        assert os.read(slave, 1) == b"\x03"
    assert not term.active
    assert termios.tcgetattr(slave) == original
    term.restore()  # idempotent


def test_restored_on_exception(pty: tuple[int, int]) -> None:
    _, slave = pty
    original = termios.tcgetattr(slave)
    with pytest.raises(RuntimeError), RawTerminal(slave):
        assert _is_raw(slave)
        raise RuntimeError("boom")
    assert termios.tcgetattr(slave) == original


def test_restored_before_a_fatal_signal(pty: tuple[int, int]) -> None:
    _, slave = pty
    original = termios.tcgetattr(slave)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            with RawTerminal(slave):
                os.write(w, b"1" if _is_raw(slave) else b"0")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)
        finally:
            os._exit(3)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGTERM
    assert termios.tcgetattr(slave) == original


def test_signal_handlers_are_put_back(pty: tuple[int, int]) -> None:
    _, slave = pty
    # Under nohup SIGHUP starts ignored, and an ignored signal is left alone (next test).
    original = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with RawTerminal(slave):
            assert signal.getsignal(signal.SIGHUP) != signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, original)


def test_ignored_signals_stay_ignored(pty: tuple[int, int]) -> None:
    _, slave = pty
    original = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with RawTerminal(slave):
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, original)


def test_not_a_terminal() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(termios.error), RawTerminal(r):
            pass
    finally:
        os.close(r)
        os.close(w)
