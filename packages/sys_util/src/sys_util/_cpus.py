"""Which host CPUs are online (for vCPU affinity and default vCPU counts)."""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path

from sys_util.errors import SysfsError

__all__ = ["number_of_online_cpus", "online_cpus", "parse_cpu_list", "read_online_cpus"]

_log = logging.getLogger(__name__)
_CPU_DIR = re.compile(r"cpu(\d+)")


def parse_cpu_list(text: str, path: str = "<cpu list>") -> tuple[int, ...]:
    """Parse the kernel's cpu list format (``"0-3,5,7-8\\n"``) into sorted CPU numbers."""
    cpus: set[int] = set()
    body = text.strip()
    if not body:
        raise SysfsError(path, "empty cpu list")
    for part in body.split(","):
        first, dash, last = part.partition("-")
        try:
            lo = int(first, 10)
            hi = int(last, 10) if dash else lo
        except ValueError:
            raise SysfsError(path, f"bad cpu list entry {part!r}") from None
        if lo < 0 or hi < lo:
            raise SysfsError(path, f"bad cpu range {part!r}")
        cpus.update(range(lo, hi + 1))
    return tuple(sorted(cpus))


def read_online_cpus(sysfs_root: str | os.PathLike[str] = "/sys") -> tuple[int, ...]:
    """The online CPUs according to ``sysfs_root``, uncached. See :func:`online_cpus`."""
    cpu_dir = Path(sysfs_root) / "devices" / "system" / "cpu"
    # 1. The summary file.
    summary = cpu_dir / "online"
    try:
        return parse_cpu_list(summary.read_text(), str(summary))
    except (OSError, SysfsError) as err:
        _log.debug("cannot use %s (%s); reading per-cpu files", summary, err)
    # 2. One directory per CPU. A missing cpuN/online means the CPU cannot be taken offline
    #    (cpu0 on x86 and ARM, or CONFIG_HOTPLUG_CPU=n), so it is online.
    try:
        entries = [
            (int(m.group(1)), p) for p in cpu_dir.iterdir() if (m := _CPU_DIR.fullmatch(p.name))
        ]
    except OSError as err:
        _log.debug("cannot list %s (%s)", cpu_dir, err)
        entries = []
    if entries:
        online: list[int] = []
        for number, path in sorted(entries):
            state_file = path / "online"
            try:
                state = state_file.read_text().strip()
            except FileNotFoundError:
                online.append(number)
                continue
            except OSError as err:
                _log.warning(
                    "cannot read %s (%s); assuming cpu%d is online", state_file, err, number
                )
                online.append(number)
                continue
            if state == "1":
                online.append(number)
            elif state != "0":
                _log.warning(
                    "unexpected %r in %s; assuming cpu%d is online", state, state_file, number
                )
                online.append(number)
        return tuple(online)
    # 3. No sysfs at all (a minimal container): trust the CPU count.
    count = os.cpu_count() or 1
    _log.warning("no cpu information under %s; assuming cpus 0-%d are online", cpu_dir, count - 1)
    return tuple(range(count))


@functools.cache
def online_cpus(sysfs_root: str = "/sys") -> tuple[int, ...]:
    """The host's online CPU numbers, sorted; computed once per ``sysfs_root`` and cached.

    Ladder: parse ``devices/system/cpu/online``; else read ``cpuN/online`` for each ``cpuN``
    directory (absent means online); else assume ``os.cpu_count()`` CPUs and log a warning.
    ``sysfs_root`` exists for tests (a fake tree); ``online_cpus.cache_clear()`` forgets results.
    """
    return read_online_cpus(sysfs_root)


def number_of_online_cpus() -> int:
    """How many host CPUs are online."""
    return len(online_cpus())
