"""The qcow2 header: parsing with validation, and in-place rewriting of its fixed fields.

The header is only ever rewritten field by field (``pwrite`` of the fixed part), never as a
whole cluster, so header extensions and unknown additional fields (anything past byte 104) are
preserved byte for byte by construction.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from qcow.errors import CorruptImage, InvalidImage, UnsupportedFeature

MAGIC = b"QFI\xfb"
V2_HEADER_LEN = 72
V3_HEADER_LEN = 104
# What we write for new version 3 images: the 104 mandatory bytes plus the compression_type byte,
# padded to a multiple of 8, as current qemu-img does.
V3_CREATE_HEADER_LEN = 112

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # qemu's implementation limit (2 MiB)
MAX_BACKING_NAME = 1023
MAX_L1_BYTES = 32 << 20  # qemu's limit on the active L1 table
MAX_REFTABLE_BYTES = 8 << 20  # qemu's limit on the refcount table
MAX_VIRTUAL_SIZE = 1 << 61

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3_EXTRA = struct.Struct(">QQQII")
assert _V2.size == V2_HEADER_LEN
assert _V2.size + _V3_EXTRA.size == V3_HEADER_LEN

FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)


@dataclass
class Extension:
    """One header extension as found in the file (kept verbatim)."""

    kind: int
    data: bytes


@dataclass
class Header:
    """The decoded header of a qcow2 image (both versions)."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LEN
    compression_type: int = 0
    extensions: list[Extension] = field(default_factory=list)
    backing_file: str | None = None
    backing_format: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    def pack_fixed(self) -> bytes:
        """The fixed fields (72 bytes for v2, 104 for v3); bytes past 104 are never rewritten."""
        head = _V2.pack(
            MAGIC,
            self.version,
            self.backing_file_offset,
            self.backing_file_size,
            self.cluster_bits,
            self.size,
            self.crypt_method,
            self.l1_size,
            self.l1_table_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
        )
        if self.version == 2:
            return head
        return head + _V3_EXTRA.pack(
            self.incompatible_features,
            self.compatible_features,
            self.autoclear_features,
            self.refcount_order,
            self.header_length,
        )

    def feature_name(self, table: int, bit: int) -> str:
        """The name of a feature bit, from the image's own feature table if it has one."""
        for ext in self.extensions:
            if ext.kind != EXT_FEATURE_TABLE:
                continue
            for pos in range(0, len(ext.data) - 47, 48):
                if ext.data[pos] == table and ext.data[pos + 1] == bit:
                    raw = ext.data[pos + 2 : pos + 48].split(b"\0", 1)[0]
                    return raw.decode("utf-8", "replace")
        for t, b, name in FEATURE_NAMES:
            if t == table and b == bit:
                return name
        kind = ("incompatible", "compatible", "autoclear")[table]
        return f"unknown {kind} feature bit {bit}"


def _pread_exact(fd: int, length: int, offset: int, what: str) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise CorruptImage(f"{what} extends past the end of the file", offset)
    return data


def read_header(fd: int, file_size: int) -> Header:
    """Read and validate the header of the image open on ``fd``.

    Raises :class:`InvalidImage` for a file that is not qcow2, :class:`UnsupportedFeature` for
    a valid image this library cannot handle, :class:`CorruptImage` for inconsistent fields.
    """
    raw = os.pread(fd, V3_HEADER_LEN, 0)
    if len(raw) < 4 or raw[:4] != MAGIC:
        raise InvalidImage("not a qcow2 image (bad magic)")
    if len(raw) < V2_HEADER_LEN:
        raise InvalidImage("qcow2 header is truncated")
    fields = _V2.unpack_from(raw)
    version = fields[1]
    if version not in (2, 3):
        raise UnsupportedFeature(f"qcow2 version {version}")
    hdr = Header(*fields[1:])
    if version == 3:
        if len(raw) < V3_HEADER_LEN:
            raise InvalidImage("qcow2 version 3 header is truncated")
        (
            hdr.incompatible_features,
            hdr.compatible_features,
            hdr.autoclear_features,
            hdr.refcount_order,
            hdr.header_length,
        ) = _V3_EXTRA.unpack_from(raw, V2_HEADER_LEN)
        if hdr.header_length < V3_HEADER_LEN or hdr.header_length % 8:
            raise InvalidImage(f"invalid header length {hdr.header_length}")
    _validate_scalars(hdr, file_size)
    if hdr.version == 3 and hdr.header_length > V3_HEADER_LEN:
        extra = _pread_exact(fd, 1, V3_HEADER_LEN, "header")
        hdr.compression_type = extra[0]
    _check_features(hdr)
    _read_extensions(fd, hdr)
    if hdr.backing_file_offset:
        name = _pread_exact(fd, hdr.backing_file_size, hdr.backing_file_offset, "backing name")
        hdr.backing_file = name.decode("utf-8", "surrogateescape")
    for ext in hdr.extensions:
        if ext.kind == EXT_BACKING_FORMAT:
            hdr.backing_format = ext.data.decode("utf-8", "replace")
    return hdr


