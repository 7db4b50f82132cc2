"""The public API: fd protocol, errors, create options, check and repair, the qcow command."""

from __future__ import annotations

import errno
import os
import pickle
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qcow
from qcow import QcowFile
from qcow.__main__ import main
from qcow._tables import LruCache, RefBlock


def test_fd_protocol(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    img = QcowFile.create(p, 1 << 20)
    fd = img.fileno()
    assert not img.closed
    assert os.get_inheritable(fd) is False
    img.close()
    img.close()  # idempotent
    assert img.closed
    for call in (
        img.fileno,
        lambda: img.read_at(0, 1),
        lambda: img.write_at(b"x", 0),
        img.flush,
        lambda: img.discard(0, 512),
        img.check,
    ):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF
    with QcowFile.open(p) as ro:
        assert ro.read_only
        with pytest.raises(qcow.ReadOnlyImage):
            ro.write_at(b"x", 0)
        with pytest.raises(qcow.ReadOnlyImage):
            ro.resize(2 << 20)
    assert ro.closed


def test_exclusive_lock(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    with QcowFile.create(p, 1 << 20), pytest.raises(qcow.QcowError, match="in use"):
        QcowFile.open(p)


def test_out_of_range_and_short_reads(tmp_path: Path) -> None:
    with QcowFile.create(tmp_path / "a.qcow2", 10000, cluster_size=4096) as img:
        with pytest.raises(qcow.OutOfRange):
            img.write_at(b"xx", 9999)
        with pytest.raises(qcow.OutOfRange):
            img.readinto_at(bytearray(1), 10001)
        with pytest.raises(qcow.OutOfRange):
            img.write_zeroes(-1, 10)
        buf = bytearray(100)
        assert img.readinto_at(buf, 9950) == 50
        img.write_at(b"\x01" * 10, 9990)
        assert img.read_at(9980, 100) == bytes(10) + b"\x01" * 10
        # the last, partial cluster can be zeroed whole
        img.write_zeroes(8192, 10000 - 8192)
        assert img.read_at(8192, 2000) == bytes(10000 - 8192)
        assert img.check().ok


def test_disk_backend_shape(tmp_path: Path) -> None:
    with QcowFile.create(tmp_path / "a.qcow2", 1 << 20, cluster_size=512) as img:
        bufs = [memoryview(bytearray(b"a" * 700)), memoryview(bytearray(b"b" * 300))]
        assert img.write_from(bufs, 100) == 1000
        out = [memoryview(bytearray(500)), memoryview(bytearray(500))]
        assert img.read_into(out, 100) == 1000
        assert bytes(out[0]) + bytes(out[1]) == b"a" * 700 + b"b" * 300
        assert img.size() == 1 << 20
        img.write_zeroes(0, 1 << 20, unmap=True)
        assert img.allocated_bytes() == 0
        img.resize(3 << 20)
        assert img.virtual_size == 3 << 20


def test_concurrent_requests(tmp_path: Path) -> None:
    img = QcowFile.create(tmp_path / "a.qcow2", 4 << 20, cluster_size=4096)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(50):
                off = (k * 50 + i) * 4096 * 3 + k
                img.write_at(bytes([k + 1]) * 5000, off)
                assert img.read_at(off, 5000) == bytes([k + 1]) * 5000
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert img.check().ok
    img.close()


def test_errors_pickle() -> None:
    for err in (
        qcow.CorruptImage("bad", 4096),
        qcow.UnsupportedFeature("extended L2 entries"),
        qcow.InvalidChain("b.img", "loop"),
        qcow.OutOfRange(1, 2, 3),
        qcow.ReadOnlyImage(),
        qcow.InvalidImage("bad magic"),
    ):
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and str(again) == str(err)
        assert isinstance(again, qcow.QcowError) and isinstance(again, OSError)
    assert qcow.CorruptImage("x", 512).offset == 512
    assert qcow.QcowError is qcow.Error


@pytest.mark.parametrize("order", range(7))
def test_refblock_widths(order: int) -> None:
    rb = RefBlock(order, bytes(512))
    n = rb.entries
    assert n == 4096 >> order
    top = (1 << (1 << order)) - 1
    for i in range(0, n, 7):
        rb.set(i, top if i % 2 else 1)
    back = RefBlock(order, rb.to_bytes())
    for i in range(n):
        assert back.get(i) == ((top if i % 2 else 1) if i % 7 == 0 else 0)
    assert back.find_zero(0) == 1
    # bit 0 is the least significant bit for sub-byte widths (spec)
    one = RefBlock(order, bytes(512))
    one.set(0, 1)
    if order < 3:
        assert one.to_bytes()[0] == 1
    else:
        assert one.to_bytes()[(1 << order) // 8 - 1] == 1  # big endian


def test_lru_cache() -> None:
    c: LruCache[int, str] = LruCache(2)
    c.put(1, "a")
    c.put(2, "b")
    assert c.get(1) == "a"
    assert c.victim() == 2
    c.dirty.add(2)
    c.pop(2)
    assert 2 not in c and not c.dirty


def test_check_finds_and_repairs_leaks(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    with QcowFile.create(p, 1 << 20, cluster_size=4096) as img:
        img.write_at(b"x" * 10000, 0)
        reftable = img.header.refcount_table_offset
    # leak: give an unreferenced cluster (past the data) a refcount
    with open(p, "r+b") as f:
        f.seek(reftable)
        (block,) = struct.unpack(">Q", f.read(8))
        f.seek(block + 2 * 40)
        f.write(struct.pack(">H", 1))
        f.seek(0, os.SEEK_END)
        f.truncate(41 * 4096)
    with QcowFile.open(p) as img:
        res = img.check()
        assert res.leaks == 1 and res.corruptions == 0 and res.leaked_clusters == [40]
    # corruption: a data cluster whose refcount is 0
    with QcowFile.open(p) as img:
        l2 = struct.unpack(">Q", os.pread(img.fileno(), 8, img.header.l1_table_offset))[0]
        data = struct.unpack(">Q", os.pread(img.fileno(), 8, l2 & ~(1 << 63)))[0]
    cluster = (data & 0x00FF_FFFF_FFFF_FE00) // 4096
    with open(p, "r+b") as f:
        f.seek(block + 2 * cluster)
        f.write(struct.pack(">H", 0))
    with QcowFile.open(p) as img:
        res = img.check()
        assert res.corruptions >= 1 and res.refcount_errors == 1
    assert main(["check", str(p)]) == 1
    assert main(["check", "-r", "all", str(p)]) == 0
    with QcowFile.open(p) as img:
        assert img.check().ok
        assert img.read_at(0, 10000) == b"x" * 10000


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "in.raw"
    content = os.urandom(100_000) + bytes(200_000) + b"tail"
    raw.write_bytes(content)
    q = tmp_path / "out.qcow2"
    assert main(["convert", "-O", "qcow2", "--cluster-size", "4K", str(raw), str(q)]) == 0
    back = tmp_path / "back.raw"
    assert main(["convert", "-O", "raw", str(q), str(back)]) == 0
    assert back.read_bytes() == content
    assert qcow.detect_image_type(q) == "qcow2"
    assert main(["check", str(q)]) == 0
    assert main(["info", "--json", str(q)]) == 0
    out = capsys.readouterr().out
    assert '"virtual-size": 300004' in out
    assert main(["create", str(tmp_path / "n.qcow2"), "1G", "--refcount-bits", "4"]) == 0
    assert main(["create", str(tmp_path / "v2.qcow2"), "1M", "--compat", "0.10"]) == 0
    with QcowFile.open(tmp_path / "v2.qcow2") as img:
        assert img.header.version == 2
    capsys.readouterr()
    for bad in (
        [],
        ["frobnicate"],
        ["create"],
        ["create", str(tmp_path / "x.qcow2"), "12Q"],
        ["create", str(tmp_path / "x.qcow2"), "1M", "--cluster-size", "1000"],
        ["check", "-r", "sometimes", str(q)],
    ):
        assert main(bad) == 2, bad
        err = capsys.readouterr().err
        assert err.count("\n") == 1, (bad, err)
    assert main(["info", str(raw)]) == 1
    assert "not a qcow2 image" in capsys.readouterr().err


def test_python_dash_m(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qcow", "create", str(tmp_path / "a.qcow2")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1


def test_keep_fds_covers_the_chain(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(4096))
    QcowFile.create(tmp_path / "mid.qcow2", backing_file="base.raw", backing_format="raw").close()
    with QcowFile.create(tmp_path / "top.qcow2", backing_file="mid.qcow2") as top:
        fds = top.keep_fds()
        assert len(fds) == 3 and fds[0] == top.fileno()
        assert all(os.fstat(fd) for fd in fds)


def test_is_a_devices_disk_backend(tmp_path: Path) -> None:
    disk = pytest.importorskip("devices.virtio._disk")
    with QcowFile.create(tmp_path / "a.qcow2", 1 << 20) as img:
        assert isinstance(img, disk.DiskBackend)
    with disk.open_disk(tmp_path / "a.qcow2") as opened:
        assert isinstance(opened, QcowFile)


@given(
    order=st.integers(0, 6),
    used=st.sets(st.integers(0, 511)),
    start=st.integers(0, 511),
)
@settings(max_examples=300, deadline=None)
def test_refblock_find_zero(order: int, used: set[int], start: int) -> None:
    rb = RefBlock(order, bytes(64))
    n = rb.entries
    used = {u % n for u in used}
    start %= n
    for i in used:
        rb.set(i, 1)
    expected = next((i for i in range(start, n) if i not in used), -1)
    assert rb.find_zero(start) == expected


@pytest.mark.parametrize("version", [2, 3])
def test_grown_area_reads_zeros(tmp_path: Path, version: int) -> None:
    """Neither a larger backing file nor the tail of a partial last cluster shows through."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x5a" * (3 << 20))
    with QcowFile.create(
        tmp_path / "o.qcow2",
        (1 << 20) + 1000,
        cluster_size=4096,
        backing_file="base.raw",
        backing_format="raw",
        version=version,
    ) as img:
        img.write_at(b"\x01" * 100, (1 << 20) + 900)  # allocates the partial last cluster
        img.flush()
        # put garbage past the end of the disk inside that cluster (another writer could have)
        fd = img.fileno()
        l1 = struct.unpack(">Q", os.pread(fd, 8, img.header.l1_table_offset))[0]
        l2 = l1 & 0x00FF_FFFF_FFFF_FE00
        entry = struct.unpack(">Q", os.pread(fd, 8, l2 + 8 * 256))[0]
        host = entry & 0x00FF_FFFF_FFFF_FE00
        os.pwrite(fd, b"\xee" * 3096, host + 1000)
        img.resize(5 << 20)
        data = img.read_at(0, 5 << 20)
        assert img.check().ok
    assert data[: (1 << 20) + 900] == b"\x5a" * ((1 << 20) + 900)
    assert data[(1 << 20) + 900 : (1 << 20) + 1000] == b"\x01" * 100
    assert data[(1 << 20) + 1000 :] == bytes(len(data) - (1 << 20) - 1000)
    with QcowFile.open(tmp_path / "o.qcow2") as img:
        assert img.read_at(0, 5 << 20) == data
