"""The main process survives a hostile device process: garbage on either socket."""

from __future__ import annotations

import logging
import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.proxy import (
    ChildMonitor,
    Command,
    CommandResult,
    IrqRouterServer,
    ProxyDevice,
)
from devices.testing import FakeIrqRouter
from io_jail import Minijail
from msg_socket import MsgSocket


class Null:
    def debug_label(self) -> str:
        return "null"

    def close(self) -> None:
        pass


def _alive(proxy: ProxyDevice) -> bool:
    return proxy.alive


def _started_proxy(timeout: float = 0.2) -> tuple[ProxyDevice, socket.socket]:
    """A proxy wired to a socket we play the device process on (no real child)."""
    proxy = ProxyDevice(Null(), Minijail(), timeout=timeout)  # type: ignore[arg-type]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proxy._sock = MsgSocket(a, Command, CommandResult, send_timeout=timeout, recv_timeout=timeout)
    proxy._pid = 2**22 + 12345  # never a live pid: close() only tries to reap it
    return proxy, b


@pytest.mark.parametrize(
    "reply",
    [
        b"",  # wrong size
        b"\x09" + bytes(8),  # unknown tag
        b"\x01" + bytes(7),  # short ReadResult
        b"\x02" + bytes(8) + b"junk",  # too long
    ],
)
def test_garbage_replies_read_as_all_ones_logged_once(
    reply: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    proxy, peer = _started_proxy()
    with caplog.at_level(logging.ERROR, logger="devices.proxy"):
        peer.send(reply)
        assert proxy.read(0, 4) == b"\xff" * 4
        assert proxy.read_config_register(0) == 0xFFFF_FFFF  # dead: no second wait
        proxy.write(0, b"\x01")
    assert sum("proxy call failed" in r.message for r in caplog.records) == 1
    assert not proxy.alive
    peer.close()
    proxy.close()


def test_wrong_variant_and_silence() -> None:
    proxy, peer = _started_proxy()
    peer.send(b"\x02" + (7).to_bytes(4, "little") + bytes(4))  # ReadConfigResult for a Read
    assert proxy.read(0, 2) == b"\xff\xff"
    assert _alive(proxy)  # a well-formed but wrong answer fails that access only
    peer.send(b"\x01" + bytes(range(8)))
    assert proxy.read_config_register(1) == 0xFFFF_FFFF
    assert _alive(proxy)
    assert proxy.read(0, 8) == b"\xff" * 8  # silence: timeout, then dead
    assert not _alive(proxy)
    peer.close()
    proxy.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_irq_server_survives_garbage(packets: list[bytes]) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = IrqRouterServer(FakeIrqRouter(), a, "fuzz")
    fds_before = set(os.listdir("/proc/self/fd"))
    with b:
        for p in packets:
            b.send(p)
            server.on_readable()  # never raises
            if server.closed:
                break
    server.on_readable()
    server.close()
    assert set(os.listdir("/proc/self/fd")) <= fds_before


def test_monitor_ignores_unknown_and_closes_cleanly() -> None:
    with ChildMonitor() as monitor:
        assert monitor.on_readable() == []
        assert monitor.wait(os.getpid(), 0.01) is None  # not one of its children
        assert monitor.pids() == []
