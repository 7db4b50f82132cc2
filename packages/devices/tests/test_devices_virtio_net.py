"""virtio-net: features, the Tap wrapper, and frames through a real TAP with a mock driver.

The TAP tests need root (CAP_NET_ADMIN). Each one builds its tap inside a fresh, anonymous
network namespace: a child process unshares CLONE_NEWNET, creates the tap, brings it up, opens
an AF_PACKET socket bound to it and passes both fds back over a socketpair, then exits. The
namespace lives exactly as long as those fds, so nothing is left behind and no frame can reach
a real network. Only EtherType 0x88B5 (IEEE local experimental) frames are looked at.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from devices.testing import SubmittedChain, VirtQueueDriver, make_guest_memory
from devices.virtio import Features, Interrupt
from devices.virtio.net import (
    MAX_FRAME_BYTES,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    Net,
    NetFeatures,
    Tap,
    TapError,
    parse_mac,
)
from sys_util import EventFd, GuestMemory

ETH_TEST = 0x88B5
HDR = 12
GUEST_MAC = bytes.fromhex("02aabbccdd01")
HOST_MAC = bytes.fromhex("02aabbccdd02")

#: Root-only (CAP_NET_ADMIN for the tap, unshare for the namespace): the root conftest skips it.
needs_root = pytest.mark.root

_CHILD = r"""
import socket, subprocess, sys
from sys_util.jail import CLONE_NEWNET, unshare
from devices.virtio.net import Tap
unshare(CLONE_NEWNET)
for knob in ("all", "default"):  # no IPv6 autoconf chatter on the tap
    with open(f"/proc/sys/net/ipv6/conf/{knob}/disable_ipv6", "w") as f:
        f.write("1")
