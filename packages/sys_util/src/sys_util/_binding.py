"""The compiled cffi module ``sys_util._native`` and the few helpers that touch raw pointers.

Importing this module checks that the compiled module was built from this exact package version;
a stale ``.so`` left over from an older editable install would otherwise fail in subtle ways
(wrong struct layouts, missing functions) far from the cause.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from sys_util.__about__ import __version__

try:
    from sys_util._native import ffi, lib
except ImportError as err:  # pragma: no cover - only without a build
    raise ImportError(
        "sys_util._native is not built: install the package (pip install -e packages/sys_util) "
        "with a C compiler and the libc headers available"
    ) from err

__all__ = ["buffer_address", "check_version", "ffi", "lib", "raise_errno"]


def check_version(native_version: str, python_version: str) -> None:
    """Raise ImportError when the compiled module and the Python sources disagree."""
    if native_version != python_version:
        raise ImportError(
            f"sys_util._native was built for version {native_version}, but the Python package is "
            f"{python_version}: rebuild it (pip install --no-build-isolation -e packages/sys_util)"
        )


check_version(ffi.string(lib.PACKAGE_VERSION).decode(), __version__)


def raise_errno(call: str) -> None:
    """Raise the OSError for the errno the last cffi call left behind."""
    code = ffi.errno or errno.EIO
    raise OSError(code, f"{os.strerror(code)} (from {call})")


def buffer_address(buf: Any) -> int:
    """Return the address of the first byte of ``buf`` (an object with the buffer protocol).

    The address is only meaningful for as long as the owner of the memory keeps it where it is,
    which for an ``mmap`` means until it is unmapped; the caller must guarantee that.
    """
    # SAFETY: from_buffer borrows the buffer only while `ptr` lives; we read the address and
    # release the borrow before returning, so no pointer outlives this call. The integer we return
    # is not dereferenced here; its users (KVM_SET_USER_MEMORY_REGION) are documented to keep the
    # mapping alive while the kernel uses it.
    ptr = ffi.from_buffer("char[]", buf)
    try:
        return int(ffi.cast("uintptr_t", ptr))
    finally:
        ffi.release(ptr)
