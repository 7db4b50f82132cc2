"""Writing a new, empty qcow2 image.

Layout: cluster 0 holds the header, its extensions and the backing file name; then the refcount
table, the refcount blocks covering all of this metadata, and the (zeroed) L1 table. The file is
written under a temporary name and renamed into place, so a crash never leaves half an image at
``path``.
"""

from __future__ import annotations

import os
from array import array

from qcow import _header as H
from qcow._tables import RefBlock, encode_u64_table

__all__ = ["write_new_image"]


def write_new_image(
    path: str,
    size: int,
    *,
    cluster_size: int,
    backing_file: str | None,
    backing_format: str | None,
    refcount_bits: int,
    version: int,
    lazy_refcounts: bool,
) -> None:
    if size < 0 or size > H.MAX_VIRTUAL_SIZE:
        raise ValueError(f"invalid virtual size {size}")
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= (1 << H.MAX_CLUSTER_BITS):
        raise ValueError(f"cluster size {cluster_size} is not a power of two in 512..2M")
    if refcount_bits & (refcount_bits - 1) or not 1 <= refcount_bits <= 64:
        raise ValueError(f"refcount bits {refcount_bits} is not a power of two in 1..64")
    if version not in (2, 3):
        raise ValueError(f"version {version} is not 2 or 3")
    if version == 2 and (refcount_bits != 16 or lazy_refcounts):
        raise ValueError("version 2 images have 16-bit refcounts and no lazy refcounts")
    if backing_format is not None and backing_format not in ("raw", "qcow2"):
        raise ValueError(f"backing format {backing_format!r} is not raw or qcow2")
    cb = cluster_size.bit_length() - 1
    cs = cluster_size
    order = refcount_bits.bit_length() - 1
    l2_entries = cs // 8
    l1_size = -(-size // (cs * l2_entries))
    if l1_size * 8 > H.MAX_L1_BYTES:
        raise ValueError(f"virtual size {size} needs a larger cluster size")
    l1_clusters = -(-(l1_size * 8) // cs) if l1_size else 0

    # Cluster 0: header + extensions + backing name.
    exts: list[H.Extension] = []
    if backing_file is not None and backing_format is not None:
        exts.append(H.Extension(H.EXT_BACKING_FORMAT, backing_format.encode()))
    header_len = H.V3_CREATE_HEADER_LEN if version == 3 else H.V2_HEADER_LEN
    name = backing_file.encode() if backing_file is not None else b""
    if len(name) > H.MAX_BACKING_NAME:
        raise ValueError("backing file name is longer than 1023 bytes")
    if version == 3:
        with_table = [*exts, H.Extension(H.EXT_FEATURE_TABLE, H.feature_table())]
        if header_len + len(H.pack_extensions(with_table)) + len(name) <= cs:
            exts = with_table
    ext_area = H.pack_extensions(exts)
    if header_len + len(ext_area) + len(name) > cs:
        raise ValueError("header, extensions and backing name do not fit in one cluster")

    # Metadata clusters: reftable (t), refblocks (b), L1; all covered by the refblocks.
    entries_per_block = cs * 8 // refcount_bits
    t = b = 1
    while True:
        total = 1 + t + b + l1_clusters
        nb = -(-total // entries_per_block)
        nt = -(-(nb * 8) // cs)
        if (nb, nt) == (b, t):
            break
        b, t = nb, nt
    reftable_off = cs
    refblocks_off = reftable_off + t * cs
    l1_off = refblocks_off + b * cs
    total = 1 + t + b + l1_clusters

    hdr = H.Header(
        version=version,
        backing_file_offset=header_len + len(ext_area) if name else 0,
        backing_file_size=len(name),
        cluster_bits=cb,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=l1_off if l1_size else 0,
        refcount_table_offset=reftable_off,
        refcount_table_clusters=t,
        nb_snapshots=0,
        snapshots_offset=0,
        compatible_features=H.COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
        refcount_order=order,
        header_length=header_len,
    )
    cluster0 = bytearray(cs)
    fixed = hdr.pack_fixed()
    cluster0[: len(fixed)] = fixed
    cluster0[header_len : header_len + len(ext_area)] = ext_area
    if name:
        cluster0[hdr.backing_file_offset : hdr.backing_file_offset + len(name)] = name

    reftable = array("Q", bytes(t * cs))
    blocks = []
    for i in range(b):
        reftable[i] = refblocks_off + i * cs
        rb = RefBlock(order, bytes(cs))
        for c in range(i * entries_per_block, min(total, (i + 1) * entries_per_block)):
            rb.set(c - i * entries_per_block, 1)
        blocks.append(rb.to_bytes())

    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        data = bytes(cluster0) + encode_u64_table(reftable) + b"".join(blocks)
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], done)
        os.ftruncate(fd, total * cs)  # the L1 table: zeros
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
