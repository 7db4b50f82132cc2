"""The ``qcow`` command: create, info, check and convert qcow2 images.

Bad usage prints one line on stderr and exits 2. ``check`` exits 0 for a clean image, 1 if it
found corruptions and 3 if it found leaks only (as qemu-img check does with 2 and 3; 2 is ours
for usage errors). Any qcow error exits 1 with a one-line message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from qcow._backing import detect_image_type
from qcow._qcow import DEFAULT_CLUSTER_SIZE, QcowFile
from qcow.errors import Error

__all__ = ["main"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_CHUNK = 1 << 20


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message}")


def parse_size(text: str) -> int:
    """A byte count with an optional K/M/G/T/P suffix (powers of 1024), as qemu-img takes."""
    body = text.rstrip("bB") if text[-1:] in "bB" and len(text) > 1 else text
    unit = body[-1:].upper() if body[-1:].isalpha() else ""
    digits = body[:-1] if unit else body
    if unit not in _UNITS or not digits.isdigit():
        raise _UsageError(f"qcow: invalid size {text!r}")
    return int(digits) * _UNITS[unit]


def _build_parser() -> _Parser:
    p = _Parser(prog="qcow", description="qcow2 image tool")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    c = sub.add_parser("create", help="create an empty image")
    c.add_argument("path")
    c.add_argument("size", nargs="?", help="virtual size (K/M/G/T suffixes)")
    c.add_argument("--cluster-size", default=str(DEFAULT_CLUSTER_SIZE))
    c.add_argument("-b", "--backing-file")
    c.add_argument("-F", "--backing-format", choices=("raw", "qcow2"))
    c.add_argument("--refcount-bits", type=int, default=16)
    c.add_argument("--compat", choices=("0.10", "1.1"), default="1.1")
    c.add_argument("--lazy-refcounts", action="store_true")
    i = sub.add_parser("info", help="describe an image")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    k = sub.add_parser("check", help="check refcounts and tables")
    k.add_argument("path")
    k.add_argument("-r", "--repair", choices=("leaks", "all"))
    k.add_argument("--json", action="store_true")
    v = sub.add_parser("convert", help="copy an image between raw and qcow2")
    v.add_argument("src")
    v.add_argument("dst")
    v.add_argument("-O", "--output-format", choices=("raw", "qcow2"), default="qcow2")
    v.add_argument("--cluster-size", default=str(DEFAULT_CLUSTER_SIZE))
    return p


def _cmd_create(a: argparse.Namespace) -> int:
    if a.size is None and a.backing_file is None:
        raise _UsageError("qcow create: SIZE is required without --backing-file")
    size = parse_size(a.size) if a.size is not None else None
    try:
        QcowFile.create(
            a.path,
            size,
            cluster_size=parse_size(a.cluster_size),
            backing_file=a.backing_file,
            backing_format=a.backing_format,
            refcount_bits=a.refcount_bits,
            version=2 if a.compat == "0.10" else 3,
            lazy_refcounts=a.lazy_refcounts,
        ).close()
    except ValueError as err:
        raise _UsageError(f"qcow create: {err}") from err
    return 0


def _cmd_info(a: argparse.Namespace) -> int:
    with QcowFile.open(a.path) as img:
        hdr = img.header
        info = {
            "filename": a.path,
            "format": "qcow2",
            "virtual-size": img.virtual_size,
            "disk-size": os.stat(a.path).st_blocks * 512,
            "allocated-bytes": img.allocated_bytes(),
            "cluster-size": img.cluster_size,
            "compat": "1.1" if hdr.version == 3 else "0.10",
            "refcount-bits": hdr.refcount_bits,
            "lazy-refcounts": bool(hdr.compatible_features & 1),
            "dirty": bool(hdr.incompatible_features & 1),
            "corrupt": bool(hdr.incompatible_features & 2),
            "snapshots": hdr.nb_snapshots,
            "backing-filename": hdr.backing_file,
            "backing-format": hdr.backing_format,
        }
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if value is not None:
                print(f"{key}: {value}")
    return 0


def _cmd_check(a: argparse.Namespace) -> int:
    with QcowFile.open(a.path, writable=a.repair is not None) as img:
        res = img.check(repair=a.repair is not None)
        if res.repaired:
            res = img.check()
    if a.json:
        print(
            json.dumps(
                {
                    "corruptions": res.corruptions,
                    "leaks": res.leaks,
                    "allocated-clusters": res.allocated_clusters,
                    "total-clusters": res.total_clusters,
                    "image-end-offset": res.image_end_offset,
                }
            )
        )
    else:
        for msg in res.messages:
            print(msg)
        if res.ok:
            print("No errors were found on the image.")
        else:
            print(f"{res.corruptions} errors and {res.leaks} leaked clusters were found.")
        print(f"{res.allocated_clusters}/{res.total_clusters} allocated clusters")
        print(f"Image end offset: {res.image_end_offset}")
    if res.corruptions:
        return 1
    return 3 if res.leaks else 0


def _cmd_convert(a: argparse.Namespace) -> int:
    src_kind = detect_image_type(a.src)
    src_size = 0
    if src_kind == "qcow2":
        opened = QcowFile.open(a.src)
        src: QcowFile | None = opened
        src_size = opened.virtual_size
        raw_fd = -1
    else:
        src = None
        raw_fd = os.open(a.src, os.O_RDONLY | os.O_CLOEXEC)
        src_size = os.fstat(raw_fd).st_size
    try:
        buf = bytearray(_CHUNK)
        zero = bytes(_CHUNK)
        if a.output_format == "qcow2":
            cs = parse_size(a.cluster_size)
            with QcowFile.create(a.dst, src_size, cluster_size=cs) as dst:
                _copy(src, raw_fd, src_size, buf, zero, lambda mv, off: dst.write_at(mv, off))
        else:
            fd = os.open(a.dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(fd, src_size)
                _copy(src, raw_fd, src_size, buf, zero, lambda mv, off: os.pwrite(fd, mv, off))
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        if src is not None:
            src.close()
        if raw_fd >= 0:
            os.close(raw_fd)
    return 0


def _copy(
    src: QcowFile | None,
    raw_fd: int,
    size: int,
    buf: bytearray,
    zero: bytes,
    write: object,
) -> None:
    """Copy ``size`` bytes in 1 MiB chunks, skipping all-zero chunks (the output is sparse)."""
    assert callable(write)
    view = memoryview(buf)
    off = 0
    while off < size:
        n = min(len(buf), size - off)
        chunk = view[:n]
        if src is not None:
            src.readinto_at(chunk, off)
        else:
            got = os.preadv(raw_fd, [chunk], off)
            if got < n:
                chunk[got:] = zero[: n - got]
        if chunk != zero[:n]:
            # write only the non-zero 64 KiB pieces: the output stays sparse
            step = 65536
            for sub in range(0, n, step):
                piece = chunk[sub : sub + step]
                if piece != zero[: len(piece)]:
                    write(piece, off + sub)
        off += n


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qcow`` / ``python -m qcow``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        a = _build_parser().parse_args(args)
        handler = {
            "create": _cmd_create,
            "info": _cmd_info,
            "check": _cmd_check,
            "convert": _cmd_convert,
        }[a.cmd]
        return handler(a)
    except _UsageError as err:
        print(str(err).splitlines()[0], file=sys.stderr)
        return 2
    except Error as err:
        print(f"qcow: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"qcow: {err.filename or ''}: {err.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
