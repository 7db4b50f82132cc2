"""The kit's built artefacts, checked without booting: the tiny kernel's two forms agree, and
Debian's cloud kernel is unpacked into a bootable vmlinux plus a module-loading initramfs.
Slow only the first time (kernel build ~4-11 min, package download ~10 s), then cached."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
from kit import ensure_stock_kernel, ensure_tiny_bzimage, ensure_tiny_kernel, extract_vmlinux

pytestmark = [pytest.mark.slow]


def _load_segments(path: Path) -> list[tuple[int, bytes]]:
    """(physical address, file bytes) of every PT_LOAD segment of an ELF64."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    segs = []
    for i in range(phnum):
        p_type, _flags, off, _vaddr, paddr, filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type == 1:
            segs.append((paddr, data[off : off + filesz]))
    return segs


def _has_pvh_note(path: Path) -> bool:
    out = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True).stdout
    return "Xen" in out and "0x00000012" in out  # XEN_ELFNOTE_PHYS32_ENTRY


def test_tiny_bzimage_payload_is_the_tiny_vmlinux(tmp_path: Path) -> None:
    vmlinux, bzimage = ensure_tiny_kernel(), ensure_tiny_bzimage()
    assert extract_vmlinux(bzimage, tmp_path / "extracted") == "lz4"
    assert _load_segments(tmp_path / "extracted") == _load_segments(vmlinux)
    assert _has_pvh_note(vmlinux)


def test_stock_kernel_unpacks_with_its_virtio_modules() -> None:
    stock = ensure_stock_kernel()
    bzimage, vmlinux, initramfs = stock
    assert bzimage.read_bytes()[0x202:0x206] == b"HdrS"
    assert vmlinux.read_bytes()[:4] == b"\x7fELF"
    assert _has_pvh_note(vmlinux)
    for needed in ("virtio_pci", "virtio_blk", "virtio_net", "vmw_vsock_virtio_transport"):
        assert needed in stock.modules
    # dependencies come first
    assert stock.modules.index("virtio") < stock.modules.index("virtio_blk")
    assert stock.modules.index("vsock") < stock.modules.index("vmw_vsock_virtio_transport")
    listing = (
        subprocess.run(
            ["cpio", "-it", "--quiet"], input=initramfs.read_bytes(), capture_output=True
        )
        .stdout.decode()
        .split()
    )
    assert "etc/kit-modules" in listing and "init" in listing
    assert all(f"lib/modules/{m}.ko" in listing for m in stock.modules)
    assert "CONFIG_EXT4_FS=y" in stock.config.read_text()
