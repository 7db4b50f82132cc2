"""A Minijail for Python: namespaces, pivot_root, capabilities and seccomp policies."""

from io_jail.__about__ import __version__
from io_jail.errors import Error

__all__ = ["Error", "__version__"]
