"""virtio-net's batched rx/tx paths on rings a fuzzer wrote (no root needed).

A datagram socketpair stands in for the tap: one write is one frame and one read one frame,
as on a tap, so the device's own queue handlers run inline (no worker thread) on random
descriptor tables and available rings. Whatever the guest wrote: no exception leaves a
handler, every frame handed to the "tap" is a whole chain of a legal size, chains complete at
most once, and the device still moves frames once the driver sets up sane rings again.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.testing import VirtQueueDriver, make_guest_memory
from devices.virtio import Interrupt, Queue
from devices.virtio.net import MAX_FRAME_BYTES, RXQ, TXQ, Net, Tap
from sys_util import EventFd, GuestMemory

MEM = 1 << 20
QSIZE = 16
HDR = 12
RINGS = (0x1000, 0x2000)  # rx, tx
DATA = 0x8000

_FRAME = b"\xff" * 6 + bytes.fromhex("02aabbccdd01") + b"\x88\xb5"


class SocketTap(Tap):
    """A tap stand-in on one end of a datagram socketpair (the tap ioctls are no-ops)."""

    def set_vnet_hdr_size(self, size: int) -> None:
        return

    def set_offload(self, flags: int) -> None:
        return


class Rig:
    def __init__(self, mem: GuestMemory, net: Net, peer: socket.socket) -> None:
        self.mem = mem
        self.net = net
        self.peer = peer
        self.irq = EventFd(nonblocking=True)
        self.interrupt = Interrupt(intx_evt=self.irq)

    def attach(self, rx_base: int, tx_base: int) -> tuple[VirtQueueDriver, VirtQueueDriver]:
        """(Re)activate the device inline on fresh rings at ``rx_base``/``tx_base``."""
        net = self.net
        net.on_reset()
        rx = VirtQueueDriver(self.mem, rx_base, QSIZE, data_base=DATA, data_size=0x10000)
        tx = VirtQueueDriver(self.mem, tx_base, QSIZE, data_base=DATA + 0x10000, data_size=0x10000)
        feats = net.acked_features
        queues: list[Queue] = [rx.make_queue(features=feats), tx.make_queue(features=feats)]
        net.mem, net.interrupt, net.queues = self.mem, self.interrupt, queues
        net.on_activate()
        return rx, tx

    def sent(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.peer.recv(MAX_FRAME_BYTES + 100))
            except BlockingIOError:
                return out


@contextmanager
def rig() -> Iterator[Rig]:
    dev, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (dev, peer):
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    net = Net(SocketTap(os.dup(dev.fileno()), "fuzz0"), mac=bytes.fromhex("02aabbccdd01"))
    dev.close()
    net.ack_features(net.features())
    mem = make_guest_memory(MEM)
    r = Rig(mem, net, peer)
    try:
        yield r
    finally:
        net.on_reset()
        net.close()
        r.irq.close()
        peer.close()
        mem.close()


addrs = st.one_of(
    st.sampled_from([DATA, DATA + 0x800, MEM - 8, MEM - 2048, MEM, 4 * MEM, 2**64 - 16]),
    st.sampled_from(RINGS),  # the rings themselves (the guest may corrupt its own)
    st.integers(0, 2**64 - 1),
)
lengths = st.one_of(
    st.sampled_from([0, 4, HDR - 1, HDR, HDR + 1, 74, 1526, 2048]),
    st.sampled_from([HDR + MAX_FRAME_BYTES, HDR + MAX_FRAME_BYTES + 1, 2**32 - 1]),
    st.integers(0, 2**32 - 1),
)
flags = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]), st.integers(0, 0xFFFF))
descriptors = st.lists(
    st.tuples(addrs, lengths, flags, st.integers(0, 0xFFFF)), min_size=QSIZE, max_size=QSIZE
)
heads = st.lists(st.one_of(st.integers(0, QSIZE - 1), st.integers(0, 0xFFFF)), max_size=24)


def _write_table(drv: VirtQueueDriver, table: list[tuple[int, int, int, int]]) -> None:
    for i, (addr, length, fl, nxt) in enumerate(table):
        drv.write_descriptor(i, addr, length, fl, nxt)


def _still_works(r: Rig) -> None:
    while True:  # frames the hostile rings left waiting in the "tap" are not ours to check
        try:
            os.read(r.net.tap.fileno(), MAX_FRAME_BYTES + 100)
        except BlockingIOError:
            break
    rx, tx = r.attach(0x40000, 0x41000)
    frame = _FRAME + b"alive"
    tx.add_request([bytes(HDR) + frame])
    r.net.process_queue(TXQ, r.net.queues[TXQ])
    assert r.sent() == [bytes(HDR) + frame]
    chain = rx.add_request([], [2048])
    r.peer.send(bytes(HDR) + frame)
    r.net.process_queue(RXQ, r.net.queues[RXQ])
    ((head, n),) = rx.pop_used()
    assert head == chain.head and rx.read_writable(chain)[HDR:n] == frame


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=descriptors, published=heads, avail_jump=st.sampled_from([0, 0, 0, 17, 40000]))
def test_transmit_on_a_hostile_ring(
    table: list[tuple[int, int, int, int]], published: list[int], avail_jump: int
) -> None:
    with rig() as r:
        _, tx = r.attach(*RINGS)
        _write_table(tx, table)
        for h in published:
            tx.publish(h)
        if avail_jump:
            tx.set_avail_idx(tx.avail_idx + avail_jump)
        queue = r.net.queues[TXQ]
        r.net.process_queue(TXQ, queue)  # must not raise
        r.net.process_queue(TXQ, queue)  # nor a second time over the same state
        frames = r.sent()
        for f in frames:  # whole chains only, of a size the device accepts
            assert HDR <= len(f) <= HDR + MAX_FRAME_BYTES
        used = tx.pop_used()
        assert len(used) <= len(published)
        assert all(head < QSIZE and length == 0 for head, length in used)
        stats = r.net.stats
        assert stats.tx_frames + stats.tx_errors == len(frames)
        assert stats.tx_frames + stats.tx_errors + stats.tx_bad_chains <= len(used)
        _still_works(r)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=descriptors,
    published=heads,
    incoming=st.lists(st.integers(0, 3000), max_size=6),
)
def test_receive_on_a_hostile_ring(
    table: list[tuple[int, int, int, int]], published: list[int], incoming: list[int]
) -> None:
    with rig() as r:
        rx, _ = r.attach(*RINGS)
        _write_table(rx, table)
        for h in published:
            rx.publish(h)
        for n in incoming:  # headers and frames of any length, short ones included
            r.peer.send((bytes(HDR) + _FRAME + bytes(3000))[:n])
        queue = r.net.queues[RXQ]
        r.net.process_queue(RXQ, queue)  # must not raise
        r.net.process_queue(RXQ, queue)
        stats = r.net.stats
        assert stats.rx_frames <= len(incoming)
        _still_works(r)
