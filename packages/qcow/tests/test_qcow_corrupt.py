"""Hostile images: every malformed header or table gives a QcowError and modifies nothing."""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

import qcow
from qcow import QcowFile

CS = 65536


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _patch(path: Path, offset: int, fmt: str, *values: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def _read_u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        value: int = struct.unpack(">Q", f.read(8))[0]
        return value


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 4 MiB image with cluster 0 and cluster 3 allocated (one L2 table)."""
    path = tmp_path / "img.qcow2"
    with QcowFile.create(path, 4 << 20) as q:
        q.write_at(b"\xaa" * CS, 0)
        q.write_at(b"\xbb" * CS, 3 * CS)
    return path


def _l2_offset(path: Path) -> int:
    l1_off = _read_u64(path, 40)
    return _read_u64(path, l1_off) & 0x00FF_FFFF_FFFF_FE00


def _attempt_everything(path: Path) -> list[type[BaseException]]:
    """Try to open writable, read, write, discard; collect the errors raised."""
    errors: list[type[BaseException]] = []
    try:
        q = QcowFile.open(path, writable=True)
    except qcow.QcowError as err:
        return [type(err)]
    with q:
        for op in (
            lambda: q.read_at(0, 4 << 20),
            lambda: q.write_at(b"\x11" * (3 * CS), 0),
            lambda: q.write_at(b"\x11" * 100, CS + 5),
            lambda: q.discard(0, 4 << 20),
            lambda: q.write_zeroes(0, 4 << 20),
        ):
            try:
                op()
            except qcow.QcowError as err:
                errors.append(type(err))
    return errors


HEADER_CASES: list[tuple[str, int, str, int, type[qcow.QcowError]]] = [
    ("bad magic", 0, ">I", 0x514649FC, qcow.InvalidImage),
    ("version 1", 4, ">I", 1, qcow.UnsupportedFeature),
    ("version 4", 4, ">I", 4, qcow.UnsupportedFeature),
    ("cluster_bits 8", 20, ">I", 8, qcow.InvalidImage),
    ("cluster_bits 22", 20, ">I", 22, qcow.InvalidImage),
    ("huge size", 24, ">Q", 1 << 62, qcow.InvalidImage),
    ("size beyond L1", 24, ">Q", 1 << 40, qcow.CorruptImage),
    ("encryption", 32, ">I", 1, qcow.UnsupportedFeature),
    ("huge l1_size", 36, ">I", 1 << 30, qcow.InvalidImage),
    ("L1 past EOF", 40, ">Q", 1 << 40, qcow.CorruptImage),
    ("L1 in header", 40, ">Q", 0, qcow.CorruptImage),
    ("L1 misaligned", 40, ">Q", 3 * CS + 512, qcow.CorruptImage),
    ("reftable past EOF", 48, ">Q", 1 << 40, qcow.CorruptImage),
    ("reftable in header", 48, ">Q", 0, qcow.CorruptImage),
    ("reftable misaligned", 48, ">Q", CS + 8, qcow.CorruptImage),
    ("no reftable", 56, ">I", 0, qcow.CorruptImage),
    ("huge reftable", 56, ">I", 1 << 20, qcow.InvalidImage),
    ("snapshots misaligned", 60, ">IQ", 1, qcow.CorruptImage),
    ("external data file", 72, ">Q", 1 << 2, qcow.UnsupportedFeature),
    ("compression type", 72, ">Q", 1 << 3, qcow.UnsupportedFeature),
    ("extended L2", 72, ">Q", 1 << 4, qcow.UnsupportedFeature),
    ("unknown incompatible bit", 72, ">Q", 1 << 40, qcow.UnsupportedFeature),
    ("refcount_order 7", 96, ">I", 7, qcow.InvalidImage),
    ("header_length 100", 100, ">I", 100, qcow.InvalidImage),
    ("header_length odd", 100, ">I", 108 + 1, qcow.InvalidImage),
]


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "error"),
    [c[1:] for c in HEADER_CASES],
    ids=[c[0] for c in HEADER_CASES],
)
def test_bad_header_fields(
    image: Path, offset: int, fmt: str, value: int, error: type[qcow.QcowError]
) -> None:
    if fmt == ">IQ":
        _patch(image, offset, ">IQ", value, CS + 100)
    else:
        _patch(image, offset, fmt, value)
    before = _digest(image)
    for writable in (False, True):
        with pytest.raises(error):
            QcowFile.open(image, writable=writable)
    assert _digest(image) == before


def test_unknown_feature_named_from_feature_table(image: Path) -> None:
    _patch(image, 72, ">Q", 1 << 4)
    with pytest.raises(qcow.UnsupportedFeature, match="extended L2"):
        QcowFile.open(image)
    assert isinstance(qcow.UnsupportedFeature("x"), OSError)


ENTRY_CASES: list[tuple[str, Callable[[int], int]]] = [
    ("past EOF", lambda e: (1 << 40) | (1 << 63)),
    ("into header", lambda e: 1 << 63),
    ("reserved bits", lambda e: e | (1 << 57)),
    ("misaligned", lambda e: e | 0x200),
    ("compressed past EOF", lambda e: (1 << 62) | (1 << 40)),
    ("compressed garbage", lambda e: (1 << 62) | 512),
]


@pytest.mark.parametrize("mutate", [c[1] for c in ENTRY_CASES], ids=[c[0] for c in ENTRY_CASES])
def test_bad_l2_entry_never_modifies_the_file(image: Path, mutate: Callable[[int], int]) -> None:
    l2 = _l2_offset(image)
    entry3 = _read_u64(image, l2 + 3 * 8)
    # guest cluster 1 gets the corrupt entry (a healthy cluster 3 serves as material)
    _patch(image, l2 + 8, ">Q", mutate(entry3))
    before = _digest(image)
    errors = _attempt_everything(image)
    assert errors, "no operation noticed the corrupt entry"
    assert all(issubclass(e, qcow.CorruptImage) for e in errors), errors
    assert _digest(image) == before
    # clusters that do not touch the bad entry still work, read-only
    with QcowFile.open(image) as q:
        assert q.read_at(3 * CS, 4) == b"\xbb" * 4
        assert q.read_at(0, 4) == b"\xaa" * 4


@pytest.mark.parametrize("where", ["L1 past EOF", "L1 into header", "L1 reserved", "reftable"])
def test_bad_table_pointers(image: Path, where: str) -> None:
    l1_off = _read_u64(image, 40)
    if where == "L1 past EOF":
        _patch(image, l1_off, ">Q", (1 << 63) | (1 << 40))
    elif where == "L1 into header":
        _patch(image, l1_off, ">Q", 1 << 63)
    elif where == "L1 reserved":
        _patch(image, l1_off, ">Q", _read_u64(image, l1_off) | 1)
    else:
        rt = _read_u64(image, 48)
        _patch(image, rt, ">Q", 1 << 40)
    before = _digest(image)
    errors = _attempt_everything(image)
    assert errors and all(issubclass(e, qcow.CorruptImage) for e in errors)
    assert _digest(image) == before


def test_compressed_cluster_that_does_not_inflate(tmp_path: Path) -> None:
    path = tmp_path / "c.qcow2"
    with QcowFile.create(path, 1 << 20, cluster_size=4096) as q:
        q.write_at(b"\x01" * 4096, 0)
    l2 = _l2_offset(path)
    # append a bogus "compressed" payload and point cluster 0 at it
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(zlib.compress(b"short")[2:] + bytes(600))
    x = 62 - (12 - 8)
    _patch(path, l2, ">Q", (1 << 62) | (1 << x) | size)
    with QcowFile.open(path) as q, pytest.raises(qcow.CorruptImage):
        q.read_at(0, 10)


def test_corrupt_bit_allows_read_only(image: Path) -> None:
    _patch(image, 72, ">Q", 1 << 1)
    before = _digest(image)
    with pytest.raises(qcow.CorruptImage):
        QcowFile.open(image, writable=True)
    with QcowFile.open(image) as q:
        assert q.read_at(0, 2) == b"\xaa\xaa"
    assert _digest(image) == before


def test_backing_problems(tmp_path: Path) -> None:
    a = tmp_path / "a.qcow2"
    b = tmp_path / "b.qcow2"
    QcowFile.create(b, 1 << 20).close()
    QcowFile.create(a, 1 << 20, backing_file="b.qcow2", backing_format="qcow2").close()
    # make b point back to a: a loop
    b.unlink()
    QcowFile.create(b, 1 << 20).close()
    with open(b, "r+b") as f:
        f.seek(0)
        hdr = bytearray(f.read(CS))
    name = b"a.qcow2"
    hdr[8:20] = struct.pack(">QI", 1024, len(name))
    hdr[1024 : 1024 + len(name)] = name
    b.write_bytes(bytes(hdr) + b.read_bytes()[CS:])
    with pytest.raises(qcow.InvalidChain, match="loop"):
        QcowFile.open(a)
    b.unlink()
    with pytest.raises(qcow.InvalidChain, match="not found"):
        QcowFile.open(a)


def test_short_file(tmp_path: Path) -> None:
    p = tmp_path / "short.qcow2"
    p.write_bytes(b"QFI\xfb\x00\x00")
    with pytest.raises(qcow.InvalidImage):
        QcowFile.open(p)
    p.write_bytes(b"")
    with pytest.raises(qcow.InvalidImage):
        QcowFile.open(p)


@pytest.mark.parametrize("target", ["refcount table", "L1 table", "L2 table", "refcount block"])
def test_data_cluster_aliasing_metadata_is_never_written(image: Path, target: str) -> None:
    """A COPIED entry pointing at metadata (refcount 1) must not be written through."""
    l2 = _l2_offset(image)
    where = {
        "refcount table": _read_u64(image, 48),
        "L1 table": _read_u64(image, 40),
        "L2 table": l2,
        "refcount block": _read_u64(image, _read_u64(image, 48)),
    }[target]
    _patch(image, l2 + 8, ">Q", (1 << 63) | where)
    before = _digest(image)
    with QcowFile.open(image, writable=True) as q:
        with pytest.raises(qcow.CorruptImage, match="metadata"):
            q.write_at(b"\xff" * 512, CS)
        with pytest.raises(qcow.CorruptImage, match="metadata"):
            q.write_at(b"\xff" * 3 * CS, 0)
        assert _digest(image) == before
        q.write_at(b"\x01" * 10, 2 * CS)  # elsewhere writes still work
        assert q.read_at(2 * CS, 10) == b"\x01" * 10
    assert _digest(image) != before


def test_hostile_snapshot_table_is_bounded(image: Path) -> None:
    """Thousands of snapshots with huge L1 tables: refused quickly, not read."""
    size = image.stat().st_size
    table_off = -(-size // CS) * CS
    entries = b"".join(
        struct.pack(">QIHHIIQII", (k + 1) * CS, 4 << 20, 0, 0, 0, 0, 0, 0, 0) for k in range(1000)
    )
    with open(image, "r+b") as f:
        f.seek(table_off)
        f.write(entries)
    _patch(image, 60, ">IQ", 1000, table_off)
    before = _digest(image)
    for writable in (False, True):
        with pytest.raises(qcow.InvalidImage, match="snapshot"):
            QcowFile.open(image, writable=writable)
    assert _digest(image) == before
