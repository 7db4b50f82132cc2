"""Interoperability with the reference implementation (qemu-img / qemu-io)."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import qcow
from qcow import QcowFile

pytestmark = pytest.mark.qemu

Peer = Callable[..., Any]


def _read_all(path: Path | str) -> bytes:
    with QcowFile.open(path) as img:
        return img.read_at(0, img.virtual_size)


def _assert_clean(qemu_img: Peer, path: Path | str) -> None:
    proc = qemu_img("check", "--output=json", str(path), ok_codes=(0, 2, 3))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with QcowFile.open(path) as img:
        res = img.check()
    assert res.ok, res.messages


CLUSTER_SIZES = [1 << b for b in range(9, 22)]


@pytest.mark.parametrize("cluster_size", CLUSTER_SIZES)
def test_read_qemu_image_each_cluster_size(
    tmp_path: Path, qemu_img: Peer, qemu_io: Peer, raw_of: Peer, cluster_size: int
) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", str(img), "8M")
    qemu_io(
        str(img),
        "write -P 0x11 0 4k",
        "write -P 0x22 1000k 300k",
        "write -P 0x33 7M 1M",
        "write -z 1010k 20k",
    )
    expected = raw_of(img)
    assert _read_all(img) == expected
    # and we can write into it and stay consistent
    with QcowFile.open(img, writable=True) as q:
        q.write_at(b"\x44" * 5000, 3 << 20)
        q.write_at(b"\x55" * 100, 1000 * 1024 + 7)
    exp = bytearray(expected)
    exp[3 << 20 : (3 << 20) + 5000] = b"\x44" * 5000
    exp[1000 * 1024 + 7 : 1000 * 1024 + 107] = b"\x55" * 100
    _assert_clean(qemu_img, img)
    assert raw_of(img) == bytes(exp)


@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_widths(
    tmp_path: Path, qemu_img: Peer, qemu_io: Peer, raw_of: Peer, refcount_bits: int
) -> None:
    img = tmp_path / "r.qcow2"
    qemu_img(
        "create",
        "-f",
        "qcow2",
        "-o",
        f"refcount_bits={refcount_bits},cluster_size=4096",
        str(img),
        "4M",
    )
    qemu_io(str(img), "write -P 0x61 0 64k", "write -P 0x62 2M 8k")
    with QcowFile.open(img, writable=True) as q:
        q.write_at(b"\x63" * 20000, 100000)
        q.discard(0, 16384)
        q.write_zeroes(2 << 20, 4096)
    _assert_clean(qemu_img, img)
    assert raw_of(img) == _read_all(img)
    # an image we create with this width is readable by qemu
    ours = tmp_path / "ours.qcow2"
    with QcowFile.create(ours, 4 << 20, cluster_size=4096, refcount_bits=refcount_bits) as q:
        q.write_at(os.urandom(50000), 12345)
        data = q.read_at(0, 4 << 20)
    _assert_clean(qemu_img, ours)
    assert raw_of(ours) == data


def test_compat_010_and_preallocation(
    tmp_path: Path, qemu_img: Peer, qemu_io: Peer, raw_of: Peer
) -> None:
    v2 = tmp_path / "v2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", str(v2), "4M")
    qemu_io(str(v2), "write -P 0x71 0 100k", "write -z 8k 8k")
    assert _read_all(v2) == raw_of(v2)
    with QcowFile.open(v2, writable=True) as q:
        assert q.header.version == 2
        q.write_zeroes(0, 65536)
        q.write_at(b"z" * 3000, 70000)
    _assert_clean(qemu_img, v2)
    assert raw_of(v2) == _read_all(v2)
    assert _read_all(v2)[:65536] == bytes(65536)

    pre = tmp_path / "pre.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "preallocation=metadata", str(pre), "4M")
    assert _read_all(pre) == bytes(4 << 20)
    with QcowFile.open(pre, writable=True) as q:
        q.write_at(b"p" * 9000, 1 << 20)
    _assert_clean(qemu_img, pre)
    assert raw_of(pre) == _read_all(pre)


@pytest.mark.parametrize("cluster_size", [512, 65536, 2 << 20])
def test_compressed_clusters(
    tmp_path: Path, qemu_img: Peer, raw_of: Peer, cluster_size: int
) -> None:
    rng = random.Random(cluster_size)
    raw = tmp_path / "src.raw"
    content = bytearray(max(6 << 20, 6 * cluster_size))
    for _ in range(40):
        off = rng.randrange(0, len(content) - 70000)
        content[off : off + 60000] = bytes([rng.randrange(256)]) * 30000 + rng.randbytes(30000)
    raw.write_bytes(content)
    comp = tmp_path / "c.qcow2"
    qemu_img(
        "convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cluster_size}", str(raw), str(comp)
    )
    assert _read_all(comp) == bytes(content)
    # writes into compressed clusters copy-on-write them and free the compressed data
    with QcowFile.open(comp, writable=True) as q:
        q.write_at(b"W" * 1000, 5000)
        q.write_at(b"V" * cluster_size, 3 * cluster_size)
        q.discard(4 * cluster_size, 2 * cluster_size)
    content[5000:6000] = b"W" * 1000
    content[3 * cluster_size : 4 * cluster_size] = b"V" * cluster_size
    content[4 * cluster_size : 6 * cluster_size] = bytes(2 * cluster_size)
    _assert_clean(qemu_img, comp)
    assert raw_of(comp) == bytes(content)


def test_backing_chain(tmp_path: Path, qemu_img: Peer, qemu_io: Peer, raw_of: Peer) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x01" * (3 << 20))  # smaller than the overlays: zeros past it
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "sub" / "top.qcow2"
    top.parent.mkdir()
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(mid), "4M")
    qemu_io(str(mid), "write -P 0x02 1M 64k", "write -z 2M 64k")
    qemu_img("create", "-f", "qcow2", "-b", "../mid.qcow2", "-F", "qcow2", str(top), "5M")
    qemu_io(str(top), "write -P 0x03 1M 4k")
    expected = raw_of(top)
    assert _read_all(top) == expected
    # copy-on-write from the backing chain on partial writes
    with QcowFile.open(top, writable=True) as q:
        assert isinstance(q.backing, QcowFile)
        q.write_at(b"\x04" * 100, (1 << 20) + 8192)
        q.write_at(b"\x05" * 10, 100)
        q.write_zeroes(0, 65536)
        q.write_at(b"\x06" * 10, 65536 * 5 + 1)
    exp = bytearray(expected)
    exp[(1 << 20) + 8192 : (1 << 20) + 8292] = b"\x04" * 100
    exp[0:65536] = bytes(65536)
    exp[65536 * 5 + 1 : 65536 * 5 + 11] = b"\x06" * 10
    _assert_clean(qemu_img, top)
    assert raw_of(top) == bytes(exp)
    assert raw_of(mid) == raw_of(mid)  # untouched backing stays readable
    # our own create with a relative backing file and no size
    ours = tmp_path / "sub" / "ours.qcow2"
    with QcowFile.create(ours, backing_file="top.qcow2", backing_format="qcow2") as q:
        assert q.virtual_size == 5 << 20
        q.write_at(b"\x07" * 5, 3)
    exp[3:8] = b"\x07" * 5
    _assert_clean(qemu_img, ours)
    assert raw_of(ours) == bytes(exp)
    info = qemu_img("info", str(ours)).stdout
    assert "backing file format: qcow2" in info


def test_our_images_random_ops_pass_qemu_check(
    tmp_path: Path, qemu_img: Peer, raw_of: Peer
) -> None:
    rng = random.Random(1234)
    img = tmp_path / "ours.qcow2"
    size = 8 << 20
    model = bytearray(size)
    # 512-byte clusters with 64-bit refcounts: a refcount block covers only 64 clusters,
    # so the image grows past many refcount blocks and the refcount table itself.
    with QcowFile.create(img, size, cluster_size=512, refcount_bits=64) as q:
        for i in range(400):
            off = rng.randrange(size - 1)
            n = min(size - off, rng.randrange(1, 20000))
            op = rng.random()
            if op < 0.7:
                data = rng.randbytes(n)
                q.write_at(data, off)
                model[off : off + n] = data
            elif op < 0.85:
                q.discard(off, n)
                model[off : off + n] = bytes(n)
            else:
                q.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            if i % 50 == 0:
                q.flush()
        q.resize(size + (3 << 20))
        q.write_at(b"\xee" * 4096, size + (1 << 20))
        model += bytes(3 << 20)
        model[size + (1 << 20) : size + (1 << 20) + 4096] = b"\xee" * 4096
        assert q.header.refcount_table_clusters > 1
    _assert_clean(qemu_img, img)
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", str(img), str(raw))
    assert raw_of(img) == bytes(model)


def test_snapshots_are_left_intact(
    tmp_path: Path, qemu_img: Peer, qemu_io: Peer, raw_of: Peer
) -> None:
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "2M")
    qemu_io(str(img), "write -P 0x31 0 256k", "write -P 0x32 1M 8k")
    qemu_img("snapshot", "-c", "snap1", str(img))
    before = raw_of(img)
    with QcowFile.open(img, writable=True) as q:
        q.write_at(b"\x41" * 100, 10)  # shared cluster and shared L2: both copied
        q.write_at(b"\x42" * 8192, 1 << 20)
        q.discard(8192, 16384)
        q.write_zeroes(65536, 4096)
        now = q.read_at(0, q.virtual_size)
    _assert_clean(qemu_img, img)
    assert raw_of(img, "-l", "snapshot.name=snap1") == before
    assert raw_of(img) == now
    assert now[:10] == before[:10] and now[10:110] == b"\x41" * 100
    assert "snap1" in qemu_img("snapshot", "-l", str(img)).stdout


def test_header_extensions_preserved(tmp_path: Path, qemu_img: Peer) -> None:
    base = tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "1M")
    img = tmp_path / "o.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(img), "1M")
    head_before = img.read_bytes()[104:4096]
    with QcowFile.open(img, writable=True) as q:
        assert q.header.backing_format == "qcow2"
        names = {e.kind for e in q.header.extensions}
        assert 0x6803F857 in names and 0xE2792ACA in names
        q.write_at(b"x" * 70000, 0)
        q.resize(300 << 20)  # rewrites the header (new size, new L1 table)
    assert img.read_bytes()[104:4096] == head_before
    assert "backing file format: qcow2" in qemu_img("info", str(img)).stdout
    _assert_clean(qemu_img, img)


def test_lazy_refcounts_dirty_image_is_repaired(tmp_path: Path, qemu_img: Peer) -> None:
    img = tmp_path / "lazy.qcow2"
    with QcowFile.create(img, 4 << 20, lazy_refcounts=True) as q:
        q.write_at(b"a" * 200000, 0)
        q.flush()
        # simulate a crash: metadata flushed, refcounts not, dirty bit still set
        assert q.header.incompatible_features & 1
        dup = os.dup(q.fileno())
        snapshot = tmp_path / "crashed.qcow2"
        shutil.copyfile(f"/proc/self/fd/{dup}", snapshot)
        os.close(dup)
    proc = qemu_img("check", str(snapshot), ok_codes=(0, 2, 3))
    assert proc.returncode in (0, 2, 3)
    with QcowFile.open(snapshot, writable=True) as q:
        assert not q.header.incompatible_features & 1
        assert q.read_at(0, 200000) == b"a" * 200000
    _assert_clean(qemu_img, snapshot)
    _assert_clean(qemu_img, img)


def test_detect_image_type(tmp_path: Path) -> None:
    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(1024))
    q = tmp_path / "q.qcow2"
    QcowFile.create(q, 1 << 20).close()
    assert qcow.detect_image_type(raw) == "raw"
    assert qcow.detect_image_type(str(q)) == "qcow2"
    fd = os.open(q, os.O_RDONLY)
    try:
        assert qcow.detect_image_type(fd) == "qcow2"
    finally:
        os.close(fd)


def test_random_ops_with_two_snapshots(
    tmp_path: Path, qemu_img: Peer, qemu_io: Peer, raw_of: Peer
) -> None:
    img = tmp_path / "snaps.qcow2"
    size = 2 << 20
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=1024", str(img), str(size))
    qemu_io(str(img), "write -P 0x10 0 300k", "write -P 0x11 1M 100k", "write -z 40k 10k")
    qemu_img("snapshot", "-c", "s1", str(img))
    qemu_io(str(img), "write -P 0x20 100k 400k", "discard 1M 50k")
    qemu_img("snapshot", "-c", "s2", str(img))
    s1, s2 = raw_of(img, "-l", "snapshot.name=s1"), raw_of(img, "-l", "snapshot.name=s2")
    model = bytearray(raw_of(img))
    rng = random.Random(99)
    with QcowFile.open(img, writable=True) as q:
        for _ in range(150):
            off = rng.randrange(size - 1)
            n = min(size - off, rng.randrange(1, 6000))
            op = rng.random()
            if op < 0.7:
                data = rng.randbytes(n)
                q.write_at(data, off)
                model[off : off + n] = data
            elif op < 0.85:
                q.discard(off, n)
                model[off : off + n] = bytes(n)
            else:
                q.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
    _assert_clean(qemu_img, img)
    assert raw_of(img) == bytes(model)
    assert raw_of(img, "-l", "snapshot.name=s1") == s1
    assert raw_of(img, "-l", "snapshot.name=s2") == s2
    # qemu can still revert to a snapshot and delete one, and the image stays consistent
    qemu_img("snapshot", "-d", "s2", str(img))
    qemu_img("snapshot", "-a", "s1", str(img))
    _assert_clean(qemu_img, img)
    assert _read_all(img) == s1


def test_bitmaps_become_inconsistent_not_corrupt(
    tmp_path: Path, qemu_img: Peer, qemu_io: Peer
) -> None:
    img = tmp_path / "bm.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "4M")
    qemu_io(str(img), "write -P 1 0 64k")
    qemu_img("bitmap", "--add", str(img), "b0")
    qemu_io(str(img), "write -P 2 1M 64k")
    with QcowFile.open(img) as q:
        assert q.header.autoclear_features & 1
        assert q.check().ok  # the bitmap's clusters are accounted for
    with QcowFile.open(img, writable=True) as q:
        q.write_at(b"x" * 1000, 2 << 20)
        assert q.header.autoclear_features == 0  # cleared before the first write (spec)
    peer = qemu_img("check", str(img), ok_codes=(0, 3))
    with QcowFile.open(img) as q:
        res = q.check()
    assert res.corruptions == 0
    assert res.leaks == (peer.stdout + peer.stderr).count("Leaked cluster") > 0
    qemu_img("check", "-r", "leaks", str(img))
    _assert_clean(qemu_img, img)
