"""Logging setup for the VMM and its device processes: stderr or syslog."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

__all__ = ["init_logging", "logging_fds", "reset_logging"]

_STDERR_FORMAT = "[%(asctime)s %(levelname)s %(name)s] %(message)s"
_installed: logging.Handler | None = None


def init_logging(
    *,
    syslog: bool = False,
    level: int | str = logging.INFO,
    ident: str = "crosvm",
    syslog_address: str = "/dev/log",
) -> logging.Handler:
    """Send the root logger's records to stderr (default) or to syslog as ``ident[pid]``.

    Calling it again replaces the handler installed by the previous call, so a forked device
    process can re-initialise with its own ident. Without a syslog socket (containers), logging
    falls back to stderr with a warning rather than failing to start the VMM.
    """
    global _installed
    reset_logging()
    root = logging.getLogger()
    handler: logging.Handler
    fallback = False
    if syslog:
        try:
            # SysLogHandler swallows a failed connect (and retries on every record), so check
            # for the socket first: an absent syslog must be visible, not silently drop logs.
            if not os.path.exists(syslog_address):
                raise FileNotFoundError(syslog_address)
            handler = logging.handlers.SysLogHandler(address=syslog_address)
            handler.ident = f"{ident}[{os.getpid()}]: "
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        except OSError:
            fallback = True
    if not syslog or fallback:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_STDERR_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    _installed = handler
    if fallback:
        logging.getLogger(__name__).warning(
            "syslog socket %s unavailable; logging to stderr", syslog_address
        )
    return handler


def logging_fds() -> list[int]:
    """File descriptors the installed handler needs (keep them open across a jail/fork)."""
    handler = _installed
    if isinstance(handler, logging.handlers.SysLogHandler):
        sock = getattr(handler, "socket", None)  # not in typeshed, but always set by __init__
        return [sock.fileno()] if sock is not None else []
    if isinstance(handler, logging.StreamHandler):
        try:
            return [handler.stream.fileno()]
        except (AttributeError, OSError, ValueError):
            return []
    return []


def reset_logging() -> None:
    """Remove (and close) the handler installed by :func:`init_logging`, if any."""
    global _installed
    if _installed is not None:
        logging.getLogger().removeHandler(_installed)
        _installed.close()
        _installed = None