tap = Tap.create("vmtap%d")
subprocess.run(["ip", "link", "set", "dev", tap.name, "address", sys.argv[2], "up"], check=True)
proto = int(sys.argv[3])
pkt = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
pkt.bind((tap.name, proto))
chan = socket.socket(fileno=int(sys.argv[1]))
socket.send_fds(chan, [tap.name.encode()], [tap.fileno(), pkt.fileno()])
"""


@dataclass
class Wire:
    """A tap (device side) and a packet socket on the same interface (host side)."""

    tap: Tap
    host: socket.socket

    def send(self, payload: bytes, dst: bytes = GUEST_MAC) -> bytes:
        frame = dst + HOST_MAC + struct.pack(">H", ETH_TEST) + payload
        self.host.send(frame)
        return frame

    def recv(self, timeout: float = 5.0) -> bytes:
        self.host.settimeout(timeout)
        return self.host.recv(70000)


def open_wire(proto: int = ETH_TEST) -> Wire:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with parent, child:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(child.fileno()), HOST_MAC.hex(":"), str(proto)],
            pass_fds=(child.fileno(),), capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if proc.returncode != 0:
            pytest.fail(f"netns child failed: {proc.stderr}")
        msg, fds, _, _ = socket.recv_fds(parent, 64, 2)
    tap = Tap(fds[0], msg.decode())
    return Wire(tap, socket.socket(fileno=fds[1]))


@pytest.fixture
def wire() -> Iterator[Wire]:
    w = open_wire()
    try:
        yield w
    finally:
        w.host.close()
        w.tap.close()


class Guest:
    """A mock virtio-net driver: receiveq and transmitq rings in guest memory."""

    def __init__(self, net: Net, features: int | None = None) -> None:
        self.net = net
        self.mem: GuestMemory = make_guest_memory(8 << 20)
        self.rx = VirtQueueDriver(self.mem, 0x10000, size=256, data_size=2 << 20)
        self.tx = VirtQueueDriver(self.mem, 0x300000, size=256, data_size=2 << 20)
        net.ack_features(net.features() if features is None else features)
        self.kicks = [EventFd(), EventFd()]
        self.irq = EventFd()
        feats = net.acked_features
        self.queues = [self.rx.make_queue(features=feats), self.tx.make_queue(features=feats)]
        net.activate(self.mem, Interrupt(intx_evt=self.irq), self.queues, self.kicks)

    def post_rx(
        self, size: int = 2048, count: int = 1, *, kick: bool = True
    ) -> list[SubmittedChain]:
        chains = [self.rx.add_request([], [size]) for _ in range(count)]
        if kick:
            self.rx.kick(self.kicks[0])
        return chains

    def send(self, frame: bytes, header: bytes = bytes(HDR), **kw: bool) -> SubmittedChain:
        chain = self.tx.add_request([header, frame], [], **kw)
        self.tx.kick(self.kicks[1])
        return chain

    def close(self, *, close_net: bool = True) -> None:
        if close_net:
            self.net.close()
        for e in (*self.kicks, self.irq):
            e.close()
        self.mem.close()


@pytest.fixture
def guest(wire: Wire) -> Iterator[Guest]:
    g = Guest(Net(wire.tap, mac=GUEST_MAC))
    try:
        yield g
    finally:
        g.close()


def test_frame(n: int = 100, tag: int = 0) -> bytes:
    return (
        HOST_MAC
        + GUEST_MAC
        + struct.pack(">H", ETH_TEST)
        + bytes((tag + i) & 0xFF for i in range(n))
    )


test_frame.__test__ = False  # type: ignore[attr-defined]


# --- no privileges needed -------------------------------------------------------------------


def test_features_and_config_space() -> None:
    net = Net(Tap(-1, "none"), mac=GUEST_MAC)
    feats = net.features()
    for bit in (NetFeatures.MAC, NetFeatures.STATUS, NetFeatures.MRG_RXBUF, NetFeatures.CSUM,
                NetFeatures.GUEST_CSUM, NetFeatures.GUEST_TSO4, NetFeatures.HOST_TSO6,
                Features.VERSION_1):  # fmt: skip
        assert feats >> bit & 1, bit
    assert not feats >> NetFeatures.CTRL_VQ & 1
    assert not feats >> NetFeatures.GUEST_UFO & 1  # Linux taps no longer do UFO
    assert net.read_config(0, 6) == GUEST_MAC
    assert net.read_config(6, 2) == b"\x01\x00"  # VIRTIO_NET_S_LINK_UP
    assert net.read_config(8, 2) == b"\x01\x00"  # one queue pair
    assert not Net(Tap(-1, "none")).features() >> NetFeatures.MAC & 1


def test_acked_features_drop_broken_dependencies_and_map_to_tap_offloads() -> None:
    net = Net(Tap(-1, "none"))
    net.ack_features(1 << NetFeatures.GUEST_TSO4 | 1 << NetFeatures.HOST_TSO4)  # no *CSUM
    assert net.acked_features == 0
    assert net.tap_offloads() == 0
    net.ack_features(
        1 << NetFeatures.GUEST_CSUM | 1 << NetFeatures.GUEST_TSO4 | 1 << NetFeatures.GUEST_TSO6
    )
    assert net.tap_offloads() == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    net.ack_features(1 << NetFeatures.GUEST_CSUM)
    assert net.tap_offloads() == TUN_F_CSUM


def test_bad_macs_are_refused() -> None:
    with pytest.raises(ValueError):
        Net(Tap(-1, "none"), mac=b"\x01\x02\x03\x04\x05\x06")  # multicast
    with pytest.raises(ValueError):
        Net(Tap(-1, "none"), mac=b"\x02")
    assert parse_mac("52:54:00:12:34:56") == bytes.fromhex("525400123456")
    with pytest.raises(ValueError):
        parse_mac("52:54:00:12:34")


def test_tap_from_a_non_tap_fd_is_a_clear_error() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(TapError, match=f"fd {r} is not a TUN/TAP device"):
            Tap.from_fd(r)
        os.fstat(r)  # still open: it belongs to the caller
    finally:
        os.close(r)
        os.close(w)


def test_tap_bad_name_is_refused_before_any_ioctl() -> None:
    with pytest.raises(TapError, match="invalid interface name"):
        Tap.create("x" * 20)


def test_tap_fd_protocol() -> None:
    r, w = os.pipe()
    os.close(w)
    tap = Tap(r, "t")
    assert tap.fileno() == r
    assert repr(tap) == f"Tap('t', fd={r})"
    with tap:
        pass
    assert tap.closed
    tap.close()
    with pytest.raises(OSError) as info:
        tap.fileno()
    assert info.value.errno == errno.EBADF


# --- through a real tap in a private network namespace --------------------------------------


@needs_root
def test_tap_create_from_fd_and_settings(wire: Wire) -> None:
    assert wire.tap.name.startswith("vmtap")
    wire.tap.set_vnet_hdr_size(12)
    assert wire.tap.vnet_hdr_size() == 12
    wire.tap.set_offload(TUN_F_CSUM | TUN_F_TSO4)
    wire.tap.set_offload(0)
    dup = os.dup(wire.tap.fileno())
    with Tap.from_fd(dup, vnet_hdr_size=10) as again:
        assert again.name == wire.tap.name
        assert again.vnet_hdr_size() == 10
        assert not os.get_blocking(dup) and not os.get_inheritable(dup)


@needs_root
@pytest.mark.parametrize("indirect", [False, True])
def test_transmit_reaches_the_host_intact(wire: Wire, guest: Guest, indirect: bool) -> None:
    frames = [test_frame(60 + 97 * i, i) for i in range(12)]
    for f in frames:
        guest.send(f, indirect=indirect)
    got = [wire.recv() for _ in frames]
    assert got == frames
    assert len(guest.tx.wait_used(len(frames))) == len(frames)
    assert guest.net.stats.tx_frames == len(frames)


@needs_root
def test_receive_gives_header_and_frame(wire: Wire, guest: Guest) -> None:
    chains = guest.post_rx(count=4)
    sent = [wire.send(os.urandom(40 + 300 * i)) for i in range(4)]
    used = guest.rx.wait_used(4)
    assert [h for h, _ in used] == [c.head for c in chains]
    for (_, n), chain, frame in zip(used, chains, sent, strict=True):
        data = guest.rx.read_writable(chain)[:n]
        flags, gso, _, _, _, _, nbuf = struct.unpack_from("<BBHHHHH", data)
        assert (flags, gso, nbuf) == (0, 0, 1)
        assert data[HDR:] == frame
    assert guest.net.stats.rx_frames == 4


@needs_root
def test_receive_waits_for_buffers_and_loses_nothing(wire: Wire, guest: Guest) -> None:
    sent = [wire.send(bytes([i]) * 64) for i in range(20)]
    time.sleep(0.2)  # the device has no buffer: frames wait in the tap
    assert guest.rx.used_idx() == 0
    chains = guest.post_rx(count=20)
    used = guest.rx.wait_used(20)
    got = [guest.rx.read_writable(c)[HDR:n] for c, (_, n) in zip(chains, used, strict=True)]
    assert got == sent


@needs_root
def test_frame_larger_than_the_buffer_is_dropped_without_mergeable_buffers(wire: Wire) -> None:
    g = Guest(Net(wire.tap, mac=GUEST_MAC), features=1 << Features.VERSION_1)
    try:
        small = g.post_rx(size=HDR + 100)[0]
        wire.send(bytes(500))  # does not fit
        time.sleep(0.2)
        ok = wire.send(b"fits")
        used = g.rx.wait_used(1)
        assert used == [(small.head, HDR + len(ok))]
        assert g.rx.read_writable(small)[HDR : HDR + len(ok)] == ok
        assert g.net.stats.rx_dropped == 1
    finally:
        g.close()


@needs_root
def test_mergeable_buffers_split_a_frame_and_count_them(wire: Wire, guest: Guest) -> None:
    assert guest.net.acked_features >> NetFeatures.MRG_RXBUF & 1
    chains = guest.post_rx(size=HDR + 200, count=2)
    frame = wire.send(os.urandom(986))  # 1000 bytes + 12 header = 6 buffers of 212
    time.sleep(0.2)
    assert guest.rx.used_idx() == 0  # waiting for more buffers, frame kept
    chains += guest.post_rx(size=212, count=6)
    used = guest.rx.wait_used(5)
    assert [h for h, _ in used] == [c.head for c in chains[:5]]
    data = b"".join(guest.rx.read_writable(c)[:n] for c, (_, n) in zip(chains, used, strict=False))
    assert struct.unpack_from("<H", data, 10)[0] == 5
    assert data[HDR:] == frame
    assert sum(n for _, n in used) == HDR + len(frame)


@needs_root
def test_hostile_chains_fail_alone(wire: Wire, guest: Guest) -> None:
    guest.tx.add_request([b"short"], [])  # shorter than the header
    guest.send(
        b"\x01" + bytes(5) + struct.pack("<HH", 5000, 10) + b"\x00\x00",
    )  # bad csum_start
    good = test_frame(80)
    guest.send(good)
    assert wire.recv() == good
    guest.tx.wait_used(3)  # the counters are updated before each chain is completed
    stats = guest.net.stats
    assert stats.tx_bad_chains == 1
    assert stats.tx_errors + stats.tx_frames == 2  # the bad csum frame was refused or sent as is
    # receive: a buffer too small for the header is returned empty, the next one is used
    tiny = guest.rx.add_request([], [4])
    ok = guest.post_rx()[0]
    frame = wire.send(b"after-tiny")
    used = guest.rx.wait_used(2)
    assert used == [(tiny.head, 0), (ok.head, HDR + len(frame))]
    assert stats.rx_bad_chains == 1


class RecordingTap(Tap):
    def __init__(self, fd: int, name: str) -> None:
        super().__init__(fd, name)
        self.offloads: list[int] = []

    def set_offload(self, flags: int) -> None:
        self.offloads.append(flags)
        super().set_offload(flags)


@needs_root
def test_offloads_are_set_on_the_tap_for_acked_guest_features(wire: Wire) -> None:
    feats = (1 << Features.VERSION_1 | 1 << NetFeatures.GUEST_CSUM | 1 << NetFeatures.GUEST_TSO4
             | 1 << NetFeatures.GUEST_TSO6 | 1 << NetFeatures.MRG_RXBUF)  # fmt: skip
    tap = RecordingTap(os.dup(wire.tap.fileno()), wire.tap.name)
    g = Guest(Net(tap), features=feats)
    try:
        assert tap.offloads == [TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6]
        chain = g.post_rx()[0]
        frame = wire.send(b"x" * 100)
        ((_, n),) = g.rx.wait_used(1)
        assert g.rx.read_writable(chain)[HDR:n] == frame
    finally:
        g.close()
    assert tap.closed


@needs_root
def test_reset_and_reactivate(wire: Wire) -> None:
    net = Net(wire.tap, mac=GUEST_MAC)
    first = Guest(net)
    first.send(test_frame(70, 1))
    assert wire.recv() == test_frame(70, 1)
    assert net.reset()
    first.close(close_net=False)
    assert not wire.tap.closed
    second = Guest(net)
    try:
        second.send(test_frame(70, 2))
        assert wire.recv() == test_frame(70, 2)
        chain = second.post_rx()[0]
        frame = wire.send(b"again")
        ((_, n),) = second.rx.wait_used(1)
        assert second.rx.read_writable(chain)[HDR:n] == frame
    finally:
        second.close()
    assert wire.tap.closed


def _tcp4_frame(payload: bytes) -> bytes:
    """Ethernet + IPv4 + TCP (ports 7->9, ACK|PSH) around ``payload``; TCP checksum left 0."""
    ip_len = 20 + 20 + len(payload)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, ip_len, 1, 0, 64, 6, 0,
                     bytes([10, 9, 9, 2]), bytes([10, 9, 9, 1]))  # fmt: skip
    csum = sum(struct.unpack(">10H", ip))
    csum = (csum & 0xFFFF) + (csum >> 16)
    ip = ip[:10] + struct.pack(">H", ~csum & 0xFFFF) + ip[12:]
    tcp = struct.pack(">HHIIBBHHH", 7, 9, 1, 1, 5 << 4, 0x18, 65535, 0, 0)
    return HOST_MAC + GUEST_MAC + b"\x08\x00" + ip + tcp + payload


@needs_root
def test_transmit_tso_super_frame_is_accepted_by_the_tap() -> None:
    """HOST_TSO4: a 3000-byte TCP payload with gso_size 1000 and a partial checksum passes
    the kernel's header checks; a GSO header with gso_size 0 is refused for that frame only."""
    w = open_wire(proto=0x0800)
    g = Guest(Net(w.tap, mac=GUEST_MAC))
    try:
        acked = g.net.acked_features
        assert acked >> NetFeatures.HOST_TSO4 & 1 and acked >> NetFeatures.CSUM & 1
        payload = os.urandom(3000)
        frame = _tcp4_frame(payload)
        # flags NEEDS_CSUM, gso TCPV4, hdr_len 54, gso_size 1000, csum_start 34, csum_offset 16
        hdr = struct.pack("<BBHHHHH", 1, 1, 54, 1000, 34, 16, 0)
        bad = struct.pack("<BBHHHHH", 1, 1, 54, 0, 34, 16, 0)
        g.send(frame, header=bad)
        g.send(frame, header=hdr)
        g.tx.wait_used(2)
        assert g.net.stats.tx_errors == 1 and g.net.stats.tx_frames == 1
        w.host.settimeout(5)
        got = w.host.recv(70000)
        assert len(got) == len(frame) and got[54:] == payload
    finally:
        g.close()
        w.host.close()


