"""``Kvm``: the ``/dev/kvm`` system fd: capabilities, supported CPUID and MSRs, VM creation."""

from __future__ import annotations

import errno
import os
import weakref
from types import TracebackType

import kvm_sys
from kvm._cap import Cap
from kvm._ioctl import ioctl_ptr, ioctl_val, raise_errno
from kvm._state import CpuIdEntry, cpuid_from_struct
from kvm._vm import Vm
from kvm.errors import ApiVersionError
from kvm_sys import ffi, lib

__all__ = ["Kvm"]

_MAX_CPUID_ENTRIES = 256  # KVM_MAX_CPUID_ENTRIES; retried larger on E2BIG


class Kvm:
    """The KVM system fd. ``Kvm()`` opens ``/dev/kvm`` (``O_CLOEXEC``) and checks the API."""

    __slots__ = ("__weakref__", "_fd", "_finalizer", "_run_size")

    def __init__(self, path: str = "/dev/kvm") -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._adopt(fd)

    @classmethod
    def from_fd(cls, fd: int) -> Kvm:
        """Wrap an open ``/dev/kvm`` fd, taking ownership (e.g. one passed into a jail)."""
        self = cls.__new__(cls)
        self._adopt(fd)
        return self

    def _adopt(self, fd: int) -> None:
        self._fd = fd
        self._run_size = 0
        self._finalizer = weakref.finalize(self, os.close, fd)
        try:
            version = self.api_version()
        except BaseException:
            self.close()  # not a KVM fd: we own it, so it is closed, not leaked
            raise
        if version != kvm_sys.KVM_API_VERSION:
            self.close()
            raise ApiVersionError(version)

    # --- fd protocol ---------------------------------------------------------------------

    def fileno(self) -> int:
        if self._fd < 0:
            raise OSError(errno.EBADF, "kvm is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        self._fd = -1
        self._finalizer()

    def __enter__(self) -> Kvm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Kvm fd={self._fd}>"

    # --- queries -------------------------------------------------------------------------

    def api_version(self) -> int:
        return ioctl_val(self._fd, kvm_sys.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")

    def check_extension(self, cap: Cap | int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 if unsupported, else 1 or a cap-specific number."""
        return ioctl_val(self._fd, kvm_sys.KVM_CHECK_EXTENSION, int(cap), "KVM_CHECK_EXTENSION")

    @property
    def vcpu_mmap_size(self) -> int:
        """``KVM_GET_VCPU_MMAP_SIZE``: bytes to map of each vCPU fd (``kvm_run`` and after)."""
        if self._fd < 0:
            raise OSError(errno.EBADF, "kvm is closed")
        if not self._run_size:
            self._run_size = ioctl_val(
                self._fd, kvm_sys.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE"
            )
        return self._run_size

    def recommended_vcpus(self) -> int:
        return self.check_extension(Cap.NR_VCPUS) or 4

    def max_vcpus(self) -> int:
        return self.check_extension(Cap.MAX_VCPUS) or self.recommended_vcpus()

    def _cpuid(self, request: int, what: str) -> list[CpuIdEntry]:
        n = _MAX_CPUID_ENTRIES
        while True:
            c = ffi.new("struct kvm_cpuid2 *", {"entries": n})
            c.nent = n
            # SAFETY: `c` has room for nent == n entries; the kernel writes at most nent.
            r = lib.kvm_ioctl_ptr(self._fd, request, c)
            if r == -errno.E2BIG and n < 1 << 16:
                n *= 2
                continue
            if r < 0:
                raise_errno(-r, what)
            return cpuid_from_struct(c)

    def get_supported_cpuid(self) -> list[CpuIdEntry]:
        """``KVM_GET_SUPPORTED_CPUID``: what KVM can give a guest (filter it, then
        ``Vcpu.set_cpuid2``)."""
        return self._cpuid(kvm_sys.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID")

    def get_emulated_cpuid(self) -> list[CpuIdEntry]:
        """``KVM_GET_EMULATED_CPUID``: features KVM emulates in software."""
        return self._cpuid(kvm_sys.KVM_GET_EMULATED_CPUID, "KVM_GET_EMULATED_CPUID")

    def get_msr_index_list(self) -> list[int]:
        """``KVM_GET_MSR_INDEX_LIST``: the MSRs ``Vcpu.get_msrs`` can save/restore."""
        probe = ffi.new("struct kvm_msr_list *")
        # SAFETY: nmsrs == 0: the kernel only writes back the needed count (E2BIG).
        r = lib.kvm_ioctl_ptr(self._fd, kvm_sys.KVM_GET_MSR_INDEX_LIST, probe)
        if r < 0 and r != -errno.E2BIG:
            raise_errno(-r, "KVM_GET_MSR_INDEX_LIST")
        n = int(probe.nmsrs)
        c = ffi.new("struct kvm_msr_list *", {"indices": n})
        c.nmsrs = n
        # SAFETY: `c` has room for nmsrs indices; the kernel writes at most nmsrs (E2BIG otherwise).
        ioctl_ptr(self._fd, kvm_sys.KVM_GET_MSR_INDEX_LIST, c, "KVM_GET_MSR_INDEX_LIST")
        return [int(c.indices[i]) for i in range(min(int(c.nmsrs), n))]

    def create_vm(self, machine_type: int = 0) -> Vm:
        """``KVM_CREATE_VM``: a new, empty VM (fd is ``O_CLOEXEC``)."""
        run_size = self.vcpu_mmap_size
        fd = ioctl_val(self._fd, kvm_sys.KVM_CREATE_VM, machine_type, "KVM_CREATE_VM")
        return Vm(fd, run_size)
