"""What a kernel loader reports, and the checked copy of image bytes into guest memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from arch._source import ImageSource
from arch.errors import KernelLoadError

if TYPE_CHECKING:
    from sys_util import GuestMemory

__all__ = [
    "DEFAULT_INITRD_ADDR_MAX",
    "HIMEM_START",
    "LoadedKernel",
    "copy_to_guest",
    "zero_guest",
]

#: The first address above the legacy ISA/BIOS area; kernels are never loaded below it.
HIMEM_START = 0x10_0000
#: Boot protocol < 2.03 (and ELF kernels, which carry no setup header) assume this limit.
DEFAULT_INITRD_ADDR_MAX = 0x37FF_FFFF

_ZEROS = bytes(1 << 20)


@dataclass(frozen=True, slots=True)
class LoadedKernel:
    """Where a kernel landed in guest memory and what the zero page must say about it.

    Attributes:
        kind: ``"elf"`` (vmlinux) or ``"bzimage"``.
        entry: guest physical address of the 64-bit entry point.
        load_address: lowest guest address the image was copied to.
        end: one past the highest guest address the kernel needs before it reads the e820 map
            (bss included; for a bzImage also ``init_size`` from its runtime start). The initrd
            goes above this.
        setup_header: for a bzImage, the setup header bytes from file offset 0x1f1 (already
            patched with ``code32_start``); they become the zero page's ``hdr``. ``None`` for ELF.
        protocol_version: boot protocol version (0x20c for 2.12), ``None`` for ELF.
        cmdline_limit: longest command line the kernel accepts, without the NUL.
        initrd_addr_max: highest address the initrd may occupy.
        kernel_alignment: ``setup_header.kernel_alignment`` for a bzImage. An ELF kernel has no
            header; 0x100_0000 is reported (and written to the zero page), as crosvm does.
        pvh_entry: the 32-bit PVH entry from an ELF ``Xen`` note (XEN_ELFNOTE_PHYS32_ENTRY),
            recorded for information; we always enter in 64-bit mode.
    """

    kind: str
    entry: int
    load_address: int
    end: int
    setup_header: bytes | None = None
    protocol_version: int | None = None
    cmdline_limit: int = 2047
    initrd_addr_max: int = DEFAULT_INITRD_ADDR_MAX
    kernel_alignment: int = 0x100_0000
    pvh_entry: int | None = None


def copy_to_guest(
    memory: GuestMemory, src: ImageSource, offset: int, addr: int, length: int, what: str
) -> None:
    """Copy ``length`` bytes of ``src`` at ``offset`` to guest ``addr`` (range pre-checked)."""
    if length == 0:
        return
    got = src.read_into(memory.iovecs(addr, length), offset)
    if got != length:
        raise KernelLoadError(
            f"{what}: file ended after {got:#x} of {length:#x} bytes at offset {offset:#x}",
            src.name,
        )


def zero_guest(memory: GuestMemory, addr: int, length: int) -> None:
    """Zero ``[addr, addr + length)`` of guest memory (a segment's bss)."""
    for view in memory.iovecs(addr, length) if length else ():
        for start in range(0, len(view), len(_ZEROS)):
            piece = view[start : start + len(_ZEROS)]
            piece[:] = _ZEROS[: len(piece)]
