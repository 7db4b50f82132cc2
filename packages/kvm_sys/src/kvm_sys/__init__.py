"""Raw KVM constants, struct layouts and ioctl numbers, compiled from <linux/kvm.h> with cffi.

This is the bottom layer, like rust-vmm's kvm-bindings: numbers and layouts only, no policy.
``ffi`` and ``lib`` are the compiled cffi module (API mode, so the C compiler fixed every struct
offset and ioctl number); every integer ``KVM_*`` constant of the header is also re-exported here
as a plain ``int``. The safe, friendly API is the ``kvm`` package.
"""

from kvm_sys.__about__ import __version__
from kvm_sys._native import ffi, lib
from kvm_sys.errors import Error, VersionMismatch


def _check_version() -> None:
    """Refuse a stale compiled module: its layouts could differ from what the Python expects."""
    built = ffi.string(lib.PACKAGE_VERSION).decode()
    if built != __version__:
        raise ImportError(str(VersionMismatch(built, __version__)))


_check_version()

from kvm_sys._constants import *  # noqa: E402, F403
from kvm_sys._constants import __all__ as _constant_names  # noqa: E402

__all__ = ["Error", "VersionMismatch", "__version__", "ffi", "lib", *_constant_names]
