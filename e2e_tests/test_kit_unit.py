"""The Linux guest kit's host-side pieces, without booting anything: the cpio writer, the
bzImage extractor, ext4 images, module dependencies, the console protocol driver."""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from kit import BzImageError, GuestConsole, busybox_tree, extract_vmlinux, make_ext4
from kit.bzimage import payload_format
from kit.cpio import Tree


def _fake_bzimage(payload: bytes, setup_sects: int = 2, version: int = 0x20F) -> bytes:
    """A minimal image with a real setup header layout around ``payload``."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    pm = bytearray(0x100)  # some "decompressor" code before the payload
    struct.pack_into("<II", setup, 0x248, len(pm), len(payload))
    return bytes(setup) + bytes(pm) + payload + b"\xcc" * 64


ELF = b"\x7fELF" + bytes(range(256)) * 40


@pytest.mark.parametrize(
    ("fmt", "compress"),
    [
        ("gzip", lambda d: gzip.compress(d, mtime=0)),
        ("xz", lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)),
    ],
)
def test_extract_vmlinux_from_a_synthetic_bzimage(tmp_path: Path, fmt: str, compress) -> None:
    image = _fake_bzimage(compress(ELF) + struct.pack("<I", len(ELF)))
    (tmp_path / "bz").write_bytes(image)
    assert payload_format(image) == fmt
    assert extract_vmlinux(tmp_path / "bz", tmp_path / "vmlinux") == fmt
    assert (tmp_path / "vmlinux").read_bytes() == ELF


@pytest.mark.skipif(not shutil.which("zstd"), reason="needs the zstd command")
def test_extract_zstd_payload(tmp_path: Path) -> None:
    z = subprocess.run(["zstd", "-c", "-q"], input=ELF, capture_output=True, check=True).stdout
    (tmp_path / "bz").write_bytes(_fake_bzimage(z + struct.pack("<I", len(ELF))))
    assert extract_vmlinux(tmp_path / "bz", tmp_path / "vmlinux") == "zstd"
    assert (tmp_path / "vmlinux").read_bytes() == ELF


def test_extractor_rejects_bad_images(tmp_path: Path) -> None:
    cases = {
        "not a bzImage": b"MZ" + bytes(0x400),
        "old protocol": _fake_bzimage(gzip.compress(ELF), version=0x206),
        "payload outside": _fake_bzimage(gzip.compress(ELF))[:-200],
        "wrong size": _fake_bzimage(gzip.compress(ELF) + struct.pack("<I", 5)),
        "not ELF": _fake_bzimage(gzip.compress(b"hello") + struct.pack("<I", 5)),
        "unknown": _fake_bzimage(b"\x00\x11\x22\x33" * 4),
    }
    for name, image in cases.items():
        (tmp_path / "bz").write_bytes(image)
        with pytest.raises(BzImageError):
            extract_vmlinux(tmp_path / "bz", tmp_path / "out")
        assert not (tmp_path / "out").exists(), name


def test_cpio_archive_lists_with_gnu_cpio(tmp_path: Path) -> None:
    if not shutil.which("cpio"):
        pytest.skip("needs cpio")
    tree = Tree()
    tree.add_file("bin/hello", b"hi\n", 0o755)
    tree.add_symlink("bin/sh", "hello")
    tree.add_chardev("dev/console", 5, 1)
    tree.add_file("etc/odd", b"12345")  # odd length: exercises the 4-byte padding
    tree.write_cpio(tmp_path / "a.cpio")
    assert (tmp_path / "a.cpio").stat().st_size % 512 == 0
    archive = (tmp_path / "a.cpio").read_bytes()
    listing = subprocess.run(["cpio", "-itv"], input=archive, capture_output=True).stdout.decode()
    assert "bin/sh -> hello" in listing
    assert "crw-------" in listing and "dev/console" in listing
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(
        ["cpio", "-id", "--quiet", "--no-absolute-filenames", "bin/hello", "etc/odd"],
        input=archive,
        cwd=out,
        check=True,
    )
    assert (out / "bin/hello").read_bytes() == b"hi\n"
    assert (out / "etc/odd").read_bytes() == b"12345"


def test_busybox_tree_has_init_and_mode() -> None:
    if not Path("/bin/busybox").exists():
        pytest.skip("needs busybox-static")
    tree = busybox_tree("shell")
    assert tree.entries["etc/kit-mode"].data == b"shell\n"
    assert tree.entries["init"].data.startswith(b"#!/bin/sh")
    assert tree.entries["dev/console"].rdev == (5, 1)
    disk = busybox_tree("delegate", initramfs=False)
    assert disk.entries["sbin/init"].data == b"/init"
    assert "dev/console" not in disk.entries
    with pytest.raises(ValueError):
        busybox_tree("bogus")


@pytest.mark.skipif(not shutil.which("debugfs"), reason="needs e2fsprogs")
def test_make_ext4_holds_the_files(tmp_path: Path) -> None:
    src = tmp_path / "host.bin"
    src.write_bytes(os.urandom(100_000))
    img = make_ext4(
        tmp_path / "data.ext4", 8 << 20, {"a/b.txt": b"hello", "big.bin": src}, label="data"
    )
    assert img.stat().st_size == 8 << 20

    def cat(path: str) -> bytes:
        return subprocess.run(
            ["debugfs", "-R", f"cat {path}", str(img)], capture_output=True, check=True
        ).stdout

    assert cat("/a/b.txt") == b"hello"
    assert cat("/big.bin") == src.read_bytes()
    fsck = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout


def test_console_delegate_protocol_against_a_shell(tmp_path: Path) -> None:
    """Run guest-init.sh's delegate loop on the host (a plain sh) to check the framing."""
    if not Path("/bin/busybox").exists():
        pytest.skip("needs busybox-static")
    script = (Path(__file__).parent / "kit" / "guest-init.sh").read_text()
    start = script.index("delegate() {")
    end = script.index("\n}\n", start) + 3
    loop = "cs() { echo 0; }\n" + script[start:end] + "delegate\necho GUEST-DONE rc=$?\n"
    (tmp_path / "loop.sh").write_text(loop)
    to_guest_r, to_guest_w = os.pipe()
    from_guest_r, from_guest_w = os.pipe()
    proc = subprocess.Popen(
        ["/bin/busybox", "sh", str(tmp_path / "loop.sh")],
        stdin=to_guest_r,
        stdout=from_guest_w,
        stderr=subprocess.STDOUT,
    )
    os.close(to_guest_r)
    os.close(from_guest_w)
    con = GuestConsole(from_guest_r, to_guest_w)
    try:
        assert con.wait_ready(10) == "delegate"
        r = con.run("echo 42", 10)
        assert (r.rc, r.lines) == (0, ("42",))
        r = con.run("printf abc; exit 3", 10)
        assert (r.rc, r.lines) == (3, ("abc",))
        r = con.run("cat; echo after", 10)  # stdin is /dev/null: the next command survives
        assert (r.rc, r.lines) == (0, ("after",))
        r = con.run("echo x >&2; false", 10)
        assert (r.rc, r.lines) == (1, ("x",))
        with pytest.raises(ValueError):
            con.run("echo a\necho b")
    finally:
        os.close(to_guest_w)
        proc.wait(10)
        con.close()
        os.close(from_guest_r)
    assert con.wait_for("GUEST-DONE rc=0", 1)


def test_console_times_out_with_transcript() -> None:
    r, w = os.pipe()
    con = GuestConsole(r, w)
    os.write(w, b"booting...\r\n")
    from kit import ConsoleTimeout

    with pytest.raises(ConsoleTimeout, match="booting"):
        con.wait_ready(0.2)
    os.close(w)
    threading.Event().wait(0.05)
    con.close()
    os.close(r)
