import io
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from arch.errors import InitrdLoadError, KernelLoadError
from arch.loader import HIMEM_START, load_initrd, load_kernel
from arch.testing import build_bzimage, build_elf64, serial_hello_guest
from sys_util import GuestMemory

MIB = 1 << 20


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, 64 * MIB)]) as mem:
        yield mem


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and text
    return text


# ---------------------------------------------------------------- ELF


def test_elf_segments_go_to_paddr_and_bss_is_zeroed(memory: GuestMemory) -> None:
    memory.write(0x30_0000, b"\xaa" * 0x3000)  # stale bytes where the bss goes
    text = bytes(range(256)) * 4
    data = b"DATA" * 16
    image = build_elf64([(0x20_0000, text, len(text)), (0x30_0000, data, 0x3000)], entry=0x20_0010)
    k = load_kernel(memory, image)
    assert (k.kind, k.entry, k.load_address, k.end) == ("elf", 0x20_0010, 0x20_0000, 0x30_3000)
    assert memory.read(0x20_0000, len(text)) == text
    assert memory.read(0x30_0000, len(data)) == data
    assert memory.read(0x30_0000 + len(data), 0x3000 - len(data)) == bytes(0x3000 - len(data))
    assert k.setup_header is None and k.cmdline_limit == 2047


def test_elf_entry_is_e_entry_not_fixed(memory: GuestMemory) -> None:
    image = build_elf64([(0x100_0000, b"\x90" * 0x1000, 0x1000)], entry=0x100_0123)
    assert load_kernel(memory, image).entry == 0x100_0123


def test_elf_from_path_and_file_object(memory: GuestMemory, tmp_path: Path) -> None:
    image = serial_hello_guest(b"x\n")
    path = tmp_path / "vmlinux"
    path.write_bytes(image)
    assert load_kernel(memory, path).entry == HIMEM_START
    assert load_kernel(memory, str(path)).entry == HIMEM_START
    with open(path, "rb") as f:
        assert load_kernel(memory, f).entry == HIMEM_START
    assert load_kernel(memory, io.BytesIO(image)).entry == HIMEM_START


def test_elf_large_segment_via_preadv(memory: GuestMemory, tmp_path: Path) -> None:
    blob = os.urandom(3 * MIB + 123)
    path = tmp_path / "big"
    path.write_bytes(build_elf64([(0x100_0000, blob, len(blob) + 5 * MIB)], 0x100_0000))
    k = load_kernel(memory, path)
    assert memory.read(0x100_0000, len(blob)) == blob
    assert k.end == 0x100_0000 + len(blob) + 5 * MIB


def test_pvh_note_is_reported(memory: GuestMemory) -> None:
    image = build_elf64([(0x20_0000, b"\x90" * 16, 16)], 0x20_0000, pvh_entry=0x20_0008)
    assert load_kernel(memory, image).pvh_entry == 0x20_0008


def _elf_with_phdr(**fields: int) -> bytes:
    """A valid one-segment ELF whose first program header fields are overridden."""
    image = bytearray(build_elf64([(0x20_0000, b"\x90" * 64, 64)], 0x20_0000))
    names = ["p_type", "p_flags", "p_offset", "p_vaddr", "p_paddr", "p_filesz", "p_memsz"]
    values = list(struct.unpack_from("<IIQQQQQ", image, 64))
    for name, value in fields.items():
        values[names.index(name)] = value
    struct.pack_into("<IIQQQQQ", image, 64, *values)
    return bytes(image)


