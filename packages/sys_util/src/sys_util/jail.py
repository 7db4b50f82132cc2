"""Raw jail syscalls as safe functions: namespaces, mounts, pivot_root, capabilities, seccomp.

These are the building blocks of :mod:`io_jail` (the policy logic lives there); this module only
turns each syscall into a typed function that raises ``OSError(errno, "... (from <call>)")``.
Nothing here is reversible: call them in a forked child that is about to be jailed.
"""

from __future__ import annotations

import os
from typing import Any

from sys_util._binding import ffi, lib, raise_errno

__all__ = [
    "AUDIT_ARCH_X86_64",
    "CLONE_NEWCGROUP",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUSER",
    "CLONE_NEWUTS",
    "MNT_DETACH",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "MS_SLAVE",
    "SCMP_CMP",
    "SECCOMP_FILTER_FLAG_TSYNC",
    "SECCOMP_RET_ALLOW",
    "SECCOMP_RET_ERRNO",
    "SECCOMP_RET_KILL_PROCESS",
    "SECCOMP_RET_KILL_THREAD",
    "SECCOMP_RET_LOG",
    "SECCOMP_RET_TRACE",
    "SECCOMP_RET_TRAP",
    "SOCK_FILTER_SIZE",
    "CapSets",
    "capability_last_cap",
    "capbset_drop",
    "capbset_read",
    "capget",
    "capset",
    "clear_ambient_caps",
    "get_no_new_privs",
    "install_sigsys_reporter",
    "libseccomp_export_bpf",
    "mount",
    "pivot_root",
    "seccomp_mode",
    "seccomp_set_filter",
    "set_no_new_privs",
    "set_pdeathsig",
    "umount2",
    "unshare",
]

CLONE_NEWNS: int = lib.CLONE_NEWNS
CLONE_NEWUSER: int = lib.CLONE_NEWUSER
CLONE_NEWPID: int = lib.CLONE_NEWPID
CLONE_NEWNET: int = lib.CLONE_NEWNET
CLONE_NEWIPC: int = lib.CLONE_NEWIPC
CLONE_NEWUTS: int = lib.CLONE_NEWUTS
CLONE_NEWCGROUP: int = lib.CLONE_NEWCGROUP
MS_RDONLY: int = lib.MS_RDONLY
MS_NOSUID: int = lib.MS_NOSUID
MS_NODEV: int = lib.MS_NODEV
MS_NOEXEC: int = lib.MS_NOEXEC
MS_REMOUNT: int = lib.MS_REMOUNT
MS_BIND: int = lib.MS_BIND
MS_REC: int = lib.MS_REC
MS_PRIVATE: int = lib.MS_PRIVATE
MS_SLAVE: int = lib.MS_SLAVE
MNT_DETACH: int = lib.MNT_DETACH
SECCOMP_FILTER_FLAG_TSYNC: int = lib.SECCOMP_FILTER_FLAG_TSYNC
SECCOMP_RET_KILL_PROCESS: int = lib.SECCOMP_RET_KILL_PROCESS
SECCOMP_RET_KILL_THREAD: int = lib.SECCOMP_RET_KILL_THREAD
SECCOMP_RET_TRAP: int = lib.SECCOMP_RET_TRAP
SECCOMP_RET_ERRNO: int = lib.SECCOMP_RET_ERRNO
SECCOMP_RET_TRACE: int = lib.SECCOMP_RET_TRACE
SECCOMP_RET_LOG: int = lib.SECCOMP_RET_LOG
SECCOMP_RET_ALLOW: int = lib.SECCOMP_RET_ALLOW
AUDIT_ARCH_X86_64: int = lib.AUDIT_ARCH_X86_64
#: Size of one classic-BPF instruction (``struct sock_filter``): u16 code, u8 jt, u8 jf, u32 k.
SOCK_FILTER_SIZE: int = lib.sys_util_sock_filter_size()


def _check(result: int, call: str) -> None:
    if result < 0:
        raise_errno(call)


def _path(p: str | os.PathLike[str] | None) -> bytes | object:
    return ffi.NULL if p is None else os.fsencode(p)


def unshare(flags: int) -> None:
    """unshare(2): move the calling process into new namespaces (``CLONE_NEW*`` flags)."""
    _check(lib.sys_util_unshare(flags), f"unshare({flags:#x})")


