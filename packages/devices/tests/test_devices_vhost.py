"""The vhost devices against a fake kernel backend (this host has no /dev/vhost-*).

The fake records every vhost call and, like the kernel, serves a ring only through the host
addresses it was handed: it reads the available ring and writes the used ring through
``/proc/self/mem`` at those addresses and signals the call eventfd. So a wrong translation,
order or eventfd shows up as a guest request that never completes, not just as a mismatch in a
recorded list.
"""

from __future__ import annotations

import errno
import os
import select
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from devices.testing import VirtQueueDriver, make_guest_memory
from devices.virtio import Features, Interrupt, InvalidQueue, IsrBits, Queue
from devices.virtio.net import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, NetFeatures, TapError
from devices.virtio.vhost import (
    NET_KERNEL_FEATURES,
    VIRTIO_VSOCK_F_SEQPACKET,
    VhostDeviceError,
    VhostNet,
    VhostVsock,
    ring_host_addresses,
)
from sys_util import EventFd, GuestMemory, PollContext, VhostError

VERSION_1 = 1 << Features.VERSION_1
EVENT_IDX = 1 << Features.RING_EVENT_IDX
INDIRECT = 1 << Features.RING_INDIRECT_DESC
MRG = 1 << NetFeatures.MRG_RXBUF
VHOST_F_LOG_ALL = 1 << 26
VHOST_NET_F_VIRTIO_NET_HDR = 1 << 27
ACCESS_PLATFORM = 1 << 33
NOTIFY_ON_EMPTY = 1 << 24
#: What 6.1's vhost-net reports (VHOST_NET_FEATURES).
KERNEL_NET = (
    NOTIFY_ON_EMPTY | INDIRECT | EVENT_IDX | VHOST_F_LOG_ALL | 1 << 27 | VERSION_1
    | VHOST_NET_F_VIRTIO_NET_HDR | MRG | ACCESS_PLATFORM
)  # fmt: skip
#: What 6.1's vhost-vsock reports (VHOST_VSOCK_FEATURES).
KERNEL_VSOCK = (
    NOTIFY_ON_EMPTY | INDIRECT | EVENT_IDX | VHOST_F_LOG_ALL | VERSION_1 | ACCESS_PLATFORM
    | 1 << VIRTIO_VSOCK_F_SEQPACKET
)  # fmt: skip
_USED_ELEM = struct.Struct("<II")


def _fd(x: Any) -> int:
    if x is None:
        return -1
    return x if isinstance(x, int) else x.fileno()