def _elf_with_ehdr(offset: int, fmt: str, value: int) -> bytes:
    image = bytearray(build_elf64([(0x20_0000, b"\x90" * 64, 64)], 0x20_0000))
    struct.pack_into(fmt, image, offset, value)
    return bytes(image)


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (b"\x7fELF", "truncated ELF header"),
        (build_elf64([(0x20_0000, b"\x90", 1)], 0x20_0000, elf_class=1), "32-bit"),
        (build_elf64([(0x20_0000, b"\x90", 1)], 0x20_0000, data_encoding=2), "little-endian"),
        (build_elf64([(0x20_0000, b"\x90", 1)], 0x20_0000, machine=3), "not x86-64"),
        (build_elf64([(0x20_0000, b"\x90", 1)], 0x20_0000, elf_type=1), "not an executable"),
        (_elf_with_ehdr(54, "<H", 32), "program header size"),  # e_phentsize
        (_elf_with_ehdr(56, "<H", 0), "no program headers"),  # e_phnum
        (_elf_with_ehdr(56, "<H", 500), "outside the"),  # e_phnum beyond file
        (_elf_with_ehdr(32, "<Q", 1 << 60), "outside the"),  # e_phoff
        (_elf_with_ehdr(32, "<Q", 8), "outside the"),  # e_phoff inside the ELF header
        (_elf_with_phdr(p_filesz=128, p_memsz=64), "exceeds memory size"),
        (_elf_with_phdr(p_offset=1 << 40), "beyond the"),
        (_elf_with_phdr(p_filesz=1 << 20, p_memsz=1 << 20), "beyond the"),
        (_elf_with_phdr(p_paddr=0x1000), "does not fit"),  # below 1 MiB: boot structures
        (_elf_with_phdr(p_paddr=64 * MIB - 32), "does not fit"),  # runs past RAM end
        (_elf_with_phdr(p_paddr=(1 << 64) - 32), "does not fit"),
        (_elf_with_phdr(p_memsz=(1 << 64) - 1), "does not fit"),
        (_elf_with_phdr(p_type=6), "no loadable segments"),
        (build_elf64([(0x20_0000, b"\x90", 1)], 0x40_0000), "outside every loaded segment"),
        (
            build_elf64([(0x20_0000, b"\x90" * 32, 0x2000), (0x20_1000, b"\x90", 1)], 0x20_0000),
            "overlap",
        ),
    ],
)
def test_bad_elf_rejected_with_one_line(memory: GuestMemory, image: bytes, match: str) -> None:
    memory.write(0x20_0000, b"\x55" * 64)
    with pytest.raises(KernelLoadError, match=match) as info:
        load_kernel(memory, image)
    _one_line(info.value)
    assert memory.read(0x20_0000, 64) == b"\x55" * 64, "nothing written before validation"


def test_truncated_real_elf_every_length(memory: GuestMemory) -> None:
    image = serial_hello_guest(b"truncate me\n")
    for cut in range(len(image)):
        with pytest.raises(KernelLoadError) as info:
            load_kernel(memory, image[:cut])
        _one_line(info.value)


# ---------------------------------------------------------------- bzImage


def test_bzimage_relocatable_loads_at_alignment(memory: GuestMemory) -> None:
    payload = os.urandom(5000)
    k = load_kernel(memory, build_bzimage(payload, init_size=0x80_0000))
    assert (k.kind, k.load_address, k.entry) == ("bzimage", 0x20_0000, 0x20_0200)
    assert k.end == 0x20_0000 + 0x80_0000
    assert memory.read(0x20_0000, len(payload)) == payload
    assert k.protocol_version == 0x20F
    assert k.kernel_alignment == 0x20_0000
    assert k.initrd_addr_max == 0x7FFF_FFFF
    assert k.setup_header is not None
    assert k.setup_header[0x202 - 0x1F1 : 0x206 - 0x1F1] == b"HdrS"
    assert len(k.setup_header) == 0x26C - 0x1F1
    code32 = struct.unpack_from("<I", k.setup_header, 0x214 - 0x1F1)[0]
    assert code32 == 0x20_0000


def test_bzimage_setup_sects_zero_means_four(memory: GuestMemory) -> None:
    payload = b"P" * 100
    image = build_bzimage(payload, setup_sects=0)
    assert image[5 * 512 : 5 * 512 + 100] == payload
    load_kernel(memory, image)
    assert memory.read(0x20_0000, 100) == payload


