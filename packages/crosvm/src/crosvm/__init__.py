"""crosvm in Python: a virtual machine monitor over KVM with sandboxed virtio devices."""

from crosvm.__about__ import __version__
from crosvm.errors import Error

__all__ = ["Error", "__version__"]
