import threading
from typing import Any

import pytest

from arch.x86_64.irq import (
    IRQCHIP_IOAPIC,
    IRQCHIP_PIC_MASTER,
    IRQCHIP_PIC_SLAVE,
    KvmIrqRouter,
    default_irqchip_routes,
)
from devices.irq import IrqRouter
from kvm import IrqRouteIrqchip, IrqRouteMsi


class FakeVm:
    """Records what the router sends to KVM."""

    def __init__(self, fail: bool = False) -> None:
        self.tables: list[list[Any]] = []
        self.irqfds: list[tuple[Any, int, Any]] = []
        self.fail = fail

    def set_gsi_routing(self, routes: list[Any]) -> None:
        if self.fail:
            raise OSError(22, "Invalid argument")
        self.tables.append(list(routes))

    def register_irqfd(self, evt: Any, gsi: int, resample_evt: Any = None) -> None:
        self.irqfds.append((evt, gsi, resample_evt))

    def unregister_irqfd(self, evt: Any, gsi: int) -> None:
        self.irqfds.remove(next(x for x in self.irqfds if x[:2] == (evt, gsi)))


def _router(vm: FakeVm, **kw: Any) -> KvmIrqRouter:
    return KvmIrqRouter(vm, **kw)  # type: ignore[arg-type]


def test_default_routes_match_kvm() -> None:
    routes = default_irqchip_routes()
    assert len(routes) == 16 + 24
    assert IrqRouteIrqchip(0, IRQCHIP_PIC_MASTER, 0) in routes
    assert IrqRouteIrqchip(9, IRQCHIP_PIC_SLAVE, 1) in routes
    assert IrqRouteIrqchip(4, IRQCHIP_IOAPIC, 4) in routes
    assert not any(r.gsi >= 16 and r.irqchip != IRQCHIP_IOAPIC for r in routes)


def test_protocol_and_initial_commit() -> None:
    vm = FakeVm()
    router = _router(vm)
    assert isinstance(router, IrqRouter)
    assert vm.tables == [default_irqchip_routes()]


def test_msi_routes_keep_legacy_routes() -> None:
    vm = FakeVm()
    router = _router(vm)
    a, b = router.allocate_gsi(), router.allocate_gsi()
    assert (a, b) == (24, 25)
    assert len(vm.tables) == 1  # allocating alone sends nothing
    router.set_msi_route(a, 0xFEE0_0000, 0x41)
    router.set_msi_route(b, 0xFEE0_1000, 0x42)
    last = vm.tables[-1]
    assert last[:40] == default_irqchip_routes()
    assert last[40:] == [IrqRouteMsi(a, 0xFEE0_0000, 0x41), IrqRouteMsi(b, 0xFEE0_1000, 0x42)]
    sent = len(vm.tables)
    router.set_msi_route(a, 0xFEE0_0000, 0x41)  # unchanged: no ioctl
    assert len(vm.tables) == sent
    router.release_gsi(a)
    assert vm.tables[-1][40:] == [IrqRouteMsi(b, 0xFEE0_1000, 0x42)]
    assert router.allocate_gsi() == a  # reused


def test_errors() -> None:
    vm = FakeVm()
    router = _router(vm, max_gsi=26)
    router.allocate_gsi()
    router.allocate_gsi()
    with pytest.raises(OSError):
        router.allocate_gsi()
    with pytest.raises(ValueError):
        router.set_msi_route(5, 0, 0)  # a legacy GSI is not ours to reroute
    with pytest.raises(ValueError):
        router.release_gsi(100)


def test_failed_commit_keeps_previous_route() -> None:
    vm = FakeVm()
    router = _router(vm)
    gsi = router.allocate_gsi()
    router.set_msi_route(gsi, 0xFEE0_0000, 1)
    vm.fail = True
    with pytest.raises(OSError):
        router.set_msi_route(gsi, 0xFEE0_0000, 2)
    assert IrqRouteMsi(gsi, 0xFEE0_0000, 1) in router.routes()


def test_irqfd_passthrough_and_threads() -> None:
    vm = FakeVm()
    router = _router(vm)
    router.register_irqfd("evt", 30, "resample")
    assert vm.irqfds == [("evt", 30, "resample")]
    router.unregister_irqfd("evt", 30)
    assert vm.irqfds == []
    got: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(50):
            gsi = router.allocate_gsi()
            router.set_msi_route(gsi, 0xFEE0_0000, gsi)
            with lock:
                got.append(gsi)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 200
    assert len(router.routes()) == 40 + 200
