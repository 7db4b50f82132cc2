"""kvm_sys against the C compiler: every constant, struct size and field offset, plus /dev/kvm."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import kvm_sys
from kvm_sys import ffi, lib

FFI_DIR = Path(__file__).resolve().parent.parent / "ffi"

STRUCTS = [
    "kvm_msr_list", "kvm_cpuid_entry2", "kvm_cpuid2", "kvm_userspace_memory_region",
    "kvm_irqfd", "kvm_ioeventfd", "kvm_irq_routing_irqchip", "kvm_irq_routing_msi",
    "kvm_irq_routing_entry", "kvm_irq_routing", "kvm_irq_level", "kvm_msi", "kvm_clock_data",
    "kvm_dirty_log", "kvm_enable_cap", "kvm_irqchip", "kvm_pit_config", "kvm_pit_state2",
    "kvm_regs", "kvm_segment", "kvm_dtable", "kvm_sregs", "kvm_fpu", "kvm_msr_entry",
    "kvm_msrs", "kvm_lapic_state", "kvm_mp_state", "kvm_xsave", "kvm_xcr", "kvm_xcrs",
    "kvm_vcpu_events", "kvm_debugregs", "kvm_signal_mask", "kvm_guest_debug_arch",
    "kvm_guest_debug", "kvm_debug_exit_arch", "kvm_interrupt", "kvm_run",
]  # fmt: skip

OFFSETS = [
    ("kvm_run", "immediate_exit"), ("kvm_run", "exit_reason"), ("kvm_run", "io"),
    ("kvm_run", "io.port"), ("kvm_run", "io.data_offset"), ("kvm_run", "mmio.phys_addr"),
    ("kvm_run", "mmio.data"), ("kvm_run", "mmio.len"), ("kvm_run", "mmio.is_write"),
    ("kvm_run", "internal.ndata"), ("kvm_run", "internal.data"), ("kvm_run", "system_event.data"),
    ("kvm_run", "fail_entry.cpu"), ("kvm_run", "debug.arch.dr7"), ("kvm_run", "kvm_valid_regs"),
    ("kvm_run", "s"), ("kvm_sregs", "idt"), ("kvm_sregs", "apic_base"),
    ("kvm_sregs", "interrupt_bitmap"), ("kvm_fpu", "mxcsr"), ("kvm_vcpu_events", "sipi_vector"),
    ("kvm_vcpu_events", "exception_payload"), ("kvm_irq_routing_entry", "u"),
    ("kvm_irqfd", "resamplefd"), ("kvm_ioeventfd", "flags"), ("kvm_xcrs", "xcrs"),
]  # fmt: skip


def _names() -> list[str]:
    text = (FFI_DIR / "kvm_constants.txt").read_text().splitlines()
    return [n.strip() for n in text if n.strip() and not n.startswith("#")]


def _ffi_offset(struct: str, path: str) -> int:
    offset, ctype = 0, ffi.typeof(f"struct {struct}")
    for part in path.split("."):
        offset += ffi.offsetof(ctype, part)
        ctype = dict(ctype.fields)[part].type
    return offset


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """What gcc says: ``name value`` lines from a C program including <linux/kvm.h>."""
    if not shutil.which("gcc"):
        pytest.skip("needs gcc")
    tmp = tmp_path_factory.mktemp("kvm_sys_layout")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "int main(void) {",
    ]
    for name in _names():
        lines.append(f'  printf("{name} %llu\\n", (unsigned long long)({name}));')
    for s in STRUCTS:
        lines.append(f'  printf("sizeof:{s} %zu\\n", sizeof(struct {s}));')
    for s, path in OFFSETS:
        lines.append(f'  printf("offsetof:{s}.{path} %zu\\n", offsetof(struct {s}, {path}));')
    lines.append("  return 0;\n}")
    (tmp / "layout.c").write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(tmp / "layout"), str(tmp / "layout.c")], check=True)
    out = subprocess.run([str(tmp / "layout")], check=True, capture_output=True, text=True)
    return {k: int(v) for k, v in (line.split() for line in out.stdout.splitlines())}


def test_every_constant_matches_gcc(compiled: dict[str, int]) -> None:
    names = _names()
    assert len(names) > 600
    mismatched = {
        n: (getattr(lib, n) & (2**64 - 1), compiled[n])
        for n in names
        if getattr(lib, n) & (2**64 - 1) != compiled[n]
    }
    assert not mismatched


def test_struct_sizes_match_gcc(compiled: dict[str, int]) -> None:
    for s in STRUCTS:
        assert ffi.sizeof(f"struct {s}") == compiled[f"sizeof:{s}"], s


def test_field_offsets_match_gcc(compiled: dict[str, int]) -> None:
    for s, path in OFFSETS:
        assert _ffi_offset(s, path) == compiled[f"offsetof:{s}.{path}"], (s, path)


def test_well_known_numbers() -> None:
    # Values from the KVM API documentation, independent of any header.
    assert kvm_sys.KVM_API_VERSION == 12
    assert kvm_sys.KVMIO == 0xAE
    assert kvm_sys.KVM_GET_API_VERSION == 0xAE00
    assert kvm_sys.KVM_RUN == 0xAE80
    assert kvm_sys.KVM_SET_TSS_ADDR == 0xAE47
    assert kvm_sys.KVM_EXIT_IO == 2
    assert kvm_sys.KVM_EXIT_MMIO == 6
    assert ffi.sizeof("struct kvm_regs") == 144
    assert ffi.sizeof("struct kvm_sregs") == 312
    assert ffi.sizeof("struct kvm_run") == 2352


def test_generated_files_in_sync() -> None:
    from kvm_sys import _constants

    assert sorted(_constants.__all__) == sorted(_names())
    stub = (Path(kvm_sys.__file__).parent / "_native.pyi").read_text()
    assert all(f"    {n}: int\n" in stub for n in _names())


def test_ioctl_wrappers_return_negative_errno() -> None:
    import errno

    assert lib.kvm_ioctl_val(-1, kvm_sys.KVM_GET_API_VERSION, 0) == -errno.EBADF
    assert lib.kvm_ioctl_ptr(-1, kvm_sys.KVM_GET_API_VERSION, ffi.NULL) == -errno.EBADF


@pytest.mark.kvm
def test_api_version_on_dev_kvm() -> None:
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert lib.kvm_ioctl_val(fd, kvm_sys.KVM_GET_API_VERSION, 0) == 12
        vm = lib.kvm_ioctl_val(fd, kvm_sys.KVM_CREATE_VM, 0)
        assert vm >= 0
        try:
            # 0xfffbd000 >= 2**31: what fcntl.ioctl cannot pass.
            assert lib.kvm_ioctl_val(vm, kvm_sys.KVM_SET_TSS_ADDR, 0xFFFBD000) == 0
        finally:
            os.close(vm)
    finally:
        os.close(fd)