def test_bzimage_not_relocatable_loads_at_1mib(memory: GuestMemory) -> None:
    k = load_kernel(memory, build_bzimage(b"K" * 64, relocatable=False, init_size=0x10_0000))
    assert (k.load_address, k.entry) == (0x10_0000, 0x10_0200)
    assert k.end == 0x100_0000 + 0x10_0000  # runs at pref_address (16 MiB)


def test_bzimage_big_alignment(memory: GuestMemory) -> None:
    k = load_kernel(memory, build_bzimage(b"K" * 64, kernel_alignment=0x100_0000))
    assert k.load_address == 0x100_0000


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"version": 0x205}, "too old"),
        ({"xloadflags": 0}, "64-bit entry"),
        ({"version": 0x20B}, "64-bit entry"),  # no xloadflags before 2.12
        ({"loadflags": 0}, "zImage"),
        ({"syssize": 0}, "syssize is 0"),
        ({"syssize": 1000}, "truncated"),
        ({"kernel_alignment": 0x30_0000}, "kernel_alignment"),
        ({"init_size": 0x1000_0000}, "PCI hole"),  # needs more RAM than the 64 MiB guest
        ({"cmdline_size": 0}, "cmdline_size"),
    ],
)
def test_bad_bzimage_rejected(memory: GuestMemory, kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(KernelLoadError, match=match) as info:
        load_kernel(memory, build_bzimage(b"K" * 64, **kwargs))
    _one_line(info.value)


def test_truncated_bzimage_every_length(memory: GuestMemory) -> None:
    image = build_bzimage(b"K" * 256)
    for cut in [*range(0, 0x300, 7), *range(len(image) - 300, len(image))]:
        with pytest.raises(KernelLoadError) as info:
            load_kernel(memory, image[:cut])
        _one_line(info.value)


@pytest.mark.parametrize("junk", [b"", b"\0" * 4096, b"MZ" + os.urandom(3000), b"#!/bin/sh\n"])
def test_garbage_rejected(memory: GuestMemory, junk: bytes) -> None:
    with pytest.raises(KernelLoadError) as info:
        load_kernel(memory, junk)
    _one_line(info.value)


def test_missing_file_is_kernel_load_error(memory: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(KernelLoadError, match="No such file") as info:
        load_kernel(memory, tmp_path / "nope")
    assert info.value.path == str(tmp_path / "nope")
    _one_line(info.value)


# ---------------------------------------------------------------- initrd


def test_initrd_goes_high_and_page_aligned(memory: GuestMemory, tmp_path: Path) -> None:
    blob = os.urandom(10_000)
    path = tmp_path / "initrd"
    path.write_bytes(blob)
    placed = load_initrd(memory, path, lowest=0x40_0000, highest=64 * MIB)
    assert placed.size == len(blob)
    assert placed.address % 4096 == 0
    assert placed.address + placed.size <= 64 * MIB < placed.address + placed.size + 4096
    assert memory.read(placed.address, len(blob)) == blob


def test_initrd_respects_addr_max(memory: GuestMemory) -> None:
    placed = load_initrd(memory, b"x" * 5000, lowest=0x40_0000, highest=0x100_0000)
    assert placed.address == 0x100_0000 - 0x2000


def test_initrd_too_big(memory: GuestMemory) -> None:
    with pytest.raises(InitrdLoadError, match="do not fit") as info:
        load_initrd(memory, bytes(0x20_0000), lowest=0x40_0001, highest=0x60_0000)
    _one_line(info.value)
    with pytest.raises(InitrdLoadError, match="empty"):
        load_initrd(memory, b"", lowest=0x20_0000, highest=0x60_0000)


def test_initrd_missing_file(memory: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(InitrdLoadError, match="No such file"):
        load_initrd(memory, tmp_path / "none", lowest=0x20_0000, highest=0x60_0000)


def test_bzimage_short_header_jump_byte(memory: GuestMemory) -> None:
    image = bytearray(build_bzimage(b"K" * 64))
    image[0x201] = 0  # the header "ends" right after the jump: inconsistent with 2.15
    with pytest.raises(KernelLoadError, match="setup header ends") as info:
        load_kernel(memory, bytes(image))
    _one_line(info.value)
