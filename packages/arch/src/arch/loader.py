"""Kernel and initrd loading into guest memory.

:func:`load_kernel` accepts an ELF64 ``vmlinux`` or a ``bzImage`` (detected by content, not by
name), validates every header field it relies on, and reports where the kernel landed as a
:class:`LoadedKernel`. Anything it cannot boot -- garbage, a truncated file, a 32-bit kernel --
raises :class:`~arch.errors.KernelLoadError` with a one-line reason; nothing is written to guest
memory until the headers have been checked.

:func:`load_initrd` places an initial ramdisk page-aligned as high as the kernel allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from arch._bzimage import HDRS_MAGIC, load_bzimage
from arch._elf import ELF_MAGIC, load_elf
from arch._kernel import DEFAULT_INITRD_ADDR_MAX, HIMEM_START, LoadedKernel, copy_to_guest
from arch._source import ImageInput, open_image
from arch.errors import InitrdLoadError, KernelLoadError

if TYPE_CHECKING:
    from sys_util import GuestMemory

__all__ = [
    "DEFAULT_INITRD_ADDR_MAX",
    "HIMEM_START",
    "ImageInput",
    "InitrdPlacement",
    "LoadedKernel",
    "load_initrd",
    "load_kernel",
]

_PAGE = 0x1000
_FOUR_GIB = 1 << 32


@dataclass(frozen=True, slots=True)
class InitrdPlacement:
    """Where the initrd was copied: ``[address, address + size)``."""

    address: int
    size: int


def _describe(err: OSError) -> str:
    return err.strerror or str(err)


def _low_ram_end(memory: GuestMemory, addr: int) -> int:
    """End of the RAM region holding ``addr``, capped at 4 GiB (the identity-mapped range)."""
    for region in memory.regions:
        if region.guest_base <= addr < region.guest_base + region.size:
            return min(region.guest_base + region.size, _FOUR_GIB)
    return addr


def load_kernel(
    memory: GuestMemory,
    kernel: ImageInput,
    *,
    lowest: int = HIMEM_START,
    highest: int | None = None,
) -> LoadedKernel:
    """Load ``kernel`` (ELF64 vmlinux or bzImage) into ``memory``.

    Args:
        memory: the guest's memory.
        kernel: a path, an open binary file, or the image bytes.
        lowest: no byte of the kernel may go below this address.
        highest: ... nor at or above this one; default: the end of the RAM region that holds
            ``lowest``, capped at 4 GiB (the boot page tables identity-map the first 4 GiB).

    Raises:
        KernelLoadError: unreadable file, or an image we cannot boot.
    """
    if highest is None:
        highest = _low_ram_end(memory, lowest)
    try:
        src = open_image(kernel)
    except OSError as err:
        raise KernelLoadError(_describe(err), getattr(err, "filename", None)) from err
    try:
        with src:
            magic = src.pread(4, 0)
            if not magic:
                raise KernelLoadError("file is empty", src.name)
            if magic == ELF_MAGIC:
                return load_elf(memory, src, lowest=lowest, highest=highest)
            if src.pread(4, 0x202) == HDRS_MAGIC:
                return load_bzimage(memory, src, lowest=lowest, highest=highest)
            raise KernelLoadError(
                "not a kernel: no ELF magic and no bzImage 'HdrS' signature", src.name
            )
    except OSError as err:
        raise KernelLoadError(f"read failed: {_describe(err)}", src.name) from err


def load_initrd(
    memory: GuestMemory, initrd: ImageInput, *, lowest: int, highest: int
) -> InitrdPlacement:
    """Copy ``initrd`` page-aligned as high as possible inside ``[lowest, highest)``.

    ``lowest`` is the kernel's end (:attr:`LoadedKernel.end`); ``highest`` is
    ``min(initrd_addr_max + 1, end of RAM below the PCI hole)``.

    Raises:
        InitrdLoadError: unreadable, empty, or too big for the space left.
    """
    try:
        src = open_image(initrd)
    except OSError as err:
        raise InitrdLoadError(_describe(err), getattr(err, "filename", None)) from err
    with src:
        size = src.size
        if size == 0:
            raise InitrdLoadError("file is empty", src.name)
        floor = (lowest + _PAGE - 1) & ~(_PAGE - 1)
        address = (highest - size) & ~(_PAGE - 1)
        if address < floor or not memory.checked_range(address, size):
            raise InitrdLoadError(
                f"{size:#x} bytes do not fit in guest RAM between the kernel end {floor:#x} "
                f"and {highest:#x}",
                src.name,
            )
        try:
            copy_to_guest(memory, src, 0, address, size, "initrd")
        except KernelLoadError as err:
            raise InitrdLoadError(err.reason, src.name) from err
        except OSError as err:
            raise InitrdLoadError(f"read failed: {_describe(err)}", src.name) from err
    return InitrdPlacement(address, size)