class FakeKernel:
    """A vhost backend in Python: records calls, and serves rings through host addresses."""

    def __init__(self, features: int) -> None:
        self.features = features
        self.calls: list[tuple[Any, ...]] = []
        self.owner: int | None = None
        self.fail: dict[str, OSError] = {}
        self.bases: dict[int, int] = {}
        self.rings: dict[int, dict[str, Any]] = {}
        self._fd_holder = EventFd()
        self.closed = False
        self._mem = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
        self._threads: dict[int, tuple[threading.Thread, EventFd]] = {}

    def _rec(self, *call: Any) -> None:
        if call[0] in self.fail:
            raise self.fail[call[0]]
        self.calls.append(call)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    # -- the VhostBackend protocol ---------------------------------------------------------
    def fileno(self) -> int:
        return self._fd_holder.fileno()

    def close(self) -> None:
        for i in list(self._threads):
            self._stop(i)
        if not self.closed:
            self.closed = True
            self._fd_holder.close()
            os.close(self._mem)

    def get_features(self) -> int:
        self._rec("get_features")
        return self.features

    def set_owner(self) -> None:
        self._rec("set_owner")
        if self.owner is not None:
            raise VhostError("VHOST_SET_OWNER", errno.EBUSY)
        self.owner = os.getpid()

    def set_features(self, features: int) -> None:
        self._rec("set_features", features)
        if features & ~self.features:
            raise VhostError("VHOST_SET_FEATURES", errno.EOPNOTSUPP)

    def set_mem_table(self, regions: Any) -> None:
        self._rec("set_mem_table", [tuple(r) for r in regions])

    def set_vring_num(self, index: int, num: int) -> None:
        self._rec("set_vring_num", index, num)
        self.rings.setdefault(index, {})["num"] = num

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, log: int = 0,
                       flags: int = 0) -> None:  # fmt: skip
        self._rec("set_vring_addr", index, desc, used, avail)
        self.rings.setdefault(index, {}).update(desc=desc, used=used, avail=avail)

    def set_vring_base(self, index: int, num: int) -> None:
        self._rec("set_vring_base", index, num)
        self.rings.setdefault(index, {})["last_avail"] = num

    def get_vring_base(self, index: int) -> int:
        self._rec("get_vring_base", index)
        return int(self.rings.get(index, {}).get("last_avail", 0))

    def set_vring_kick(self, index: int, fd: Any) -> None:
        self._rec("set_vring_kick", index, _fd(fd))
        self.rings.setdefault(index, {})["kick"] = _fd(fd)

    def set_vring_call(self, index: int, fd: Any) -> None:
        self._rec("set_vring_call", index, _fd(fd))
        self.rings.setdefault(index, {})["call"] = _fd(fd)

    def set_vring_err(self, index: int, fd: Any) -> None:
        self._rec("set_vring_err", index, _fd(fd))
        self.rings.setdefault(index, {})["err"] = _fd(fd)

    # vhost-net
    def set_backend(self, index: int, fd: Any) -> None:
        self._rec("set_backend", index, _fd(fd))
        if fd is None or _fd(fd) < 0:
            self._stop(index)
        else:
            self._start(index)

    # vhost-vsock
    def set_guest_cid(self, cid: int) -> None:
        self._rec("set_guest_cid", cid)

    def set_running(self, running: bool) -> None:
        self._rec("set_running", running)
        for i in (0, 1):
            self._start(i) if running else self._stop(i)

    # -- serving a ring the way the kernel would ---------------------------------------------
    def _start(self, index: int) -> None:
        stop = EventFd()
        t = threading.Thread(target=self._serve, args=(index, stop), daemon=True)
        self._threads[index] = (t, stop)
        t.start()

    def _stop(self, index: int) -> None:
        entry = self._threads.pop(index, None)
        if entry is not None:
            entry[1].write(1)
            entry[0].join()
            entry[1].close()

    def _serve(self, index: int, stop: EventFd) -> None:
        ring = self.rings[index]
        num, kick, call = ring["num"], ring["kick"], ring["call"]
        with PollContext[int]() as poll:
            poll.add(stop, 0)
            poll.add(kick, 1)
            while True:
                tokens = [t for t, _ in poll.wait()]
                if 0 in tokens:
                    return
                os.read(kick, 8)
                avail_idx = int.from_bytes(os.pread(self._mem, 2, ring["avail"] + 2), "little")
                used_idx = int.from_bytes(os.pread(self._mem, 2, ring["used"] + 2), "little")
                while ring["last_avail"] != avail_idx:
                    slot = ring["last_avail"] % num
                    head = int.from_bytes(
                        os.pread(self._mem, 2, ring["avail"] + 4 + 2 * slot), "little"
                    )
                    desc_len = int.from_bytes(
                        os.pread(self._mem, 4, ring["desc"] + 16 * head + 8), "little"
                    )
                    elem = _USED_ELEM.pack(head, desc_len)
                    os.pwrite(self._mem, elem, ring["used"] + 4 + 8 * (used_idx % num))
                    used_idx = (used_idx + 1) & 0xFFFF
                    ring["last_avail"] = (ring["last_avail"] + 1) & 0xFFFF
                os.pwrite(self._mem, used_idx.to_bytes(2, "little"), ring["used"] + 2)
                os.write(call, (1).to_bytes(8, "little"))


class FakeTap:
    def __init__(self, offloads_ok: bool = True) -> None:
        self.name = "faketap0"
        self.offloads_ok = offloads_ok
        self.hdr_sizes: list[int] = []
        self.offloads: list[int] = []
        self._holder = EventFd()

    def fileno(self) -> int:
        return self._holder.fileno()

    def close(self) -> None:
        self._holder.close()

    @property
    def closed(self) -> bool:
        return self._holder.closed

    def set_vnet_hdr_size(self, size: int) -> None:
        self.hdr_sizes.append(size)

    def set_offload(self, flags: int) -> None:
        if not self.offloads_ok and flags:
            raise TapError("TUNSETOFFLOAD", errno.EINVAL, "Invalid argument", self.name)
        self.offloads.append(flags)


