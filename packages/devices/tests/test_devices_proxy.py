"""Sandboxed devices: a jailed device process serves the bus through ProxyDevice."""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devices.irq import IoEvent, IrqRouter
from devices.pci import MSIX_CAP_ID, BarAllocator, PciBar
from devices.proxy import (
    AllocateGsi,
    ChildMonitor,
    DeviceDeath,
    IrqErr,
    IrqGsi,
    IrqOk,
    IrqRequest,
    IrqResponse,
    IrqRouterServer,
    ProxyDevice,
    RegisterIrqfd,
    Sandbox,
    SetMsiRoute,
    policy_dir,
)
from devices.testing import FakeIrqRouter, VirtQueueDriver, make_guest_memory
from devices.virtio import Block, Console, DeviceStatus, Rng, VirtioPciDevice
from devices.virtio.block import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from io_jail import NotSingleThreaded, Policy
from msg_socket import MsgSocket
from sys_util import EventFd, GuestMemory

S = DeviceStatus
HDR = struct.Struct("<IIQ")
BAR = 0xE000_0000


@dataclass(frozen=True)
class Ctx:
    memory: GuestMemory
    irq_router: IrqRouter


class Driver:
    """Just enough of a virtio-pci driver, through the proxy's config and BAR accesses."""

    def __init__(self, dev: ProxyDevice) -> None:
        self.dev = dev

    def common(self, off: int, size: int) -> int:
        return int.from_bytes(self.dev.read(off, size), "little")

    def set_common(self, off: int, size: int, value: int) -> None:
        self.dev.write(off, value.to_bytes(size, "little"))

    def negotiate(self) -> bool:
        self.set_common(20, 1, 0)
        self.set_common(20, 1, S.ACKNOWLEDGE | S.DRIVER)
        feats = []
        for sel in (0, 1):
            self.set_common(0, 4, sel)
            feats.append(self.common(4, 4))
        for sel in (0, 1):
            self.set_common(8, 4, sel)
            self.set_common(12, 4, feats[sel] if sel else 0)
        self.set_common(20, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
        return bool(self.common(20, 1) & S.FEATURES_OK)

    def setup_queue(self, index: int, vq: VirtQueueDriver, vector: int = 0xFFFF) -> None:
        self.set_common(22, 2, index)
        self.set_common(24, 2, vq.size)
        self.set_common(26, 2, vector)
        for off, addr in ((32, vq.desc_table), (40, vq.avail_ring), (48, vq.used_ring)):
            self.set_common(off, 4, addr & 0xFFFF_FFFF)
            self.set_common(off + 4, 4, addr >> 32)
        self.set_common(28, 2, 1)

    def driver_ok(self) -> None:
        self.set_common(20, 1, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)

    def find_cap(self, cap_id: int) -> int:
        ptr = self.dev.read_config_register(0x34 // 4) & 0xFF
        while ptr:
            word = self.dev.read_config_register(ptr // 4)
            if word & 0xFF == cap_id:
                return ptr
            ptr = word >> 8 & 0xFF
        raise AssertionError("capability not found")

    def enable_msix(self) -> None:
        reg = self.find_cap(MSIX_CAP_ID) // 4
        ctrl = self.dev.read_config_register(reg) >> 16
        self.dev.write_config_register(reg, 2, (ctrl | 0x8000).to_bytes(2, "little"))

    def msix_entry(self, vector: int, address: int, data: int) -> None:
        base = 0x6000 + 16 * vector
        self.dev.write(base, struct.pack("<IIII", address & 0xFFFF_FFFF, address >> 32, data, 0))


class MainLoop:
    """The VMM main loop's part in these tests: serve the sandbox's sources in a thread."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            handlers = dict(self.sandbox.sources())
            ready, _, _ = select.select(list(handlers), [], [], 0.02)
            for fd in ready:
                handlers[fd]()

    def __enter__(self) -> MainLoop:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with make_guest_memory(8 << 20) as m:
        yield m


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(64 << 10))
    return path


def _place(proxy: ProxyDevice) -> tuple[EventFd, EventFd]:
    bars = proxy.allocate_bars(lambda size, align: BAR)
    assert bars[0].address == BAR
    irq, resample = EventFd(), EventFd()
    proxy.assign_irq(irq, resample, 16, 1)
    assert all(isinstance(e, IoEvent) for e in proxy.ioevents())
    return irq, resample


def _block_factory(image: Path) -> Callable[[Ctx], VirtioPciDevice]:
    def factory(ctx: Ctx) -> VirtioPciDevice:
        return VirtioPciDevice(Block.open(image), ctx.memory, msix_router=ctx.irq_router)

    return factory


@pytest.mark.root
def test_proxied_block_with_msix_keeps_data_intact(
    mem: GuestMemory, image: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    router = FakeIrqRouter()
    deaths: list[DeviceDeath] = []
    with Sandbox(log_failures=True, on_device_death=deaths.append) as sandbox:
        proxy = sandbox.sandboxed(_block_factory(image), "block_device")(Ctx(mem, router))
        irq, resample = _place(proxy)
        assert proxy.read_config_register(0) == 0x1042_1AF4  # direct, before the fork
        sandbox.start()
        assert proxy.started and proxy.pid is not None and proxy.alive
        with MainLoop(sandbox), irq, resample:
            drv = Driver(proxy)
            assert proxy.read_config_register(0) == 0x1042_1AF4  # through the device process
            drv.enable_msix()
            drv.msix_entry(0, 0xFEE0_0000, 0x41)
            drv.msix_entry(1, 0xFEE0_0000, 0x42)
            assert set(router.routes.values()) == {(0xFEE0_0000, 0x41), (0xFEE0_0000, 0x42)}
            assert drv.negotiate()
            vq = VirtQueueDriver(mem, 0x10000, 64)
            drv.setup_queue(0, vq, vector=0)
            drv.driver_ok()
            payload = os.urandom(4096)
            w = vq.add_request([HDR.pack(VIRTIO_BLK_T_OUT, 0, 8), payload], [1])
            proxy.write(0x3000, b"\0\0")  # notify queue 0 (the child writes the queue eventfd)
            assert vq.wait_used(1, timeout=10) == [(w.head, 1)]
            r = vq.add_request([HDR.pack(VIRTIO_BLK_T_IN, 0, 8)], [4096, 1])
            notify = proxy.ioevents()[0].event
            assert isinstance(notify, EventFd)
            notify.write(1)  # as KVM's ioeventfd would
            assert vq.wait_used(1, timeout=10) == [(r.head, 4097)]
            data = vq.read_writable(r)
            assert data[:4096] == payload and data[4096] == VIRTIO_BLK_S_OK
            assert image.read_bytes()[8 * 512 : 8 * 512 + 4096] == payload
            vector0 = router.irqfds[min(router.irqfds)]
            assert isinstance(vector0, EventFd) and vector0.read() >= 1
        assert deaths == [], [d.message for d in deaths]
    assert proxy.closed
    assert "seccomp refused" not in capfd.readouterr().err


@pytest.mark.root
def test_proxied_rng_over_intx(mem: GuestMemory) -> None:
    def factory(ctx: Ctx) -> VirtioPciDevice:
        return VirtioPciDevice(Rng(), ctx.memory)

    with Sandbox(log_failures=True) as sandbox:
        proxy = sandbox.sandboxed(factory, "rng_device")(Ctx(mem, FakeIrqRouter()))
        irq, resample = _place(proxy)
        sandbox.start()
        with MainLoop(sandbox), irq, resample:
            drv = Driver(proxy)
            assert drv.negotiate()
            vq = VirtQueueDriver(mem, 0x20000, 16)
            drv.setup_queue(0, vq)
            drv.driver_ok()
            chain = vq.add_request([], [256])
            proxy.write(0x3000, b"\0\0")
            assert vq.wait_used(1, timeout=10) == [(chain.head, 256)]
            assert vq.read_writable(chain) != bytes(256)
            assert irq.read() >= 1  # INTx: the device process wrote the irqfd
            assert proxy.read(0x1000, 1) == b"\x01"  # ISR: used-buffer interrupt, read to clear
            assert proxy.read(0x1000, 1) == b"\x00"
        assert sandbox.monitor.deaths == []


class Hostile:
    """A PCI device that misbehaves on request (a compromised device process)."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)

    def debug_label(self) -> str:
        return "hostile"

    def read_config_register(self, reg_idx: int) -> int:
        if reg_idx == 1:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # not in any device policy
        if reg_idx == 2:
            os.kill(os.getpid(), signal.SIGSEGV)
        return 0x1234_5678

    def write_config_register(self, reg_idx: int, offset: int, data: bytes) -> None:
        pass

    def read(self, offset: int, size: int) -> bytes:
        return bytes(range(size))

    def write(self, offset: int, data: bytes) -> None:
        pass

    def allocate_bars(self, allocator: BarAllocator) -> list[PciBar]:
        return []

    def ioevents(self) -> list[IoEvent]:
        return []

    def assign_irq(
        self, irq_evt: EventFd, resample_evt: EventFd | None, line: int, pin: int
    ) -> None:
        pass

    def keep_fds(self) -> list[int]:
        return [self.fd]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@pytest.mark.root
@pytest.mark.parametrize("log_failures", [True, False])
def test_forbidden_syscall_is_reported_as_sigsys(
    mem: GuestMemory, log_failures: bool, caplog: pytest.LogCaptureFixture
) -> None:
    deaths: list[DeviceDeath] = []
    with Sandbox(log_failures=log_failures, on_device_death=deaths.append, timeout=1.0) as sandbox:
        proxy = sandbox.sandboxed(lambda ctx: Hostile(), "rng_device")(Ctx(mem, FakeIrqRouter()))
        sandbox.start()
        assert proxy.read_config_register(0) == 0x1234_5678
        assert proxy.read(0, 4) == b"\x00\x01\x02\x03"
        with caplog.at_level(logging.ERROR, logger="devices.proxy"):
            assert proxy.read_config_register(1) == 0xFFFF_FFFF  # the process died meanwhile
            assert proxy.read(0, 4) == b"\xff" * 4  # no hang, no second timeout
            for _ in range(200):
                if sandbox.monitor.on_readable() or deaths:
                    break
                select.select([sandbox.monitor], [], [], 0.05)
        assert len(deaths) == 1
        message = deaths[0].message
        assert message.startswith(f"device hostile (pid {proxy.pid}) died: killed by SIGSYS")
        if log_failures:
            assert message.endswith("(seccomp refused syscall socket)")
        assert sum("proxy call failed" in r.message for r in caplog.records) == 1
        assert any(message in r.getMessage() for r in caplog.records)


@pytest.mark.root
def test_killed_device_is_reported_by_name(mem: GuestMemory) -> None:
    deaths: list[DeviceDeath] = []
    with Sandbox(on_device_death=deaths.append) as sandbox:
        proxy = sandbox.sandboxed(lambda ctx: Hostile(), "rng_device")(Ctx(mem, FakeIrqRouter()))
        sandbox.start()
        assert proxy.pid is not None
        os.kill(proxy.pid, signal.SIGKILL)
        ready, _, _ = select.select([sandbox.monitor], [], [], 10)
        assert ready
        sandbox.monitor.on_readable()
        assert [d.message for d in deaths] == [
            f"device hostile (pid {proxy.pid}) died: killed by SIGKILL"
        ]
        assert proxy.read_config_register(0) == 0xFFFF_FFFF


@pytest.mark.root
def test_orderly_shutdown_is_not_a_death(mem: GuestMemory) -> None:
    deaths: list[DeviceDeath] = []
    with Sandbox(on_device_death=deaths.append) as sandbox:
        proxy = sandbox.sandboxed(lambda ctx: Hostile(), "rng_device")(Ctx(mem, FakeIrqRouter()))
        sandbox.start()
        pid = proxy.pid
        proxy.close()
        proxy.close()
        assert proxy.closed and not proxy.alive
        sandbox.monitor.on_readable()
        assert deaths == []
        with pytest.raises(ChildProcessError):
            os.waitpid(pid or -1, os.WNOHANG)  # reaped


def test_start_refuses_a_multithreaded_process(mem: GuestMemory) -> None:
    with Sandbox(seccomp=False) as sandbox:
        proxy = sandbox.sandboxed(lambda ctx: Hostile(), None)(Ctx(mem, FakeIrqRouter()))
        stop = threading.Event()
        t = threading.Thread(target=stop.wait)
        t.start()
        try:
            with pytest.raises(NotSingleThreaded):
                sandbox.start()
        finally:
            stop.set()
            t.join()
        assert not proxy.started
        assert proxy.read_config_register(0) == 0x1234_5678  # still usable in-process


def test_irq_server_only_touches_the_device_s_own_gsis() -> None:
    router = FakeIrqRouter(first_gsi=40)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = IrqRouterServer(router, a, "pci-test")
    client: MsgSocket[IrqRequest, IrqResponse] = MsgSocket(
        b, IrqRequest, IrqResponse, recv_timeout=2
    )

    def ask(req: IrqRequest) -> IrqResponse:
        client.send(req)
        server.on_readable()
        return client.recv()

    with client, EventFd() as evt:
        assert ask(SetMsiRoute(24, 0xFEE0_0000, 1)) == IrqErr(1)  # EPERM: not ours
        reply = ask(AllocateGsi())
        assert reply == IrqGsi(40)
        assert ask(SetMsiRoute(40, 0xFEE0_0000, 0x55)) == IrqOk()
        assert router.routes[40] == (0xFEE0_0000, 0x55)
        assert ask(RegisterIrqfd(evt, 7, None)) == IrqErr(1)
        assert ask(RegisterIrqfd(evt, 40, None)) == IrqOk()
        got = router.irqfds[40]
        assert isinstance(got, EventFd)
        evt.write(3)
        assert got.read() == 3  # the very same eventfd, passed with SCM_RIGHTS
        assert server.gsis == {40}
        b_fd = client.fileno()
        assert b_fd >= 0
    server.on_readable()  # hang-up closes the server
    assert server.closed
    server.close()


def test_policies_ship_and_include_common() -> None:
    d = policy_dir()
    common = Policy.parse_file(d / "common_device.policy")
    for name in ("block_device", "rng_device", "console_device"):
        policy = Policy.parse_file(d / f"{name}.policy")
        assert set(common.names) <= set(policy.names)
        assert "socket" not in policy.names and "execve" not in policy.names
    assert "pwritev" in Policy.parse_file(d / "block_device.policy").names


def test_monitor_closed_behaviour() -> None:
    monitor = ChildMonitor()
    assert monitor.fileno() >= 0
    monitor.close()
    assert monitor.closed
    with pytest.raises(OSError):
        monitor.fileno()


@pytest.mark.root
def test_proxied_console_moves_bytes_both_ways(mem: GuestMemory) -> None:
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)

    def factory(ctx: Ctx) -> VirtioPciDevice:
        return VirtioPciDevice(Console(in_r, out_w), ctx.memory)

    try:
        with Sandbox(log_failures=True) as sandbox:
            proxy = sandbox.sandboxed(factory, "console_device")(Ctx(mem, FakeIrqRouter()))
            irq, resample = _place(proxy)
            sandbox.start()
            with MainLoop(sandbox), irq, resample:
                drv = Driver(proxy)
                assert drv.negotiate()
                rx = VirtQueueDriver(mem, 0x30000, 16)
                tx = VirtQueueDriver(mem, 0x38000, 16)
                drv.setup_queue(0, rx)
                drv.setup_queue(1, tx)
                drv.driver_ok()
                rx_chain = rx.add_request([], [64])
                proxy.write(0x3000, b"\0\0")
                tx_chain = tx.add_request([b"from the guest\n"], [])
                proxy.write(0x3004, b"\1\0")
                assert tx.wait_used(1, timeout=10) == [(tx_chain.head, 0)]
                assert os.read(out_r, 100) == b"from the guest\n"
                os.write(in_w, b"typed")
                assert rx.wait_used(1, timeout=10) == [(rx_chain.head, 5)]
                assert rx.read_writable(rx_chain)[:5] == b"typed"
            assert sandbox.monitor.deaths == []
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)


@pytest.mark.root
def test_disk_resize_reaches_the_jailed_block_device(mem: GuestMemory, image: Path) -> None:
    with Sandbox(log_failures=True) as sandbox:
        proxy = sandbox.sandboxed(_block_factory(image), "block_device")(Ctx(mem, FakeIrqRouter()))
        irq, resample = _place(proxy)
        sandbox.start()
        with irq, resample:
            assert int.from_bytes(proxy.read(0x2000, 8), "little") == (64 << 10) // 512
            proxy.resize_disk(1 << 20)
            assert image.stat().st_size == 1 << 20
            assert int.from_bytes(proxy.read(0x2000, 8), "little") == (1 << 20) // 512
            with pytest.raises(OSError):
                proxy.resize_disk(1 << 62)  # beyond any file size: the device's error
            with pytest.raises(OSError):
                proxy.resize_disk(1 << 70)  # not even encodable: refused here
            assert proxy.alive
        assert sandbox.monitor.deaths == []
    rng = ProxyDevice(VirtioPciDevice(Rng(), mem), Sandbox(seccomp=False).jail(None))
    with rng, pytest.raises(OSError) as info:
        rng.resize_disk(4096)
    assert info.value.errno == 25  # ENOTTY: no disk
