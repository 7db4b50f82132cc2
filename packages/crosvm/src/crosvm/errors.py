"""Errors raised by the crosvm command. Every error of this package derives from :class:`Error`.

The command line maps them to exit statuses: a :class:`ConfigError` is the user's mistake (one
line on stderr, exit status 2, like any usage error); a :class:`VmError` is a VM that could not be
built or died (one line, exit status 1).
"""

from __future__ import annotations


class Error(Exception):
    """Base class of every crosvm error."""


class ConfigError(Error):
    """A bad command line: unknown option, bad value, missing file. Exit status 2."""


class VmError(Error):
    """The VM could not be built or run: KVM refused, a device failed, the guest crashed."""


class ControlError(Error):
    """A control command could not reach the VM (missing socket, dead VM, bad reply)."""