class Rig:
    """Guest memory, two or three driver-side rings, kick eventfds and an INTx interrupt."""

    def __init__(self, mem: GuestMemory, bases: list[int], size: int = 256) -> None:
        self.mem = mem
        self.drivers = [
            VirtQueueDriver(mem, b, size, data_base=b + 0x8000, data_size=0x8000) for b in bases
        ]
        self.kicks = [EventFd() for _ in bases]
        self.irq = EventFd(nonblocking=True)
        self.interrupt = Interrupt(intx_evt=self.irq)

    def queues(self, features: int) -> list[Queue]:
        return [d.make_queue(features=features) for d in self.drivers]

    def close(self) -> None:
        for e in (*self.kicks, self.irq):
            e.close()


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with make_guest_memory(1 << 20) as m:
        yield m


@pytest.fixture
def rig(mem: GuestMemory) -> Iterator[Rig]:
    r = Rig(mem, [0x10000, 0x30000, 0x50000])
    yield r
    r.close()


def _net(kernel: FakeKernel | None = None, tap: FakeTap | None = None, **kw: Any) -> VhostNet:
    return VhostNet(
        kernel or FakeKernel(KERNEL_NET),  # type: ignore[arg-type]
        tap or FakeTap(),
        mac=bytes.fromhex("020000000001"),
        **kw,
    )


def _proc_mem_read(addr: int, length: int) -> bytes:
    fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, length, addr)
    finally:
        os.close(fd)


# -- features -------------------------------------------------------------------------------------


def test_net_offers_kernel_ring_bits_and_tap_offloads_only() -> None:
    with _net() as net:
        offered = net.features()
        for bit in (VERSION_1, EVENT_IDX, INDIRECT, MRG):
            assert offered & bit
        for feature in (NetFeatures.CSUM, NetFeatures.GUEST_CSUM, NetFeatures.GUEST_TSO4,
                        NetFeatures.HOST_TSO6, NetFeatures.MAC, NetFeatures.STATUS):  # fmt: skip
            assert offered >> feature & 1, feature
        # Kernel-private and unsupported bits are never offered to the guest.
        for bit in (VHOST_F_LOG_ALL, VHOST_NET_F_VIRTIO_NET_HDR, ACCESS_PLATFORM, NOTIFY_ON_EMPTY):
            assert not offered & bit
        assert not offered >> NetFeatures.CTRL_VQ & 1


def test_net_drops_what_the_kernel_or_tap_lacks() -> None:
    with _net(FakeKernel(KERNEL_NET & ~EVENT_IDX & ~MRG), FakeTap(offloads_ok=False)) as net:
        offered = net.features()
        assert not offered & (EVENT_IDX | MRG)
        assert not offered >> NetFeatures.GUEST_CSUM & 1
        assert not offered >> NetFeatures.HOST_TSO4 & 1
        assert offered & VERSION_1 and offered >> NetFeatures.STATUS & 1


def test_kernel_without_version_1_is_refused() -> None:
    kernel, tap = FakeKernel(KERNEL_NET & ~VERSION_1), FakeTap()
    with pytest.raises(VhostDeviceError, match="VERSION_1"):
        _net(kernel, tap)
    kernel.close()
    tap.close()


def test_net_ack_drops_features_without_their_dependency() -> None:
    with _net() as net:
        net.ack_features(VERSION_1 | 1 << NetFeatures.GUEST_TSO4 | 1 << NetFeatures.HOST_TSO4)
        assert net.acked_features == VERSION_1


def test_net_config_space_matches_userspace_net() -> None:
    with _net() as net:
        assert net.config_space() == bytes.fromhex("020000000001") + struct.pack("<HH", 1, 1)
        assert net.device_type == 1 and list(net.queue_max_sizes) == [256, 256]


# -- activation -----------------------------------------------------------------------------------