@needs_root
def test_receive_tso_super_frame_into_mergeable_buffers() -> None:
    """GUEST_TSO4 + MRG_RXBUF: the host hands the tap one 3054-byte GSO frame (a packet
    socket with PACKET_VNET_HDR); it reaches the guest unsegmented, spread over 1526-byte
    buffers with its GSO header intact and num_buffers = 3."""
    w = open_wire(proto=0x0800)
    w.host.setsockopt(263, 15, 1)  # SOL_PACKET, PACKET_VNET_HDR
    g = Guest(Net(w.tap, mac=GUEST_MAC))
    try:
        assert g.net.tap_offloads() & TUN_F_TSO4
        chains = g.post_rx(size=1526, count=4)
        payload = os.urandom(3000)
        frame = GUEST_MAC + HOST_MAC + _tcp4_frame(payload)[12:]  # host -> guest
        w.host.send(struct.pack("<BBHHHH", 1, 1, 54, 1000, 34, 16) + frame)
        used = g.rx.wait_used(3)
        assert [h for h, _ in used] == [c.head for c in chains[:3]]
        data = b"".join(g.rx.read_writable(c)[:n] for c, (_, n) in zip(chains, used, strict=False))
        flags, gso_type, _, gso_size, _, _, nbuf = struct.unpack_from("<BBHHHHH", data)
        assert (gso_type, gso_size, nbuf) == (1, 1000, 3)
        assert flags & 1  # NEEDS_CSUM: the checksum is the guest's to finish (GUEST_CSUM)
        assert data[HDR:] == frame
    finally:
        g.close()
        w.host.close()


