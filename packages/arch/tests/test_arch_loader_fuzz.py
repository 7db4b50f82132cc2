"""Hostile kernel images: any byte mutation either loads or fails with KernelLoadError."""

import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arch.errors import KernelLoadError
from arch.loader import load_kernel
from arch.testing import build_bzimage, build_elf64
from sys_util import GuestMemory

MIB = 1 << 20
_ELF = build_elf64(
    [(0x20_0000, b"\x90" * 256, 0x1000), (0x40_0000, b"D" * 64, 64)], 0x20_0000, pvh_entry=0x20_0010
)
_BZ = build_bzimage(b"K" * 1024, init_size=0x10_0000)

_CANARY = b"\xa5" * 0x1000


def _mutate(image: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    data = bytearray(image)
    for pos, value in edits:
        data[pos % len(data)] = value
    return bytes(data[:cut] if cut is not None else data)


@pytest.fixture(scope="module")
def memory() -> Iterator[GuestMemory]:
    """Shared by all examples; the canaries below catch stray writes."""
    with GuestMemory([(0, 16 * MIB)]) as mem:
        yield mem


def _check(mem: GuestMemory, image: bytes) -> None:
    mem.write(0, _CANARY)  # below 1 MiB nothing may be written
    mem.write(16 * MIB - 0x1000, _CANARY)
    try:
        kernel = load_kernel(mem, image)
    except KernelLoadError as err:
        assert "\n" not in str(err)
    else:
        assert 0x10_0000 <= kernel.load_address <= kernel.entry < kernel.end <= 16 * MIB
    assert mem.read(0, 0x1000) == _CANARY


edits = st.lists(st.tuples(st.integers(0, 0x7FF), st.integers(0, 255)), max_size=8)
cuts = st.none() | st.integers(0, 0x1800)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits, cuts)
def test_mutated_elf(memory: GuestMemory, e: list[tuple[int, int]], cut: int | None) -> None:
    _check(memory, _mutate(_ELF, e, cut))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits, cuts)
def test_mutated_bzimage(memory: GuestMemory, e: list[tuple[int, int]], cut: int | None) -> None:
    _check(memory, _mutate(_BZ, [(0x1F0 + p % 0x80, v) for p, v in e], cut))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_elf_huge_numbers(memory: GuestMemory, paddr: int, filesz: int, memsz: int) -> None:
    image = bytearray(_ELF)
    struct.pack_into("<QQQ", image, 64 + 24, paddr, filesz, memsz)
    _check(memory, bytes(image))
