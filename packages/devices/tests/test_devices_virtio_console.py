"""virtio-console: guest output to an fd, host input into posted receive buffers."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from devices.testing import VirtQueueDriver, make_guest_memory
from devices.virtio import Console, Interrupt
from sys_util import EventFd, GuestMemory


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with make_guest_memory(4 << 20) as m:
        yield m


class Setup:
    def __init__(self, mem: GuestMemory) -> None:
        self.in_r, self.in_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        self.console = Console(self.in_r, self.out_w, cols=100, rows=40)
        self.console.ack_features(self.console.features())
        self.rx = VirtQueueDriver(mem, 0x10000, 16, data_base=0x100000)
        self.tx = VirtQueueDriver(mem, 0x20000, 16, data_base=0x200000)
        self.evts = [EventFd(), EventFd()]
        self.irq = EventFd()
        self.console.activate(
            mem,
            Interrupt(intx_evt=self.irq),
            [
                self.rx.make_queue(features=self.console.acked_features),
                self.tx.make_queue(features=self.console.acked_features),
            ],
            self.evts,
        )

    def close(self) -> None:
        self.console.close()
        for fd in (self.in_r, self.in_w, self.out_r, self.out_w):
            try:
                os.close(fd)
            except OSError:
                pass
        for e in [*self.evts, self.irq]:
            e.close()


def test_output_goes_to_fd(mem: GuestMemory) -> None:
    s = Setup(mem)
    try:
        chain = s.tx.add_request([b"hello, ", b"world\n"])
        s.tx.kick(s.evts[1])
        assert s.tx.wait_used(1) == [(chain.head, 0)]
        assert os.read(s.out_r, 100) == b"hello, world\n"
    finally:
        s.close()


def test_input_fills_posted_buffers_in_order(mem: GuestMemory) -> None:
    s = Setup(mem)
    try:
        os.write(s.in_w, b"ls -l\n")  # typed before any buffer was posted
        first = s.rx.add_request([], [4])
        s.rx.kick(s.evts[0])
        used = s.rx.wait_used(1)
        assert used == [(first.head, 4)] and s.rx.read_writable(first) == b"ls -"
        second = s.rx.add_request([], [64])
        s.rx.kick(s.evts[0])
        used = s.rx.wait_used(1)
        assert used == [(second.head, 2)] and s.rx.read_writable(second)[:2] == b"l\n"
        third = s.rx.add_request([], [64])
        s.rx.kick(s.evts[0])
        os.write(s.in_w, b"x")
        assert s.rx.wait_used(1) == [(third.head, 1)]
    finally:
        s.close()


def test_config_and_emergency_write(mem: GuestMemory) -> None:
    s = Setup(mem)
    try:
        cols, rows, nports, _ = struct.unpack("<HHII", s.console.read_config(0, 12))
        assert (cols, rows, nports) == (100, 40, 1)
        s.console.write_config(8, b"!\x00\x00\x00")
        assert os.read(s.out_r, 10) == b"!"
    finally:
        s.close()
