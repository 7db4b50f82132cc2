"""VM construction for x86_64: kernel loading, memory layout, boot state.

Arch-neutral parts live at the top level (:mod:`arch.loader`, :mod:`arch.cmdline`,
:mod:`arch.allocator`); the x86_64 machine is :mod:`arch.x86_64`.
"""

from arch.__about__ import __version__
from arch.allocator import AddressAllocator, Allocation
from arch.cmdline import Cmdline
from arch.errors import (
    AddressExhausted,
    AllocatorError,
    CmdlineError,
    CmdlineTooLong,
    Error,
    InitrdLoadError,
    KernelLoadError,
    MemoryLayoutError,
    MpTableError,
    VmSetupError,
)
from arch.loader import InitrdPlacement, LoadedKernel, load_initrd, load_kernel

__all__ = [
    "AddressAllocator",
    "AddressExhausted",
    "Allocation",
    "AllocatorError",
    "Cmdline",
    "CmdlineError",
    "CmdlineTooLong",
    "Error",
    "InitrdLoadError",
    "InitrdPlacement",
    "KernelLoadError",
    "LoadedKernel",
    "MemoryLayoutError",
    "MpTableError",
    "VmSetupError",
    "__version__",
    "load_initrd",
    "load_kernel",
]