def test_net_activation_hands_the_rings_over_in_order(rig: Rig) -> None:
    kernel, tap = FakeKernel(KERNEL_NET), FakeTap()
    with _net(kernel, tap) as net:
        net.ack_features(net.features())
        acked = net.acked_features
        assert acked >> NetFeatures.GUEST_CSUM & 1
        queues = rig.queues(acked)[:2]
        kernel.calls.clear()
        net.activate(rig.mem, rig.interrupt, queues, rig.kicks[:2])
        calls = kernel.calls
        assert calls[0] == ("set_owner",)
        # Only the bits the kernel implements: no offload/MAC/STATUS bits.
        assert calls[1] == ("set_features", acked & NET_KERNEL_FEATURES)
        assert calls[1][1] == VERSION_1 | EVENT_IDX | INDIRECT | MRG
        assert calls[2] == ("set_mem_table", rig.mem.host_regions())
        per_ring = [c[0] for c in calls[3:15]]
        assert per_ring == [
            "set_vring_num", "set_vring_base", "set_vring_addr", "set_vring_kick",
            "set_vring_call", "set_vring_err",
        ] * 2  # fmt: skip
        assert [c[0] for c in calls[15:]] == ["set_backend", "set_backend"]
        assert calls[15][1:] == (0, tap.fileno()) and calls[16][1:] == (1, tap.fileno())
        for i, d in enumerate(rig.drivers[:2]):
            assert kernel.rings[i]["num"] == 256
            assert kernel.rings[i]["last_avail"] == 0
            assert kernel.rings[i]["kick"] == rig.kicks[i].fileno()
            # The addresses really are the guest's rings in this process's memory.
            for name, guest, length in (("desc", d.desc_table, 4096), ("avail", d.avail_ring, 518),
                                        ("used", d.used_ring, 2054)):  # fmt: skip
                rig.mem.write(guest, os.urandom(length))
                assert _proc_mem_read(kernel.rings[i][name], length) == rig.mem.read(guest, length)
        assert tap.hdr_sizes[-1] == 12
        assert tap.offloads[-1] == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | 0x08
        assert net.active


def test_requests_complete_and_interrupt_through_the_handed_over_rings(rig: Rig) -> None:
    kernel = FakeKernel(KERNEL_NET)
    with _net(kernel) as net:
        net.ack_features(net.features())
        queues = rig.queues(net.acked_features)[:2]
        net.activate(rig.mem, rig.interrupt, queues, rig.kicks[:2])
        tx = rig.drivers[1]
        chains = [tx.add_request([b"x" * 60]) for _ in range(3)]
        tx.kick(rig.kicks[1])
        used = tx.wait_used(3)
        assert [h for h, _ in used] == [c.head for c in chains]
        deadline = time.monotonic() + 5
        while not rig.interrupt.isr & IsrBits.QUEUE:
            assert time.monotonic() < deadline, "call eventfd never became an interrupt"
            time.sleep(0.001)
        assert rig.irq.read() >= 1
        assert net.interrupts >= 1
        net.reset()
        assert net.vring_bases == [0, 3]


def test_call_raises_the_queues_msix_vector(rig: Rig) -> None:
    class Recorder:
        resample_event = None

        def __init__(self) -> None:
            self.vectors: list[int] = []

        def signal_used_queue(self, vector: int) -> None:
            self.vectors.append(vector)

    kernel = FakeKernel(KERNEL_NET)
    with _net(kernel) as net:
        net.ack_features(net.features())
        queues = rig.queues(net.acked_features)[:2]
        queues[0].vector, queues[1].vector = 3, 7
        rec = Recorder()
        net.activate(rig.mem, rec, queues, rig.kicks[:2])  # type: ignore[arg-type]
        os.write(kernel.rings[1]["call"], (1).to_bytes(8, "little"))
        os.write(kernel.rings[0]["call"], (1).to_bytes(8, "little"))
        deadline = time.monotonic() + 5
        while len(rec.vectors) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert sorted(rec.vectors) == [3, 7]


def test_kernel_ring_errors_are_counted_not_fatal(rig: Rig) -> None:
    kernel = FakeKernel(KERNEL_NET)
    with _net(kernel) as net:
        net.ack_features(net.features())
        net.activate(rig.mem, rig.interrupt, rig.queues(net.acked_features)[:2], rig.kicks[:2])
        os.write(kernel.rings[0]["err"], (2).to_bytes(8, "little"))
        deadline = time.monotonic() + 5
        while net.ring_errors < 2:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert net.active


@pytest.mark.parametrize(
    ("ring", "value", "message"),
    [
        ("desc_table", (1 << 20) - 16, "queue 1: descriptor table"),  # runs off the end of RAM
        ("desc_table", 0x30008, "queue 1: descriptor table at 0x30008 is not 16-byte aligned"),
        ("used_ring", 0xFFFF_FFFF_FFFF_FFF0, "queue 1: used ring"),
        ("used_ring", 0x30002, "not 4-byte aligned"),
        ("avail_ring", (1 << 20) + 0x1000, "queue 1: available ring"),
    ],
)
def test_bad_ring_address_is_a_clear_error_before_any_kernel_call(
    rig: Rig, ring: str, value: int, message: str
) -> None:
    kernel = FakeKernel(KERNEL_NET)
    with _net(kernel) as net:
        net.ack_features(net.features())
        q0 = rig.drivers[0].make_queue(features=net.acked_features)
        q1 = rig.drivers[1].configure(Queue(256))  # not validated by a transport
        setattr(q1, ring, value)
        kernel.calls.clear()
        with pytest.raises(InvalidQueue, match=message):
            net.activate(rig.mem, rig.interrupt, [q0, q1], rig.kicks[:2])
        assert kernel.calls == []
        assert not net.active
        # The device is still usable once the driver fixes its ring.
        net.activate(rig.mem, rig.interrupt, rig.queues(net.acked_features)[:2], rig.kicks[:2])
        assert net.active


