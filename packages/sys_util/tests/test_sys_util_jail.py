"""sys_util.jail: the raw jail syscalls behave and fail as documented."""

from __future__ import annotations

import errno
import os
import signal
import struct

import pytest

from sys_util import jail as sj


def _in_child(fn: object) -> int:
    """Run ``fn()`` in a forked child; return its exit code (fn's return value)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 99
        try:
            assert callable(fn)
            code = fn()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_constants_and_sizes() -> None:
    assert sj.SOCK_FILTER_SIZE == 8
    assert sj.AUDIT_ARCH_X86_64 == 0xC000003E
    assert sj.SECCOMP_RET_KILL_PROCESS == 0x80000000 and sj.SECCOMP_RET_ALLOW == 0x7FFF0000
    assert sj.CLONE_NEWUSER == 0x10000000 and sj.MS_BIND == 4096


def test_capget_and_last_cap() -> None:
    caps = sj.capget()
    assert sj.capability_last_cap() >= 37
    if os.geteuid() == 0:
        assert caps.effective & (1 << 21)  # CAP_SYS_ADMIN
    assert "CapSets(" in repr(caps)


def test_seccomp_filter_argument_checks() -> None:
    with pytest.raises(ValueError):
        sj.seccomp_set_filter(b"")
    with pytest.raises(ValueError):
        sj.seccomp_set_filter(b"\x00" * 7)


def test_filter_no_new_privs_and_mode_in_a_child() -> None:
    # ld [nr]; jeq getppid ? ret ERRNO(EPERM) : ret ALLOW
    program = b"".join(
        struct.pack("<HBBI", *i)
        for i in (
            (0x20, 0, 0, 0),
            (0x15, 0, 1, 110),
            (0x06, 0, 0, sj.SECCOMP_RET_ERRNO | errno.EPERM),
            (0x06, 0, 0, sj.SECCOMP_RET_ALLOW),
        )
    )

    def child() -> int:
        assert sj.seccomp_mode() == 0 and not sj.get_no_new_privs()
        sj.set_no_new_privs()
        sj.seccomp_set_filter(program, tsync=True)
        assert sj.get_no_new_privs() and sj.seccomp_mode() == 2
        return 42 if os.getppid() == -1 else 1  # glibc: -1 with errno EPERM

    assert _in_child(child) == 42


@pytest.mark.root
def test_namespaces_caps_and_mounts_in_a_child(tmp_path: object) -> None:
    def child() -> int:
        sj.set_pdeathsig(signal.SIGKILL)
        sj.unshare(sj.CLONE_NEWNS)  # as root: no user namespace needed
        sj.mount(None, "/", None, sj.MS_REC | sj.MS_PRIVATE)
        sj.mount("none", "/mnt", "tmpfs", sj.MS_NOSUID, "size=1m")
        os.mkdir("/mnt/old")
        os.chdir("/mnt")
        sj.pivot_root(".", "old")
        sj.umount2("/old", sj.MNT_DETACH)
        assert os.listdir("/") == ["old"]
        last = 40
        sj.capbset_drop(0)
        assert not sj.capbset_read(0) and sj.capbset_read(1)
        sj.clear_ambient_caps()
        sj.capset(sj.CapSets(0, 0, 0))
        caps = sj.capget()
        assert (caps.effective, caps.permitted, caps.inheritable) == (0, 0, 0)
        try:
            sj.capbset_drop(2)
        except PermissionError:
            return 42 + 0 * last
        return 1

    assert _in_child(child) == 42


def test_errors_name_the_call() -> None:
    with pytest.raises(OSError) as info:
        sj.umount2("/definitely/not/mounted")
    assert "umount2(/definitely/not/mounted)" in str(info.value)
    with pytest.raises(OSError) as info2:
        sj.unshare(-1)
    assert info2.value.errno == errno.EINVAL and "unshare" in str(info2.value)


def test_libseccomp_reference_export() -> None:
    try:
        program = sj.libseccomp_export_bpf(
            sj.SECCOMP_RET_KILL_PROCESS, [(sj.SECCOMP_RET_ALLOW, 0, [])]
        )
    except OSError as err:  # pragma: no cover - libseccomp missing
        pytest.skip(str(err))
    assert len(program) % 8 == 0 and len(program) >= 8
    with pytest.raises(OSError):
        sj.libseccomp_export_bpf(
            sj.SECCOMP_RET_KILL_PROCESS, [(sj.SECCOMP_RET_ALLOW, 0, [(9, "==", 1, 0)])]
        )