def test_max_frame_bytes_covers_a_gso_super_frame() -> None:
    assert MAX_FRAME_BYTES >= 65535 + 14


# --- batches: the single-descriptor fast path next to every other chain shape ---------------


@needs_root
def test_transmit_batch_of_every_chain_shape_keeps_order(wire: Wire, guest: Guest) -> None:
    """One descriptor (read straight off the ring), header and frame apart, indirect, and a
    chain too short for a header (refused alone), all in one batch: frames leave in ring
    order and every chain is completed in that order."""
    drv = guest.tx
    sent: list[bytes] = []
    heads: list[int] = []
    for i in range(120):
        frame = test_frame(60 + 7 * i, i)
        shape = i % 4
        if shape == 0:
            chain = drv.add_request([bytes(HDR) + frame])
        elif shape == 1:
            chain = drv.add_request([bytes(HDR), frame])
        elif shape == 2:
            chain = drv.add_request([bytes(HDR) + frame], indirect=True)
        else:
            chain = drv.add_request([b"short"])
        heads.append(chain.head)
        if shape != 3:
            sent.append(frame)
    drv.kick(guest.kicks[1])
    got = [wire.recv() for _ in sent]
    assert got == sent
    used = drv.wait_used(len(heads))
    assert used == [(h, 0) for h in heads]
    stats = guest.net.stats
    assert (stats.tx_frames, stats.tx_bad_chains, stats.tx_errors) == (90, 30, 0)
    assert stats.tx_bytes == sum(len(f) for f in sent)


