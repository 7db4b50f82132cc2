"""``Vcpu``: one virtual CPU, its register state and its run loop.

The hot path is :meth:`Vcpu.run`: one compiled C call does ``KVM_RUN`` (releasing the GIL) and
packs the exit into an int; one dict lookup turns the common exits into an interned, immutable
exit object. Everything else (decoding rare exits, building new exit objects) is off that path.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import weakref
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Final

import kvm_sys
from kvm._exits import (
    Debug,
    FailEntry,
    Hlt,
    InternalError,
    Intr,
    IoIn,
    IoOut,
    IrqWindowOpen,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    Unknown,
    VcpuExit,
)
from kvm._ioctl import get_struct_bytes, ioctl_ptr, ioctl_val, raise_errno, set_struct_bytes
from kvm._state import (
    CpuIdEntry,
    Debugregs,
    Fpu,
    Lapic,
    MpState,
    Regs,
    Sregs,
    VcpuEvents,
    Xcrs,
    cpuid_from_struct,
    cpuid_to_struct,
)
from kvm.errors import MsrError, ReplyError
from kvm_sys import ffi, lib

__all__ = ["Vcpu", "kick_signal"]

_KICK_SIGNAL: Final = lib.kvm_kick_signal()
_handler_lock = threading.Lock()
_handler_installed = False

_RUN_SIZE_SNAPSHOT: Final = ffi.offsetof("struct kvm_run", "kvm_valid_regs")

_TAG_IO: Final = kvm_sys.KVM_EXIT_IO
_TAG_MMIO: Final = kvm_sys.KVM_EXIT_MMIO
_TAG_ERROR: Final = lib.KVM_CODE_ERROR
_TAG_UNKNOWN: Final = lib.KVM_CODE_UNKNOWN
_IO_OUT: Final = lib.KVM_CODE_IO_OUT
_IO_LONG: Final = lib.KVM_CODE_IO_LONG
_MMIO_WRITE: Final = lib.KVM_CODE_MMIO_WRITE

# Interned exits, keyed by the C side's exit code. Immutable, so safe to share between vCPUs and
# threads. Bounded: a guest that writes ever-new values to ports cannot grow it without limit.
_EXIT_CACHE: dict[int, VcpuExit] = {
    kvm_sys.KVM_EXIT_HLT: Hlt(),
    kvm_sys.KVM_EXIT_SHUTDOWN: Shutdown(),
    kvm_sys.KVM_EXIT_IRQ_WINDOW_OPEN: IrqWindowOpen(),
    kvm_sys.KVM_EXIT_INTR: Intr(),
}
_PINNED = len(_EXIT_CACHE)
_CACHE_LIMIT: Final = 4096

_run_c = lib.kvm_vcpu_run
_U64 = struct.Struct("<Q")


def kick_signal() -> int:
    """The signal ``Vcpu.kick()`` sends (``SIGRTMIN``); a no-op handler is installed for it."""
    return int(_KICK_SIGNAL)


def _install_kick_handler() -> None:
    global _handler_installed
    if _handler_installed:
        return
    with _handler_lock:
        if not _handler_installed:
            r = lib.kvm_install_kick_handler(_KICK_SIGNAL)
            if r < 0:
                raise OSError(-r, f"{os.strerror(-r)} (from sigaction)")
            _handler_installed = True


def _intern(code: int, exit_: VcpuExit) -> VcpuExit:
    if len(_EXIT_CACHE) >= _CACHE_LIMIT:
        for key in list(_EXIT_CACHE)[_PINNED:]:
            del _EXIT_CACHE[key]
    _EXIT_CACHE[code] = exit_
    return exit_


class Vcpu:
    """A vCPU fd with its ``kvm_run`` page mapped once. Create with ``Vm.create_vcpu(id)``.

    ``run()``, the register calls and ``set_*_data`` belong to the thread that runs the vCPU;
    ``kick()`` and ``close()`` may come from any thread (``close`` during a ``run`` defers the
    unmap until the run returns).
    """

    __slots__ = ("__weakref__", "_closed", "_fd", "_finalizer", "_h", "_snap", "id")

    def __init__(self, fd: int, vcpu_id: int, run_size: int) -> None:
        """Take ownership of ``fd`` (closed here if the ``kvm_run`` mmap fails)."""
        self.id = vcpu_id
        # Process-wide and idempotent. Installed before any run can exist, because kick() and a
        # close() during a run signal the vCPU thread, and SIGRTMIN's default action is to kill.
        _install_kick_handler()
        self._h = ffi.new("struct kvm_vcpu_handle *")
        # SAFETY: the handle lives as long as this object (and the finalizer's reference); the C
        # side maps run_size bytes, the size KVM_GET_VCPU_MMAP_SIZE reported.
        r = lib.kvm_vcpu_open(self._h, fd, run_size, _KICK_SIGNAL)
        if r < 0:
            os.close(fd)
            raise OSError(-r, f"{os.strerror(-r)} (from mmap of the vcpu fd)")
        self._fd = fd
        self._closed = False
        self._snap = ffi.new("struct kvm_run *")
        self._finalizer = weakref.finalize(self, lib.kvm_vcpu_close, self._h)

    # --- fd protocol ---------------------------------------------------------------------

    def fileno(self) -> int:
        if self._closed:
            raise OSError(errno.EBADF, "vcpu is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Unmap ``kvm_run`` and close the fd (idempotent)."""
        if not self._closed:
            self._closed = True
            self._fd = -1
            self._finalizer()

    def __enter__(self) -> Vcpu:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Vcpu {self.id} fd={self._fd}{' closed' if self._closed else ''}>"

    # --- running -------------------------------------------------------------------------

    def run(self) -> VcpuExit:
        """Run the guest until it exits to userspace; return the exit.

        Releases the GIL while in the guest. An interrupted run (``kick()``, a signal,
        ``immediate_exit``) returns :class:`Intr`. A failed ``KVM_RUN`` raises ``OSError``.
        """
        code = _run_c(self._h)
        try:
            return _EXIT_CACHE[code]
        except KeyError:
            return self._decode(code)

    def run_code(self) -> int:
        """The raw packed exit code of one run (see ``kvm_sys`` ``20_native.py``).

        For callers that dispatch on integers themselves; :meth:`run` is this plus one dict
        lookup, so most code should just call :meth:`run`.
        """
        code = int(_run_c(self._h))
        if code & 0xFF == _TAG_ERROR:
            raise_errno((code >> 8) & 0xFFFFFF, "KVM_RUN")
        return code

    def _decode(self, code: int) -> VcpuExit:
        tag = code & 0xFF
        if tag == _TAG_IO:
            port = (code >> 16) & 0xFFFF
            size = (code >> 12) & 0xF
            if code & _IO_LONG:
                return self._decode_long_io(port, size, bool(code & _IO_OUT))
            if code & _IO_OUT:
                data = ((code >> 32) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
                return _intern(code, IoOut(port, size, 1, data))
            return _intern(code, IoIn(port, size, 1))
        if tag == _TAG_MMIO:
            size = (code >> 12) & 0xF
            addr = int(self._h.aux0)
            if size > 8:
                return InternalError(-1, (addr, size))
            if code & _MMIO_WRITE:
                return MmioWrite(addr, _U64.pack(self._h.aux1)[:size])
            return MmioRead(addr, size)
        if tag == _TAG_ERROR:
            raise_errno((code >> 8) & 0xFFFFFF, "KVM_RUN")
        return self._decode_slow()

    def _read_run(self, offset: int, dst: Any, length: int) -> None:
        # SAFETY: dst is a cffi buffer of at least `length` bytes; C checks offset+length
        # against the mapping and holds a reference so the page stays mapped during the copy.
        r = lib.kvm_vcpu_read_run(self._h, offset, dst, length)
        if r < 0:
            raise_errno(-r, "kvm_run")

    def _decode_long_io(self, port: int, size: int, out: bool) -> VcpuExit:
        snap = self._snap
        self._read_run(0, snap, _RUN_SIZE_SNAPSHOT)
        count = int(snap.io.count)
        if not out:
            return IoIn(port, size, count)
        length = size * count
        buf = ffi.new("char[]", max(length, 1))
        self._read_run(int(snap.io.data_offset), buf, length)
        return IoOut(port, size, count, bytes(ffi.buffer(buf, length)))

    def _decode_slow(self) -> VcpuExit:
        snap = self._snap
        self._read_run(0, snap, _RUN_SIZE_SNAPSHOT)
        reason = int(snap.exit_reason)
        if reason == kvm_sys.KVM_EXIT_SYSTEM_EVENT:
            ev = snap.system_event
            return SystemEvent(int(ev.type), tuple(ev.data[0 : min(int(ev.ndata), 16)]))
        if reason == kvm_sys.KVM_EXIT_INTERNAL_ERROR:
            ie = snap.internal
            return InternalError(int(ie.suberror), tuple(ie.data[0 : min(int(ie.ndata), 16)]))
        if reason == kvm_sys.KVM_EXIT_FAIL_ENTRY:
            fe = snap.fail_entry
            return FailEntry(int(fe.hardware_entry_failure_reason), int(fe.cpu))
        if reason == kvm_sys.KVM_EXIT_DEBUG:
            d = snap.debug.arch
            return Debug(int(d.exception), int(d.pc), int(d.dr6), int(d.dr7))
        if reason in (kvm_sys.KVM_EXIT_HLT, kvm_sys.KVM_EXIT_SHUTDOWN):
            return Hlt() if reason == kvm_sys.KVM_EXIT_HLT else Shutdown()
        return Unknown(reason, int(snap.hw.hardware_exit_reason))

    def set_io_in_data(self, data: bytes | bytearray | memoryview) -> None:
        """Answer the pending :class:`IoIn`: exactly ``size * count`` bytes."""
        if type(data) is not bytes:
            data = bytes(data)
        # SAFETY: C copies len(data) bytes after checking the pending exit and the page bounds.
        r = lib.kvm_vcpu_set_io_data(self._h, data, len(data))
        if r < 0:
            self._reply_error(-r, "IoIn")

    def set_mmio_read_data(self, data: bytes | bytearray | memoryview) -> None:
        """Answer the pending :class:`MmioRead`: exactly ``size`` bytes."""
        if type(data) is not bytes:
            data = bytes(data)
        # SAFETY: as set_io_in_data; C checks mmio.len == len(data) <= 8.
        r = lib.kvm_vcpu_set_mmio_data(self._h, data, len(data))
        if r < 0:
            self._reply_error(-r, "MmioRead")

    @staticmethod
    def _reply_error(err: int, what: str) -> None:
        if err == errno.EPERM:
            raise ReplyError(f"no {what} exit is pending")
        if err == errno.EINVAL:
            raise ReplyError(f"wrong number of bytes for the pending {what}")
        raise OSError(err, os.strerror(err))

    @property
    def immediate_exit(self) -> bool:
        """``kvm_run.immediate_exit``: when set, the next run returns :class:`Intr` at once."""
        b = ffi.new("char[1]")
        self._read_run(1, b, 1)
        return bool(b[0] != b"\0")

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        r = lib.kvm_vcpu_set_immediate_exit(self._h, int(bool(value)))
        if r < 0:
            raise_errno(-r, "kvm_run")

    def kick(self) -> None:
        """Make the current (or else the next) ``run()`` of this vCPU return :class:`Intr`.

        Safe from any thread. Sets ``immediate_exit`` and, if the vCPU thread is inside
        ``KVM_RUN``, sends it :func:`kick_signal`. Call :meth:`setup_kick` in the vCPU thread
        first so that signal cannot interrupt anything but ``KVM_RUN``.
        """
        r = lib.kvm_vcpu_kick(self._h)
        if r < 0:
            raise OSError(-r, f"{os.strerror(-r)} (from kick)")

    def setup_kick(self) -> None:
        """Prepare the calling thread (the one that will ``run()``) for :meth:`kick`.

        Installs the no-op handler for :func:`kick_signal`, blocks that signal in this thread,
        and tells KVM (``KVM_SET_SIGNAL_MASK``) to unblock it only while in the guest; a kick
        that lands outside ``KVM_RUN`` stays pending and is consumed by the next run's
        :class:`Intr`, so it interrupts no other system call.
        """
        _install_kick_handler()
        r = lib.kvm_block_signal(_KICK_SIGNAL)
        if r < 0:
            raise OSError(-r, f"{os.strerror(-r)} (from pthread_sigmask)")
        r = lib.kvm_set_signal_mask_unblocking(self._fd, _KICK_SIGNAL)
        if r < 0:
            raise_errno(-r, "KVM_SET_SIGNAL_MASK")

    def set_signal_mask(self, blocked: Iterable[int] | None) -> None:
        """``KVM_SET_SIGNAL_MASK``: the signals blocked while in the guest (None: don't swap)."""
        if blocked is None:
            # SAFETY: a 12-byte kvm_signal_mask (len = 8, then the 8-byte sigset), or NULL.
            ioctl_ptr(self._fd, kvm_sys.KVM_SET_SIGNAL_MASK, ffi.NULL, "KVM_SET_SIGNAL_MASK")
            return
        bits = 0
        for sig in blocked:
            if not 1 <= sig <= 64:
                raise ValueError(f"bad signal number {sig}")
            bits |= 1 << (sig - 1)
        arg = ffi.new("char[]", 12)
        struct.pack_into("<IQ", ffi.buffer(arg), 0, 8, bits)
        # SAFETY: a 12-byte kvm_signal_mask (len = 8, then the 8-byte sigset), or NULL.
        ioctl_ptr(self._fd, kvm_sys.KVM_SET_SIGNAL_MASK, arg, "KVM_SET_SIGNAL_MASK")

    # --- register state ------------------------------------------------------------------

    def get_regs(self) -> Regs:
        c = ffi.new("struct kvm_regs *")
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_GET_REGS, c, "KVM_GET_REGS")
        return Regs._unpack(c)

    def set_regs(self, regs: Regs) -> None:
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_SET_REGS, regs._pack(), "KVM_SET_REGS")

    def get_sregs(self) -> Sregs:
        c = ffi.new("struct kvm_sregs *")
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_GET_SREGS, c, "KVM_GET_SREGS")
        return Sregs._unpack(c)

    def set_sregs(self, sregs: Sregs) -> None:
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_SET_SREGS, sregs._pack(), "KVM_SET_SREGS")

    def get_fpu(self) -> Fpu:
        c = ffi.new("struct kvm_fpu *")
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_GET_FPU, c, "KVM_GET_FPU")
        return Fpu._unpack(c)

    def set_fpu(self, fpu: Fpu) -> None:
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_SET_FPU, fpu._pack(), "KVM_SET_FPU")

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """Read MSRs; raises :class:`MsrError` naming the first one KVM refuses."""
        idx = list(indices)
        c = ffi.new("struct kvm_msrs *", {"entries": len(idx)})
        c.nmsrs = len(idx)
        for i, index in enumerate(idx):
            c.entries[i].index = index
        # SAFETY: `c` holds nmsrs == len(idx) entries, ffi.new'd to that count.
        n = ioctl_ptr(self._fd, kvm_sys.KVM_GET_MSRS, c, "KVM_GET_MSRS")
        if n != len(idx):
            raise MsrError(idx[n], n)
        return {idx[i]: int(c.entries[i].data) for i in range(n)}

    def set_msrs(self, msrs: Mapping[int, int]) -> None:
        """Write MSRs; raises :class:`MsrError` naming the first one KVM refuses."""
        items = list(msrs.items())
        c = ffi.new("struct kvm_msrs *", {"entries": len(items)})
        c.nmsrs = len(items)
        for i, (index, value) in enumerate(items):
            c.entries[i].index = index
            c.entries[i].data = value
        # SAFETY: `c` holds nmsrs == len(items) entries, ffi.new'd to that count.
        n = ioctl_ptr(self._fd, kvm_sys.KVM_SET_MSRS, c, "KVM_SET_MSRS")
        if n != len(items):
            raise MsrError(items[n][0], n)

    def set_cpuid2(self, entries: Iterable[CpuIdEntry]) -> None:
        """``KVM_SET_CPUID2``: the CPUID the guest sees (usually filtered from
        ``Kvm.get_supported_cpuid()``)."""
        # SAFETY: cpuid_to_struct sizes the flexible array to nent; alive across the call.
        ioctl_ptr(
            self._fd, kvm_sys.KVM_SET_CPUID2, cpuid_to_struct(list(entries)), "KVM_SET_CPUID2"
        )

    def get_cpuid2(self, max_entries: int = 256) -> list[CpuIdEntry]:
        c = ffi.new("struct kvm_cpuid2 *", {"entries": max_entries})
        c.nent = max_entries
        # SAFETY: `c` has room for nent == max_entries entries; the kernel writes at most nent.
        ioctl_ptr(self._fd, kvm_sys.KVM_GET_CPUID2, c, "KVM_GET_CPUID2")
        return cpuid_from_struct(c)

    def get_lapic(self) -> Lapic:
        c = ffi.new("struct kvm_lapic_state *")
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_GET_LAPIC, c, "KVM_GET_LAPIC")
        return Lapic(bytearray(ffi.buffer(c)))

    def set_lapic(self, lapic: Lapic) -> None:
        if len(lapic.regs) != kvm_sys.KVM_APIC_REG_SIZE:
            raise ValueError(f"LAPIC state must be {kvm_sys.KVM_APIC_REG_SIZE} bytes")
        c = ffi.new("struct kvm_lapic_state *")
        ffi.memmove(c, bytes(lapic.regs), kvm_sys.KVM_APIC_REG_SIZE)
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_SET_LAPIC, c, "KVM_SET_LAPIC")

    def get_mp_state(self) -> MpState:
        c = ffi.new("struct kvm_mp_state *")
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_GET_MP_STATE, c, "KVM_GET_MP_STATE")
        return MpState(c.mp_state)

    def set_mp_state(self, state: MpState | int) -> None:
        c = ffi.new("struct kvm_mp_state *", {"mp_state": int(state)})
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_SET_MP_STATE, c, "KVM_SET_MP_STATE")

    def get_xsave(self) -> bytes:
        """The 4 KiB XSAVE area (opaque: its layout follows the host's CPUID leaf 0xD)."""
        return get_struct_bytes(
            self._fd, kvm_sys.KVM_GET_XSAVE, "struct kvm_xsave", "KVM_GET_XSAVE"
        )

    def set_xsave(self, data: bytes) -> None:
        set_struct_bytes(self._fd, kvm_sys.KVM_SET_XSAVE, "struct kvm_xsave", data, "KVM_SET_XSAVE")

    def get_xcrs(self) -> Xcrs:
        c = ffi.new("struct kvm_xcrs *")
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_GET_XCRS, c, "KVM_GET_XCRS")
        n = min(int(c.nr_xcrs), kvm_sys.KVM_MAX_XCRS)
        return Xcrs({int(c.xcrs[i].xcr): int(c.xcrs[i].value) for i in range(n)}, int(c.flags))

    def set_xcrs(self, xcrs: Xcrs) -> None:
        if len(xcrs.values) > kvm_sys.KVM_MAX_XCRS:
            raise ValueError(f"at most {kvm_sys.KVM_MAX_XCRS} XCRs")
        c = ffi.new("struct kvm_xcrs *")
        c.nr_xcrs = len(xcrs.values)
        c.flags = xcrs.flags
        for i, (xcr, value) in enumerate(xcrs.values.items()):
            c.xcrs[i].xcr = xcr
            c.xcrs[i].value = value
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_SET_XCRS, c, "KVM_SET_XCRS")

    def get_vcpu_events(self) -> VcpuEvents:
        c = ffi.new("struct kvm_vcpu_events *")
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_GET_VCPU_EVENTS, c, "KVM_GET_VCPU_EVENTS")
        return VcpuEvents._unpack(c)

    def set_vcpu_events(self, events: VcpuEvents) -> None:
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_SET_VCPU_EVENTS, events._pack(), "KVM_SET_VCPU_EVENTS")

    def get_debugregs(self) -> Debugregs:
        c = ffi.new("struct kvm_debugregs *")
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_GET_DEBUGREGS, c, "KVM_GET_DEBUGREGS")
        db = (int(c.db[0]), int(c.db[1]), int(c.db[2]), int(c.db[3]))
        return Debugregs(db, int(c.dr6), int(c.dr7), int(c.flags))

    def set_debugregs(self, regs: Debugregs) -> None:
        c = ffi.new("struct kvm_debugregs *")
        for i, value in enumerate(regs.db):
            c.db[i] = value
        c.dr6, c.dr7, c.flags = regs.dr6, regs.dr7, regs.flags
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_SET_DEBUGREGS, c, "KVM_SET_DEBUGREGS")

    def set_guest_debug(self, control: int, debugreg: Iterable[int] = ()) -> None:
        """``KVM_SET_GUEST_DEBUG``: ``control`` is ``KVM_GUESTDBG_*`` bits; up to 8 DRs."""
        regs = list(debugreg)
        if len(regs) > 8:
            raise ValueError("at most 8 debug registers")
        c = ffi.new("struct kvm_guest_debug *")
        c.control = control
        for i, value in enumerate(regs):
            c.arch.debugreg[i] = value
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_SET_GUEST_DEBUG, c, "KVM_SET_GUEST_DEBUG")

    def kvmclock_ctrl(self) -> None:
        """Tell the guest's kvmclock it was paused (avoids soft-lockup warnings)."""
        ioctl_val(self._fd, kvm_sys.KVM_KVMCLOCK_CTRL, 0, "KVM_KVMCLOCK_CTRL")

    def interrupt(self, vector: int) -> None:
        """``KVM_INTERRUPT``: queue an external interrupt (only without in-kernel irqchip)."""
        c = ffi.new("struct kvm_interrupt *", {"irq": vector})
        # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
        ioctl_ptr(self._fd, kvm_sys.KVM_INTERRUPT, c, "KVM_INTERRUPT")

    def nmi(self) -> None:
        """``KVM_NMI``: queue an NMI."""
        ioctl_val(self._fd, kvm_sys.KVM_NMI, 0, "KVM_NMI")

    def enable_cap(self, cap: int, args: Iterable[int] = (), flags: int = 0) -> None:
        """``KVM_ENABLE_CAP`` on this vCPU."""
        _enable_cap(self._fd, cap, args, flags)

    def get_tsc_khz(self) -> int:
        return ioctl_val(self._fd, kvm_sys.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        ioctl_val(self._fd, kvm_sys.KVM_SET_TSC_KHZ, khz, "KVM_SET_TSC_KHZ")


def _enable_cap(fd: int, cap: int, args: Iterable[int], flags: int) -> None:
    values = list(args)
    if len(values) > 4:
        raise ValueError("KVM_ENABLE_CAP takes at most 4 arguments")
    c = ffi.new("struct kvm_enable_cap *")
    c.cap = cap
    c.flags = flags
    for i, value in enumerate(values):
        c.args[i] = value
    # SAFETY: `c` is ffi.new'd at the size this ioctl expects and outlives the call.
    ioctl_ptr(fd, kvm_sys.KVM_ENABLE_CAP, c, "KVM_ENABLE_CAP")