def mount(
    source: str | os.PathLike[str] | None,
    target: str | os.PathLike[str],
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """mount(2)."""
    result = lib.sys_util_mount(
        _path(source),
        os.fsencode(target),
        ffi.NULL if fstype is None else fstype.encode(),
        flags,
        ffi.NULL if data is None else data.encode(),
    )
    _check(result, f"mount({source!s}, {os.fspath(target)}, {fstype}, {flags:#x})")


def umount2(target: str | os.PathLike[str], flags: int = 0) -> None:
    """umount2(2)."""
    _check(lib.sys_util_umount2(os.fsencode(target), flags), f"umount2({os.fspath(target)})")


def pivot_root(new_root: str | os.PathLike[str], put_old: str | os.PathLike[str]) -> None:
    """pivot_root(2) (no glibc wrapper exists)."""
    result = lib.sys_util_pivot_root(os.fsencode(new_root), os.fsencode(put_old))
    _check(result, f"pivot_root({os.fspath(new_root)}, {os.fspath(put_old)})")


def _prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    result: int = lib.sys_util_prctl(option, a2, a3, a4, a5)
    _check(result, f"prctl({option})")
    return result


def set_pdeathsig(signum: int) -> None:
    """Ask the kernel to send ``signum`` to this process when its parent dies."""
    _prctl(lib.PR_SET_PDEATHSIG, signum)


def set_no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS: execve can never grant privileges again (needed for seccomp)."""
    _prctl(lib.PR_SET_NO_NEW_PRIVS, 1)


def get_no_new_privs() -> bool:
    return bool(_prctl(lib.PR_GET_NO_NEW_PRIVS))


def seccomp_mode() -> int:
    """0 (none), 1 (strict) or 2 (filter)."""
    return _prctl(lib.PR_GET_SECCOMP)


def capability_last_cap() -> int:
    """The highest capability number the running kernel knows."""
    with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
        return int(f.read())


def capbset_read(cap: int) -> bool:
    return bool(_prctl(lib.PR_CAPBSET_READ, cap))


def capbset_drop(cap: int) -> None:
    """Drop ``cap`` from the bounding set (needs CAP_SETPCAP)."""
    _prctl(lib.PR_CAPBSET_DROP, cap)


def clear_ambient_caps() -> None:
    _prctl(lib.PR_CAP_AMBIENT, lib.PR_CAP_AMBIENT_CLEAR_ALL)


class CapSets:
    """The effective, permitted and inheritable sets of a thread, as 64-bit masks."""

    __slots__ = ("effective", "inheritable", "permitted")

    def __init__(self, effective: int, permitted: int, inheritable: int) -> None:
        self.effective = effective
        self.permitted = permitted
        self.inheritable = inheritable

    def __repr__(self) -> str:
        return (
            f"CapSets(effective={self.effective:#x}, permitted={self.permitted:#x}, "
            f"inheritable={self.inheritable:#x})"
        )


def capget() -> CapSets:
    out = ffi.new("uint32_t[6]")
    _check(lib.sys_util_capget(out), "capget")
    return CapSets(out[0] | out[1] << 32, out[2] | out[3] << 32, out[4] | out[5] << 32)


def capset(sets: CapSets) -> None:
    m = 0xFFFF_FFFF
    _check(
        lib.sys_util_capset(
            sets.effective & m,
            sets.effective >> 32 & m,
            sets.permitted & m,
            sets.permitted >> 32 & m,
            sets.inheritable & m,
            sets.inheritable >> 32 & m,
        ),
        "capset",
    )


def seccomp_set_filter(program: bytes, *, tsync: bool = False) -> None:
    """Install a classic-BPF seccomp filter (raw ``struct sock_filter`` array bytes).

    The caller must have ``no_new_privs`` set or CAP_SYS_ADMIN. With ``tsync`` every thread of
    the process gets the filter (it fails if a thread already has a diverging filter).
    """
    if not program or len(program) % SOCK_FILTER_SIZE:
        raise ValueError(f"a seccomp program is a non-empty multiple of {SOCK_FILTER_SIZE} bytes")
    flags = SECCOMP_FILTER_FLAG_TSYNC if tsync else 0
    # SAFETY: cffi passes a pointer into the immutable `program` bytes for the duration of the
    # call only; the kernel copies the filter before seccomp(2) returns.
    result = lib.sys_util_seccomp_filter(flags, program, len(program))
    if result != 0:  # with TSYNC a positive result is the id of a thread that could not sync
        if result > 0:
            raise OSError(0, f"thread {result} could not synchronise the filter (from seccomp)")
        raise_errno("seccomp(SECCOMP_SET_MODE_FILTER)")


def install_sigsys_reporter(report_fd: int = -1) -> None:
    """Install a C SIGSYS handler that reports a seccomp-refused syscall, then dies of SIGSYS.

    The handler writes the 8-byte record ``b"!SYS" + u32 syscall number`` (little endian) to
    ``report_fd`` (if >= 0) and a text line to fd 2, then re-raises SIGSYS with the default
    action, so the parent still sees the process killed by SIGSYS. Only useful with a filter
    whose refusal action is ``SECCOMP_RET_TRAP`` (io_jail's log mode).
    """
    _check(lib.sys_util_install_sigsys_reporter(report_fd), "sigaction(SIGSYS)")


# -- libseccomp, as a reference compiler -------------------------------------------------------
#
# io_jail compiles policies itself; libseccomp is bound here (ABI mode, loaded on first use, so
# sys_util does not link against it) to check that both compilers give the same verdicts.

#: Operators of :func:`libseccomp_export_bpf` rules (``enum scmp_compare``).
SCMP_CMP = {"!=": 1, "<": 2, "<=": 3, "==": 4, ">=": 5, ">": 6, "masked==": 7}

_LIBSECCOMP_CDEF = """
typedef void *scmp_filter_ctx;
struct scmp_arg_cmp { unsigned int arg; int op; uint64_t datum_a; uint64_t datum_b; };
scmp_filter_ctx seccomp_init(uint32_t def_action);
void seccomp_release(scmp_filter_ctx ctx);
int seccomp_rule_add_array(scmp_filter_ctx ctx, uint32_t action, int syscall,
                           unsigned int arg_cnt, const struct scmp_arg_cmp *arg_array);
int seccomp_export_bpf(const scmp_filter_ctx ctx, int fd);
"""
_libseccomp: tuple[object, object] | None = None


def _load_libseccomp() -> tuple[object, object]:
    global _libseccomp
    if _libseccomp is None:
        import cffi

        abi = cffi.FFI()
        abi.cdef(_LIBSECCOMP_CDEF)
        _libseccomp = (abi, abi.dlopen("libseccomp.so.2"))
    return _libseccomp


def libseccomp_export_bpf(
    default_action: int,
    rules: list[tuple[int, int, list[tuple[int, str, int, int]]]],
) -> bytes:
    """Compile ``rules`` with libseccomp and return its BPF program bytes.

    Each rule is ``(action, syscall_nr, [(arg, op, datum_a, datum_b), ...])`` with ``op`` a key
    of :data:`SCMP_CMP`; the comparisons of one rule are ANDed, rules are ORed. Raises
    ``OSError`` if libseccomp is missing or refuses a rule.
    """
    abi, lib_s = _load_libseccomp()
    ffi_any: Any = abi
    lib_any: Any = lib_s
    ctx = lib_any.seccomp_init(default_action)
    if ctx == ffi_any.NULL:
        raise OSError(0, "seccomp_init failed")
    try:
        for action, nr, cmps in rules:
            arr = ffi_any.new("struct scmp_arg_cmp[]", max(len(cmps), 1))
            for i, (arg, op, a, b) in enumerate(cmps):
                arr[i].arg, arr[i].op, arr[i].datum_a, arr[i].datum_b = arg, SCMP_CMP[op], a, b
            rc = lib_any.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
            if rc < 0:
                raise OSError(-rc, f"{os.strerror(-rc)} (from seccomp_rule_add_array({nr}))")
        fd = os.memfd_create("libseccomp-bpf", os.MFD_CLOEXEC)
        try:
            rc = lib_any.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise OSError(-rc, f"{os.strerror(-rc)} (from seccomp_export_bpf)")
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)
    finally:
        lib_any.seccomp_release(ctx)
