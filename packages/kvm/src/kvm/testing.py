"""Helpers for tests, benchmarks and examples that run tiny guests (no pytest import).

``machine()`` gives a VM whose RAM is a ``sys_util.GuestMemory`` (the VMM's own memory type);
``GuestRam`` is a minimal anonymous mapping with its host address, for code that wants no memfd.
``setup_real_mode`` / ``setup_long_mode`` put a vCPU in a known state. The long-mode layout
(GDT at 0x500, page tables at 0x9000-0xbfff identity-mapping the first GiB with 2 MiB pages,
user-accessible) is fixed and documented here so tests can place code and data around it.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Protocol, TypeVar

from kvm._kvm import Kvm
from kvm._state import DTable, Segment
from kvm._vcpu import Vcpu
from kvm._vm import Vm
from kvm_sys import ffi
from sys_util import GuestMemory

T = TypeVar("T")

__all__ = [
    "GDT_ADDR",
    "KERNEL_CS",
    "KERNEL_DS",
    "PAGE_TABLES_ADDR",
    "USER_CS",
    "USER_DS",
    "GuestRam",
    "Machine",
    "machine",
    "run_in_thread",
    "setup_long_mode",
    "setup_real_mode",
]

GDT_ADDR = 0x500
PAGE_TABLES_ADDR = 0x9000  # PML4; PDPT at +0x1000, PD at +0x2000
KERNEL_CS = 0x08
KERNEL_DS = 0x10
USER_CS = 0x18 | 3
USER_DS = 0x20 | 3

_GDT = (
    0,
    0x00AF9B000000FFFF,  # 64-bit code, DPL 0
    0x00CF93000000FFFF,  # data, DPL 0
    0x00AFFB000000FFFF,  # 64-bit code, DPL 3
    0x00CFF3000000FFFF,  # data, DPL 3
)

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10


class GuestRam:
    """``size`` bytes of anonymous shared memory to hand to ``Vm.add_memory_region``.

    Offsets are guest physical addresses relative to the region start; every access is
    bounds-checked. Keep it open while any VM maps it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._map: mmap.mmap | None = mmap.mmap(
            -1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS
        )
        # SAFETY: the cffi view keeps the mapping exported (so it cannot be closed under the
        # guest) until close() releases it.
        self._buf = ffi.from_buffer(self._map)
        self.host_address = int(ffi.cast("uintptr_t", self._buf))

    def _m(self, addr: int, length: int) -> mmap.mmap:
        if self._map is None:
            raise ValueError("GuestRam is closed")
        if addr < 0 or length < 0 or addr + length > self.size:
            raise ValueError(f"[{addr:#x}, +{length:#x}) is outside the {self.size:#x}-byte RAM")
        return self._map

    def write(self, addr: int, data: bytes) -> None:
        self._m(addr, len(data))[addr : addr + len(data)] = data

    def read(self, addr: int, length: int) -> bytes:
        return self._m(addr, length)[addr : addr + length]

    def write_u64(self, addr: int, value: int) -> None:
        self.write(addr, struct.pack("<Q", value))

    def read_u64(self, addr: int) -> int:
        return int(struct.unpack("<Q", self.read(addr, 8))[0])

    def close(self) -> None:
        if self._map is not None:
            ffi.release(self._buf)
            self._map.close()
            self._map = None

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Writable(Protocol):
    def write(self, addr: int, data: bytes, /) -> None: ...

    def write_u64(self, addr: int, value: int, /) -> None: ...


def setup_real_mode(vcpu: Vcpu, ip: int, *, cs: int = 0) -> None:
    """Real mode at ``cs:ip`` with all data segments at 0 (KVM's reset state otherwise)."""
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        seg = getattr(sregs, name)
        seg.base = 0
        seg.selector = 0
    sregs.cs.selector = cs
    sregs.cs.base = cs << 4
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = ip
    regs.rflags = 0x2
    vcpu.set_regs(regs)


def setup_long_mode(
    vcpu: Vcpu, ram: _Writable, entry: int, *, user: bool = False, stack: int = 0x8000
) -> None:
    """64-bit mode with paging at ``entry``: CPL 0, or CPL 3 (IOPL 3, so ``in``/``out`` work)
    with ``user=True``. Writes the GDT and page tables into ``ram``."""
    for i, desc in enumerate(_GDT):
        ram.write_u64(GDT_ADDR + 8 * i, desc)
    pml4, pdpt, pd = PAGE_TABLES_ADDR, PAGE_TABLES_ADDR + 0x1000, PAGE_TABLES_ADDR + 0x2000
    ram.write(pml4, bytes(0x3000))
    ram.write_u64(pml4, pdpt | 0x7)  # present, writable, user
    ram.write_u64(pdpt, pd | 0x7)
    for i in range(512):
        ram.write_u64(pd + 8 * i, (i << 21) | 0x87)  # 2 MiB page, present, writable, user

    sregs = vcpu.get_sregs()
    dpl = 3 if user else 0
    code = Segment(
        base=0, limit=0xFFFFFFFF, selector=USER_CS if user else KERNEL_CS,
        type=11, present=1, dpl=dpl, db=0, s=1, l=1, g=1,
    )  # fmt: skip
    data = Segment(
        base=0, limit=0xFFFFFFFF, selector=USER_DS if user else KERNEL_DS,
        type=3, present=1, dpl=dpl, db=1, s=1, l=0, g=1,
    )  # fmt: skip
    sregs.cs = code
    sregs.ds = data
    sregs.es = replace(data)
    sregs.fs = replace(data)
    sregs.gs = replace(data)
    sregs.ss = replace(data)
    sregs.gdt = DTable(GDT_ADDR, 8 * len(_GDT) - 1)
    sregs.cr3 = pml4
    sregs.cr4 = CR4_PAE
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)

    regs = vcpu.get_regs()
    regs.rip = entry
    regs.rsp = stack
    regs.rflags = 0x3002 if user else 0x2
    vcpu.set_regs(regs)


@dataclass
class Machine:
    """A VM with one RAM region at guest address 0 (what :func:`machine` yields)."""

    kvm: Kvm
    vm: Vm
    ram: GuestMemory
    slot: int


@contextlib.contextmanager
def machine(size: int, *, irqchip: bool = False, log_dirty: bool = False) -> Iterator[Machine]:
    """A fresh VM with ``size`` bytes of ``GuestMemory`` at 0 (and the in-kernel irqchip)."""
    with GuestMemory([(0, size)]) as ram, Kvm() as k, k.create_vm() as vm:
        if irqchip:
            vm.create_irqchip()
        host = ram.regions[0].host_address
        slot = vm.add_memory_region(0, size, host, log_dirty=log_dirty)
        yield Machine(k, vm, ram, slot)


def run_in_thread(fn: Callable[[], T], timeout: float = 20.0) -> T:
    """Run ``fn`` in a new thread and return its result (or re-raise its exception here).

    For running a vCPU off the main thread, as a VMM does; fails after ``timeout`` seconds.
    """
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"thread still running after {timeout} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]
