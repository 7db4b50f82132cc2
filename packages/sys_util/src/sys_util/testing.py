"""Helpers for tests of sys_util and of the packages built on it (no pytest import here).

- :func:`closed_fd` gives a descriptor number that is certainly not open, for the "every method
  of an fd wrapper raises EBADF" tests each package writes.
- :func:`make_cpu_sysfs` builds a fake ``/sys/devices/system/cpu`` tree for
  :func:`sys_util.read_online_cpus`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["closed_fd", "make_cpu_sysfs"]


def closed_fd() -> int:
    """Return the number of a descriptor that was just closed.

    The number is free until this process opens something else, so use it at once (and never
    let an object that owns it close it: ``detach()`` it at the end of the test).
    """
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    os.close(fd)
    return fd


def make_cpu_sysfs(
    root: str | os.PathLike[str],
    *,
    online: str | None,
    cpus: Mapping[int, str | None],
) -> Path:
    """Create ``root/devices/system/cpu`` with an ``online`` summary (None: absent) and one
    ``cpuN`` directory per entry of ``cpus``, whose ``online`` file holds the given text (None:
    absent, as for cpu0 on x86). Returns ``root`` as a Path.
    """
    base = Path(root)
    cpu_dir = base / "devices" / "system" / "cpu"
    cpu_dir.mkdir(parents=True, exist_ok=True)
    if online is not None:
        (cpu_dir / "online").write_text(online)
    for number, state in cpus.items():
        directory = cpu_dir / f"cpu{number}"
        directory.mkdir(exist_ok=True)
        if state is not None:
            (directory / "online").write_text(state)
    return base