def test_ring_straddling_two_regions_is_refused() -> None:
    page = 0x1000
    with GuestMemory([(0, 16 * page), (16 * page, 16 * page)]) as mem:
        q = Queue(256)
        q.size, q.ready = 256, True
        q.desc_table, q.avail_ring, q.used_ring = 15 * page + 0x800, 0x2000, 0x3000
        with pytest.raises(InvalidQueue, match="not inside one guest RAM region"):
            ring_host_addresses(mem, 0, q)
        q.desc_table = 17 * page
        desc, _, _ = ring_host_addresses(mem, 0, q)
        assert desc == mem.host_regions()[1][2] + page


def test_rings_in_a_high_region_translate_to_its_mapping() -> None:
    with GuestMemory([(0, 0x10000), (0x1_0000_0000, 0x40000)]) as mem:
        rig = Rig(mem, [0x1_0000_0000, 0x1_0002_0000])
        kernel = FakeKernel(KERNEL_NET)
        try:
            with _net(kernel) as net:
                net.ack_features(net.features())
                net.activate(mem, rig.interrupt, rig.queues(net.acked_features), rig.kicks)
                high = mem.host_regions()[1][2]
                assert kernel.rings[0]["desc"] == high
                assert kernel.rings[1]["avail"] == high + 0x20000 + 16 * 256
                assert ("set_mem_table", mem.host_regions()) in kernel.calls
        finally:
            rig.close()


def test_activation_failure_releases_everything_and_can_be_retried(rig: Rig) -> None:
    kernel = FakeKernel(KERNEL_NET)
    with _net(kernel) as net:
        net.ack_features(net.features())
        kernel.fail["set_mem_table"] = VhostError("VHOST_SET_MEM_TABLE", errno.EFAULT)
        with pytest.raises(VhostDeviceError, match="VHOST_SET_MEM_TABLE failed"):
            net.activate(rig.mem, rig.interrupt, rig.queues(net.acked_features)[:2], rig.kicks[:2])
        assert not net.active and net.queues == []
        del kernel.fail["set_mem_table"]
        kernel.calls.clear()
        net.activate(rig.mem, rig.interrupt, rig.queues(net.acked_features)[:2], rig.kicks[:2])
        assert "set_owner" not in kernel.names()  # still the owner: no EBUSY
        assert net.active


def test_reset_detaches_reads_bases_unbinds_and_reactivates(rig: Rig) -> None:
    kernel = FakeKernel(KERNEL_NET)
    with _net(kernel) as net:
        net.ack_features(net.features())
        net.activate(rig.mem, rig.interrupt, rig.queues(net.acked_features)[:2], rig.kicks[:2])
        kernel.rings[0]["last_avail"], kernel.rings[1]["last_avail"] = 17, 42
        calls_before = len(kernel.calls)
        assert net.reset() is True
        after = kernel.calls[calls_before:]
        assert after[:2] == [("set_backend", 0, -1), ("set_backend", 1, -1)]
        assert ("get_vring_base", 0) in after and ("get_vring_base", 1) in after
        for i in (0, 1):
            for name in ("set_vring_kick", "set_vring_call", "set_vring_err"):
                assert (name, i, -1) in after
        assert net.vring_bases == [17, 42]
        assert not net.active
        net.activate(rig.mem, rig.interrupt, rig.queues(net.acked_features)[:2], rig.kicks[:2])
        assert kernel.names().count("set_owner") == 1
        assert net.active


def test_close_closes_vhost_and_tap_and_keep_fds(rig: Rig) -> None:
    kernel, tap = FakeKernel(KERNEL_NET), FakeTap()
    net = _net(kernel, tap)
    assert net.keep_fds() == [kernel.fileno(), tap.fileno()]
    net.ack_features(net.features())
    net.activate(rig.mem, rig.interrupt, rig.queues(net.acked_features)[:2], rig.kicks[:2])
    net.close()
    net.close()
    assert kernel.closed and tap.closed and not net.active


