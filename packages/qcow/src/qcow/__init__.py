"""A crash-safe qcow2 disk image library, interoperable with qemu-img."""

from qcow.__about__ import __version__
from qcow.errors import Error

__all__ = ["Error", "__version__"]
