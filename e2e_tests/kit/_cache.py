"""The kit's cache: ``~/.cache/pycrosvm/kit/`` (or ``$PYCROSVM_KIT_CACHE``), one directory or
file per artefact, named by a hash of everything that goes into it, so editing an input
(a patch, the config fragment, guest-init.sh, this code) builds a new artefact instead of
reusing a stale one. Builds run under an exclusive ``flock`` per artefact, so pytest-xdist
workers that all ask for the kernel build it once and the others wait.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["cache_dir", "input_key", "locked", "log"]

KIT_DIR = Path(__file__).resolve().parent


def cache_dir() -> Path:
    """Where built artefacts live (created on demand)."""
    env = os.environ.get("PYCROSVM_KIT_CACHE")
    if env:
        base = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "pycrosvm" / "kit"
    base.mkdir(parents=True, exist_ok=True)
    return base


def input_key(files: Iterable[Path | str], extra: Iterable[str] = ()) -> str:
    """A 16-hex-digit hash of the named kit files (path relative to the kit + contents) and of
    extra strings (package versions, modes)."""
    h = hashlib.sha256()
    for f in files:
        p = Path(f)
        p = p if p.is_absolute() else KIT_DIR / p
        try:
            rel = str(p.relative_to(KIT_DIR))
        except ValueError:
            rel = str(p)
        h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    for s in extra:
        h.update(s.encode() + b"\0")
    return h.hexdigest()[:16]


def log(msg: str) -> None:
    """Progress goes to stderr (pytest shows it with -s; the CLI always)."""
    print(f"[kit {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold the exclusive build lock of artefact ``name`` (blocks while another process builds
    it; the caller re-checks for the finished artefact after acquiring)."""
    locks = cache_dir() / "locks"
    locks.mkdir(exist_ok=True)
    fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process building {name}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