def _validate_scalars(hdr: Header, file_size: int) -> None:
    if not MIN_CLUSTER_BITS <= hdr.cluster_bits <= MAX_CLUSTER_BITS:
        raise InvalidImage(f"cluster_bits {hdr.cluster_bits} outside 9..21")
    cs = hdr.cluster_size
    if hdr.version == 2:
        hdr.refcount_order = 4
    elif hdr.refcount_order > 6:
        raise InvalidImage(f"refcount_order {hdr.refcount_order} above 6")
    if hdr.header_length > cs:
        raise InvalidImage("header is larger than one cluster")
    if hdr.size > MAX_VIRTUAL_SIZE:
        raise InvalidImage(f"virtual size {hdr.size} is too large")
    if hdr.crypt_method != 0:
        raise UnsupportedFeature("encryption")
    l2_entries = cs // 8
    needed_l1 = -(-hdr.size // (cs * l2_entries))
    if hdr.l1_size < needed_l1:
        raise CorruptImage(f"L1 table has {hdr.l1_size} entries, {needed_l1} needed")
    if hdr.l1_size * 8 > MAX_L1_BYTES:
        raise InvalidImage(f"L1 table of {hdr.l1_size} entries is too large")
    if hdr.l1_size:
        _check_table(hdr.l1_table_offset, hdr.l1_size * 8, cs, file_size, "L1 table")
    if hdr.refcount_table_clusters == 0:
        raise CorruptImage("image has no refcount table")
    if hdr.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise InvalidImage("refcount table is too large")
    _check_table(
        hdr.refcount_table_offset,
        hdr.refcount_table_clusters * cs,
        cs,
        file_size,
        "refcount table",
    )
    if hdr.nb_snapshots:
        if hdr.snapshots_offset % cs or hdr.snapshots_offset < cs:
            raise CorruptImage("snapshot table offset invalid", hdr.snapshots_offset)
        if hdr.snapshots_offset >= file_size:
            raise CorruptImage("snapshot table past the end of the file", hdr.snapshots_offset)
        if hdr.nb_snapshots > 65536:
            raise InvalidImage(f"too many snapshots ({hdr.nb_snapshots})")
    if hdr.backing_file_offset:
        if hdr.backing_file_size > MAX_BACKING_NAME or hdr.backing_file_size == 0:
            raise InvalidImage(f"backing file name length {hdr.backing_file_size} invalid")
        if hdr.backing_file_offset + hdr.backing_file_size > cs:
            raise CorruptImage(
                "backing file name outside the first cluster", hdr.backing_file_offset
            )


def _check_table(offset: int, length: int, cs: int, file_size: int, what: str) -> None:
    if offset % cs:
        raise CorruptImage(f"{what} is not cluster aligned", offset)
    if offset < cs:
        raise CorruptImage(f"{what} overlaps the header", offset)
    if offset + length > file_size:
        raise CorruptImage(f"{what} extends past the end of the file", offset)


def _check_features(hdr: Header) -> None:
    known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT
    unsupported = hdr.incompatible_features & ~known
    if unsupported:
        bit = (unsupported & -unsupported).bit_length() - 1
        raise UnsupportedFeature(hdr.feature_name(0, bit))
    if hdr.compression_type != 0:
        raise UnsupportedFeature(f"compression type {hdr.compression_type}")


def _read_extensions(fd: int, hdr: Header) -> None:
    """Parse the extension area (bounded by the first cluster, or the backing name)."""
    start = hdr.header_length if hdr.version == 3 else V2_HEADER_LEN
    end = hdr.cluster_size
    if hdr.backing_file_offset and hdr.backing_file_offset >= start:
        end = min(end, hdr.backing_file_offset)
    area = os.pread(fd, max(0, end - start), start)
    pos = 0
    seen: set[int] = set()
    while pos + 8 <= len(area):
        kind, length = struct.unpack_from(">II", area, pos)
        if kind == EXT_END:
            return
        data_end = pos + 8 + length
        if data_end > len(area):
            raise CorruptImage("header extension runs past the extension area", start + pos)
        if kind in seen and kind in (EXT_BACKING_FORMAT, EXT_FEATURE_TABLE):
            raise CorruptImage(f"duplicate header extension {kind:#x}", start + pos)
        seen.add(kind)
        hdr.extensions.append(Extension(kind, bytes(area[pos + 8 : data_end])))
        pos = data_end + (-length % 8)
    # No terminator within the area: qemu treats that as the end too.


def pack_extensions(exts: list[Extension]) -> bytes:
    """Serialize extensions followed by the end marker, each padded to 8 bytes."""
    out = bytearray()
    for ext in exts:
        out += struct.pack(">II", ext.kind, len(ext.data)) + ext.data
        out += b"\0" * (-len(ext.data) % 8)
    out += struct.pack(">II", EXT_END, 0)
    return bytes(out)


def feature_table() -> bytes:
    """The feature name table extension payload qemu-img writes for new images."""
    out = bytearray()
    for table, bit, name in FEATURE_NAMES:
        out += bytes([table, bit]) + name.encode().ljust(46, b"\0")
    return bytes(out)
