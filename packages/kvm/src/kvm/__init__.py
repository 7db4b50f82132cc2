"""A safe, fast Python binding of the Linux KVM API: ``Kvm`` -> ``Vm`` -> ``Vcpu`` -> exits.

Modelled on rust-vmm's kvm-ioctls. Failed ioctls raise ``OSError`` with the errno; every
fd-owning object is a context manager; ``Vcpu.run()`` releases the GIL and returns a typed,
frozen exit object for ``match``.
"""

from kvm.__about__ import __version__
from kvm._cap import Cap
from kvm._exits import (
    Debug,
    FailEntry,
    Hlt,
    InternalError,
    Intr,
    IoIn,
    IoOut,
    IrqWindowOpen,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    Unknown,
    VcpuExit,
)
from kvm._kvm import Kvm
from kvm._state import (
    ClockData,
    CpuIdEntry,
    Debugregs,
    DTable,
    Fpu,
    Lapic,
    MpState,
    Regs,
    Segment,
    Sregs,
    VcpuEvents,
    Xcrs,
)
from kvm._vcpu import Vcpu, kick_signal
from kvm._vm import (
    IoEventAddress,
    IrqRoute,
    IrqRouteIrqchip,
    IrqRouteMsi,
    MemoryRegionInfo,
    Vm,
)
from kvm.errors import ApiVersionError, Error, MsrError, ReplyError

__all__ = [
    "ApiVersionError",
    "Cap",
    "ClockData",
    "CpuIdEntry",
    "DTable",
    "Debug",
    "Debugregs",
    "Error",
    "FailEntry",
    "Fpu",
    "Hlt",
    "InternalError",
    "Intr",
    "IoEventAddress",
    "IoIn",
    "IoOut",
    "IrqRoute",
    "IrqRouteIrqchip",
    "IrqRouteMsi",
    "IrqWindowOpen",
    "Kvm",
    "Lapic",
    "MemoryRegionInfo",
    "MmioRead",
    "MmioWrite",
    "MpState",
    "MsrError",
    "Regs",
    "ReplyError",
    "Segment",
    "Shutdown",
    "Sregs",
    "SystemEvent",
    "Unknown",
    "Vcpu",
    "VcpuEvents",
    "VcpuExit",
    "Vm",
    "Xcrs",
    "__version__",
    "kick_signal",
]
