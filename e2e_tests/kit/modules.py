"""Kernel module dependencies read from the ``.ko`` files themselves.

A Debian kernel package ships no ``modules.dep`` (``depmod`` writes it at install time, and we
do not install the package), but every module records its dependencies in its ``.modinfo``
ELF section as ``depends=a,b``. That is all :func:`module_closure` needs to list the modules to
``insmod``, dependencies first.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

__all__ = ["ModuleError", "modinfo", "module_closure"]


class ModuleError(Exception):
    """A wanted module is neither a .ko in the package nor built into the kernel."""


def modinfo(ko: Path) -> dict[str, str]:
    """The ``key=value`` pairs of a module's ``.modinfo`` section (last value wins)."""
    data = ko.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ModuleError(f"{ko} is not an ELF64 module")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize
        )
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name : end] == b".modinfo":
            info: dict[str, str] = {}
            for item in data[off : off + size].split(b"\0"):
                if b"=" in item:
                    k, v = item.decode(errors="replace").split("=", 1)
                    info[k] = v
            return info
    return {}


def _norm(name: str) -> str:
    return name.replace("-", "_")


def module_closure(moddir: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """``(name, path)`` of the wanted modules and their dependencies, dependencies first.

    ``moddir`` is ``lib/modules/<release>`` of an unpacked kernel package. Wanted modules that
    are built into the kernel (listed in ``modules.builtin``) are skipped.
    """
    kos = {_norm(p.name.removesuffix(".ko")): p for p in moddir.rglob("*.ko")}
    builtin_file = moddir / "modules.builtin"
    builtin = set()
    if builtin_file.exists():
        builtin = {
            _norm(Path(line.strip()).name.removesuffix(".ko"))
            for line in builtin_file.read_text().splitlines()
            if line.strip()
        }
    order: list[tuple[str, Path]] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in chain:
            raise ModuleError(f"dependency cycle: {' -> '.join((*chain, name))}")
        if name not in kos:
            if name in builtin:
                done.add(name)
                return
            raise ModuleError(f"module {name} is neither in the package nor built in")
        deps = [d for d in modinfo(kos[name]).get("depends", "").split(",") if d]
        for dep in deps:
            visit(_norm(dep), (*chain, name))
        done.add(name)
        order.append((name, kos[name]))

    for w in wanted:
        visit(_norm(w), ())
    return order
