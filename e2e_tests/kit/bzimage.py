"""Extract the ELF ``vmlinux`` from a bzImage (like the kernel's scripts/extract-vmlinux).

Why: on hosts where guest kernel code is emulated, the bzImage's decompressor costs 25-160 s
of boot; a VMM that loads the ELF directly skips it. The x86 boot protocol (2.08+) says where
the compressed kernel is: the setup header's ``payload_offset`` (0x248) and ``payload_length``
(0x24c), relative to the start of the protected-mode code, which begins after
``(setup_sects or 4) + 1`` sectors of 512 bytes. The kernel build appends the uncompressed
size as a little-endian u32 to every payload (``size_append``), which we strip and check.

Run as ``python -m e2e_tests.kit.bzimage BZIMAGE OUT`` to extract one by hand.
"""

from __future__ import annotations

import bz2
import lzma
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

__all__ = ["BzImageError", "extract_vmlinux", "payload_format"]


class BzImageError(Exception):
    """The file is not a bzImage we can extract, or its payload does not decompress."""


_MAGICS: list[tuple[bytes, str]] = [
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),  # LZ4 legacy frame, what the kernel uses
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x89LZO", "lzo"),
]


def _payload(image: bytes) -> bytes:
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise BzImageError("no 'HdrS' setup header: not a bzImage")
    (version,) = struct.unpack_from("<H", image, 0x206)
    if version < 0x208:
        raise BzImageError(f"boot protocol {version:#x} has no payload fields (needs 2.08+)")
    setup_sects = image[0x1F1] or 4
    pm_start = (setup_sects + 1) * 512
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = pm_start + offset
    if length < 8 or start + length > len(image):
        raise BzImageError(
            f"payload {start:#x}+{length:#x} lies outside the {len(image)}-byte file"
        )
    return image[start : start + length]


def payload_format(image: bytes) -> str:
    """The compression of a bzImage's payload: gzip, xz, zstd, lz4, bzip2, lzma or lzo."""
    payload = _payload(image)
    for magic, name in _MAGICS:
        if payload.startswith(magic):
            return name
    raise BzImageError(f"unknown payload compression (magic {payload[:6].hex()})")


def _run(tool: str, args: list[str], data: bytes, package: str) -> bytes:
    exe = shutil.which(tool)
    if exe is None:
        raise BzImageError(f"needs the `{tool}` command (apt-get install {package})")
    proc = subprocess.run([exe, *args], input=data, capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise BzImageError(f"{tool} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def _decompress(fmt: str, data: bytes) -> bytes:
    if fmt == "gzip":
        d = zlib.decompressobj(wbits=31)
        return d.decompress(data)
    if fmt in ("xz", "lzma"):
        dx = lzma.LZMADecompressor(lzma.FORMAT_XZ if fmt == "xz" else lzma.FORMAT_ALONE)
        return dx.decompress(data)
    if fmt == "bzip2":
        return bz2.BZ2Decompressor().decompress(data)
    if fmt == "zstd":
        return _run("zstd", ["-d", "-c", "-q"], data, "zstd")
    if fmt == "lz4":
        return _run("lz4", ["-d", "-c", "-q"], data, "lz4")
    if fmt == "lzo":
        return _run("lzop", ["-d", "-c", "-q"], data, "lzop")
    raise BzImageError(f"no decompressor for {fmt}")


def extract_vmlinux(bzimage: Path | str, out: Path | str) -> str:
    """Write the ELF kernel inside ``bzimage`` to ``out``; return the compression it used."""
    image = Path(bzimage).read_bytes()
    fmt = payload_format(image)
    payload = _payload(image)
    (size,) = struct.unpack_from("<I", payload, len(payload) - 4)
    body = payload[:-4]
    try:
        elf = _decompress(fmt, body)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        raise BzImageError(f"{fmt} payload does not decompress: {e}") from e
    if not elf.startswith(b"\x7fELF"):
        raise BzImageError(f"the {fmt} payload is not an ELF file (starts {elf[:4].hex()})")
    if len(elf) & 0xFFFFFFFF != size:
        raise BzImageError(f"decompressed {len(elf)} bytes, the image says {size}")
    tmp = Path(str(out) + ".partial")
    tmp.write_bytes(elf)
    tmp.replace(out)
    return fmt


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m e2e_tests.kit.bzimage BZIMAGE OUT")
    print(extract_vmlinux(sys.argv[1], sys.argv[2]))