@needs_root
def test_transmit_hostile_single_descriptors_fail_alone(wire: Wire, guest: Guest) -> None:
    """Chains of the fast path's shape that break a rule (outside RAM, address overflow, head
    past the ring) are left to Queue.pop's checks: completed or skipped, never sent."""
    drv = guest.tx
    mem_size = guest.mem.size
    for head, addr in ((200, mem_size - 8), (201, 2**64 - 16)):
        drv.write_descriptor(head, addr, 100, 0, 0)
        drv._free.remove(head)
        drv.publish(head)
    drv.publish(4000)  # a head index past the 256-entry table
    good = test_frame(90, 3)
    drv.add_request([bytes(HDR) + good])
    drv.kick(guest.kicks[1])
    assert wire.recv() == good
    used = drv.wait_used(3)
    assert used[:2] == [(200, 0), (201, 0)]
    assert guest.queues[1].invalid_chains == 3
    assert guest.net.stats.tx_frames == 1


@needs_root
def test_receive_batch_into_every_buffer_shape(wire: Wire, guest: Guest) -> None:
    """Single writable descriptors (the fast path), split and indirect buffers, a buffer with
    no writable part and one smaller than the header: frames fill the usable buffers in ring
    order, the unusable ones come back empty."""
    drv = guest.rx
    plan = []
    for i in range(40):
        shape = i % 5
        if shape == 0:
            plan.append((drv.add_request([], [2048]), True))
        elif shape == 1:
            plan.append((drv.add_request([], [HDR, 2036]), True))
        elif shape == 2:
            plan.append((drv.add_request([], [2048], indirect=True), True))
        elif shape == 3:
            plan.append((drv.add_request([b"readable only"], []), False))
        else:
            plan.append((drv.add_request([], [4]), False))
    drv.kick(guest.kicks[0])
    usable = [c for c, ok in plan if ok]
    sent = [wire.send(os.urandom(50 + 31 * i)) for i in range(len(usable))]
    used = dict(drv.wait_used(len(plan)))
    for chain, ok in plan:
        if not ok:
            assert used[chain.head] == 0
    for chain, frame in zip(usable, sent, strict=True):
        n = used[chain.head]
        data = drv.read_writable(chain)[:n]
        flags, _, _, _, _, _, nbuf = struct.unpack_from("<BBHHHHH", data)
        assert (flags, nbuf) == (0, 1)
        assert data[HDR:] == frame
    stats = guest.net.stats
    assert (stats.rx_frames, stats.rx_bad_chains) == (len(usable), 16)