# -- vhost-vsock ----------------------------------------------------------------------------------


def test_vsock_claims_the_cid_at_creation_and_offers_kernel_bits() -> None:
    kernel = FakeKernel(KERNEL_VSOCK)
    with VhostVsock(kernel, 42) as dev:  # type: ignore[arg-type]
        assert ("set_guest_cid", 42) in kernel.calls
        assert dev.config_space() == struct.pack("<Q", 42)
        assert dev.device_type == 19 and list(dev.queue_max_sizes) == [256, 256, 64]
        offered = dev.features()
        assert offered == VERSION_1 | EVENT_IDX | INDIRECT | 1 << VIRTIO_VSOCK_F_SEQPACKET
    busy = FakeKernel(KERNEL_VSOCK)
    busy.fail["set_guest_cid"] = VhostError("VHOST_VSOCK_SET_GUEST_CID", errno.EADDRINUSE)
    with pytest.raises(VhostDeviceError, match="cannot claim guest CID 42"):
        VhostVsock(busy, 42)  # type: ignore[arg-type]
    busy.close()
    unused = FakeKernel(KERNEL_VSOCK)
    with pytest.raises(VhostDeviceError, match="reserved"):
        VhostVsock(unused, 2)  # type: ignore[arg-type]
    assert unused.calls == []
    unused.close()


def test_vsock_hands_rx_tx_to_the_kernel_and_keeps_the_event_queue(rig: Rig) -> None:
    kernel = FakeKernel(KERNEL_VSOCK)
    with VhostVsock(kernel, 42) as dev:  # type: ignore[arg-type]
        dev.ack_features(dev.features())
        queues = rig.queues(dev.acked_features)
        kernel.calls.clear()
        dev.activate(rig.mem, rig.interrupt, queues, rig.kicks)
        assert kernel.calls[-1] == ("set_running", True)
        assert sorted(kernel.rings) == [0, 1]  # the event queue never reaches the kernel
        # A tx request goes through the kernel; the event queue's kick is drained here.
        tx = rig.drivers[1]
        chain = tx.add_request([bytes(44)])
        tx.kick(rig.kicks[1])
        assert tx.wait_used(1) == [(chain.head, 44)]
        dev.reset()
        assert ("set_running", False) in kernel.calls
        assert dev.vring_bases == [0, 1]


def test_vsock_event_queue_kicks_are_consumed_in_userspace(rig: Rig) -> None:
    kernel = FakeKernel(KERNEL_VSOCK)
    evq_kick = EventFd(nonblocking=True)
    try:
        with VhostVsock(kernel, 42) as dev:  # type: ignore[arg-type]
            dev.ack_features(dev.features())
            queues = rig.queues(dev.acked_features)
            dev.activate(rig.mem, rig.interrupt, queues, [*rig.kicks[:2], evq_kick])
            evq_kick.write(1)
            deadline = time.monotonic() + 5
            while select.select([evq_kick], [], [], 0)[0]:  # readable until the worker reads it
                assert time.monotonic() < deadline, "event queue kick never consumed"
                time.sleep(0.005)
            assert dev.active
    finally:
        evq_kick.close()


def test_tap_offloads_are_probed_then_cleared_until_the_guest_negotiates() -> None:
    tap = FakeTap()
    with _net(tap=tap) as net:
        assert tap.offloads == [TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | 0x08, 0]
        assert net.tap_offloads_supported


def test_half_started_backend_is_detached_on_failure(rig: Rig) -> None:
    class SecondRingFails(FakeKernel):
        def set_backend(self, index: int, fd: Any) -> None:
            if index == 1 and _fd(fd) >= 0:
                raise VhostError("VHOST_NET_SET_BACKEND", errno.EBADFD)
            super().set_backend(index, fd)

    kernel = SecondRingFails(KERNEL_NET)
    with _net(kernel) as net:
        net.ack_features(net.features())
        with pytest.raises(VhostDeviceError, match="VHOST_NET_SET_BACKEND failed"):
            net.activate(rig.mem, rig.interrupt, rig.queues(net.acked_features)[:2], rig.kicks[:2])
        assert ("set_backend", 0, -1) in kernel.calls  # ring 0 had started: detached again
        assert not kernel._threads
        assert not net.active