@needs_root
def test_receive_buffers_outside_ram_fail_alone(wire: Wire, guest: Guest) -> None:
    drv = guest.rx
    drv.write_descriptor(250, guest.mem.size - 100, 2048, 2, 0)  # WRITE, runs off the end
    drv._free.remove(250)
    drv.publish(250)
    ok = drv.add_request([], [2048])
    drv.kick(guest.kicks[0])
    frame = wire.send(b"after the bad buffer")
    used = drv.wait_used(2)
    assert used == [(250, 0), (ok.head, HDR + len(frame))]
    assert drv.read_writable(ok)[HDR : HDR + len(frame)] == frame
    assert guest.queues[0].invalid_chains == 1


@needs_root
def test_stream_of_frames_both_ways_through_batches(wire: Wire, guest: Guest) -> None:
    """More frames than a ring holds, each way: nothing lost, duplicated or reordered."""
    wire.host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    total = 700
    drv = guest.tx
    sent: list[bytes] = []
    received: list[bytes] = []
    for i in range(total):
        while len(drv._free) == 0:
            drv.reclaim()
            time.sleep(0.001)
        frame = test_frame(200, i) + struct.pack("<I", i)
        drv.add_request([bytes(HDR) + frame])
        sent.append(frame)
        if i % 50 == 49:
            drv.kick(guest.kicks[1])
            received += [wire.recv() for _ in range(50)]
    drv.kick(guest.kicks[1])
    assert received == sent
    rx = guest.rx
    frames = []
    got: list[bytes] = []
    for start in range(0, total, 100):
        chains = [rx.add_request([], [2048]) for _ in range(100)]
        rx.kick(guest.kicks[0])
        frames += [wire.send(struct.pack("<I", i) * 40) for i in range(start, start + 100)]
        used = rx.wait_used(100)
        assert [h for h, _ in used] == [c.head for c in chains]
        got += [rx.read_writable(c)[HDR:n] for c, (_, n) in zip(chains, used, strict=True)]
    assert got == frames
