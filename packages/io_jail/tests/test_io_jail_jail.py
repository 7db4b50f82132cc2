"""Jailed children: what they can see and do, and how their end is reported."""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from io_jail import (
    JailExit,
    JailSetupError,
    Minijail,
    NotSingleThreaded,
    SeccompReport,
    decode_wait_status,
)

pytestmark = pytest.mark.root

# What a Python child needs to run a little code and exit.
RUNTIME = "".join(
    f"{n}: 1\n"
    for n in (
        "read",
        "write",
        "close",
        "mmap",
        "munmap",
        "brk",
        "madvise",
        "mprotect",
        "futex",
        "exit",
        "exit_group",
        "rt_sigprocmask",
        "rt_sigaction",
        "rt_sigreturn",
        "getpid",
        "gettid",
        "tgkill",
        "fstat",
        "newfstatat",
        "lseek",
    )
)


def _run(jail: Minijail, body: Callable[[int], int], timeout: float = 20) -> tuple[JailExit, bytes]:
    """Fork ``body(write_fd)`` into the jail; return its end and what it wrote to the pipe."""
    r, w = os.pipe()
    try:
        pid = jail.fork(keep_fds=[w, 2])
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    if pid == 0:  # pragma: no cover - child
        code = 99
        try:
            code = body(w)
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    return jail.wait(pid, timeout=timeout), b"".join(chunks)


def _sandbox(tmp_path: Path) -> Minijail:
    root = tmp_path / "root"
    root.mkdir()
    return (
        Minijail()
        .namespace_user()
        .namespace_pids()
        .namespace_vfs()
        .enter_pivot_root(root)
        .namespace_net()
        .namespace_ipc()
        .namespace_uts()
        .namespace_cgroup()
        .use_caps(0)
        .no_new_privs()
        .run_as_init()
    )


def test_empty_root_no_host_pids(tmp_path: Path) -> None:
    def body(w: int) -> int:
        os.write(w, repr((os.path.exists("/etc/passwd"), os.listdir("/"), os.getpid())).encode())
        return 7

    end, out = _run(_sandbox(tmp_path), body)
    assert end.exit_code == 7 and str(end) == "exited with status 7"
    assert eval(out) == (False, [], 1)


def test_bind_mounts_read_only_and_writable_and_tmp(tmp_path: Path) -> None:
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "data").write_text("hello")
    jail = (
        _sandbox(tmp_path)
        .bind_mount(ro, "/srv/ro")
        .bind_mount(rw, "/rw", writable=True)
        .mount_tmp()
    )

    def body(w: int) -> int:
        results = [Path("/srv/ro/data").read_text()]
        try:
            Path("/srv/ro/new").write_text("x")
            results.append("ro writable!")
        except OSError as err:
            results.append(errno.errorcode[err.errno or 0])
        Path("/rw/out").write_text("written")
        Path("/tmp/scratch").write_text("tmp")
        try:
            os.mkdir("/newdir")
            results.append("root writable!")
        except OSError as err:
            results.append(errno.errorcode[err.errno or 0])
        os.write(w, repr(results).encode())
        return 0

    end, out = _run(jail, body)
    assert end.success, end
    assert eval(out) == ["hello", "EROFS", "EROFS"]
    assert (rw / "out").read_text() == "written"
    assert not (ro / "new").exists() and list(tmp_path.joinpath("root").iterdir()) == []


def test_network_namespace_is_empty(tmp_path: Path) -> None:
    def body(w: int) -> int:
        names = [name for _, name in socket.if_nameindex()]
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.connect(("192.0.2.1", 9))
            result = "connected!"
        except OSError as err:
            result = errno.errorcode[err.errno or 0]
        s.close()
        os.write(w, repr((names, result)).encode())
        return 0

    end, out = _run(_sandbox(tmp_path), body)
    assert end.success, end
    assert eval(out) == (["lo"], "ENETUNREACH")


def test_no_capabilities_in_any_set(tmp_path: Path) -> None:
    status_before = Path("/proc/self/status").read_text()
    assert "CapEff:\t0000000000000000" not in status_before  # we are root outside

    # /proc is not mounted in the new root: read our own status before pivoting is not
    # possible, so jail without pivot_root to look at /proc/self/status from inside.
    jail = Minijail().namespace_user().namespace_pids().namespace_net().use_caps(0).no_new_privs()

    def body(w: int) -> int:
        os.write(w, Path("/proc/self/status").read_bytes())
        return 0

    end, out = _run(jail, body)
    assert end.success, end
    fields = dict(line.split(":\t", 1) for line in out.decode().splitlines() if ":\t" in line)
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert fields[key].strip() == "0000000000000000", key
    assert fields["NoNewPrivs"].strip() == "1"


def test_only_kept_fds_survive(tmp_path: Path) -> None:
    extra = os.open("/dev/null", os.O_RDONLY)  # inheritable or not, it must be closed
    os.set_inheritable(extra, True)
    try:

        def body(w: int) -> int:
            fds = []
            for fd in range(1024):
                try:
                    os.fstat(fd)
                    fds.append(fd)
                except OSError:
                    pass
            os.write(w, repr(fds).encode())
            return 0

        r_end, _ = _run(Minijail(), lambda w: 0)  # a jail that does nothing still works
        assert r_end.success
        end, out = _run(_sandbox(tmp_path), body)
    finally:
        os.close(extra)
    assert end.success, end
    fds = eval(out)
    assert 2 in fds and extra not in fds and len(fds) == 2  # stderr and the pipe


def test_seccomp_violation_is_named_in_log_mode(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    jail = _sandbox(tmp_path).use_seccomp_policy(RUNTIME).log_seccomp_failures()

    def body(w: int) -> int:
        os.write(w, b"before")
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        os.write(w, b"after")
        return 0

    end, out = _run(jail, body)
    assert out == b"before"
    assert end.signal == signal.SIGSYS and end.seccomp_violation
    assert end.syscall == "socket"
    assert str(end) == "killed by SIGSYS (seccomp refused syscall socket)"
    assert "seccomp refused syscall 41" in capfd.readouterr().err


def test_seccomp_violation_kills_without_log_mode(tmp_path: Path) -> None:
    jail = _sandbox(tmp_path).use_seccomp_policy(RUNTIME)

    def body(w: int) -> int:
        os.getppid()  # not in the policy
        return 0

    end, _ = _run(jail, body)
    assert end.signal == signal.SIGSYS and end.syscall is None
    assert "killed by SIGSYS" in str(end)


def test_errno_rules_and_init_mode(tmp_path: Path) -> None:
    """Without run_as_init an init process is PID 1 and the program PID 2; the program's
    death by signal still reaches the parent as that signal."""
    root = tmp_path / "r"
    root.mkdir()
    base = RUNTIME + "openat: return ENOENT\n"
    jail = Minijail().namespace_user().namespace_pids().namespace_vfs().enter_pivot_root(root)
    jail.use_seccomp_policy(base).log_seccomp_failures()

    def body(w: int) -> int:
        try:
            os.open("/anything", os.O_RDONLY)
        except FileNotFoundError:
            os.write(w, b"ENOENT %d" % os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)  # kill is not in the policy
        return 0

    end, out = _run(jail, body)
    assert out == b"ENOENT 2"
    assert end.signal == signal.SIGSYS and end.syscall == "kill"


def test_signal_death_is_mirrored(tmp_path: Path) -> None:
    def body(w: int) -> int:
        os.kill(os.getpid(), signal.SIGTERM)  # pid 1: ignored (no handler); returns
        signal.raise_signal(signal.SIGKILL)
        return 0

    end, _ = _run(Minijail().namespace_user().namespace_pids().run_as_init(), body)
    # PID 1 cannot be killed by its own signals: it exits normally.
    assert end.exit_code == 0

    def term(w: int) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        return 0

    end, _ = _run(Minijail().namespace_user(), term)
    assert end.signal == signal.SIGTERM and str(end) == "killed by SIGTERM"


def test_setup_failure_is_raised_in_the_parent(tmp_path: Path) -> None:
    jail = _sandbox(tmp_path).bind_mount(tmp_path / "does-not-exist", "/x")
    with pytest.raises(JailSetupError) as info:
        _run(jail, lambda w: 0)
    assert info.value.step == "mounts"
    with pytest.raises(JailSetupError, match="not a directory"):
        Minijail().enter_pivot_root(tmp_path / "nope")
    with pytest.raises(JailSetupError, match="absolute"):
        Minijail().bind_mount("/tmp", "relative")
    with pytest.raises(JailSetupError, match="PID namespace"):
        Minijail().namespace_pids().enter()


def test_fork_refuses_a_multithreaded_process() -> None:
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        with pytest.raises(NotSingleThreaded) as info:
            Minijail().fork()
        assert info.value.threads == 2 and "before starting" in str(info.value)
    finally:
        stop.set()
        t.join()


def test_enter_in_a_forked_child(tmp_path: Path) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            Minijail().namespace_user().namespace_net().use_caps(0).keep_fds(
                [w]
            ).use_seccomp_policy(RUNTIME).enter()
            os.write(w, b"%d" % len(socket.if_nameindex()))
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 100)
    os.close(r)
    end = decode_wait_status(pid, os.waitpid(pid, 0)[1])
    # if_nameindex needs socket(): refused by the policy
    assert out == b"" and end.signal == signal.SIGSYS


def test_wait_timeout_and_report_object(tmp_path: Path) -> None:
    jail = (
        Minijail()
        .namespace_user()
        .use_seccomp_policy(RUNTIME + "pause: 1\n")
        .log_seccomp_failures()
    )
    pid = jail.fork(keep_fds=[])
    if pid == 0:  # pragma: no cover - child
        try:
            signal.pause()
        finally:
            os._exit(0)
    with pytest.raises(TimeoutError):
        jail.wait(pid, timeout=0.2)
    report = jail.take_report(pid)
    assert isinstance(report, SeccompReport) and report.read_syscall() is None
    os.kill(pid, signal.SIGKILL)
    end = decode_wait_status(pid, os.waitpid(pid, 0)[1], report)
    assert end.signal == signal.SIGKILL and end.syscall is None
    report.close()
    report.close()
    assert report.closed
    with pytest.raises(OSError) as info:
        report.fileno()
    assert info.value.errno == errno.EBADF


def test_intermediate_process_holds_no_fds() -> None:
    jail = Minijail().namespace_user().namespace_pids().run_as_init()
    held = os.open("/dev/null", os.O_RDONLY)
    try:
        pid = jail.fork(keep_fds=[held])
        if pid == 0:  # pragma: no cover - child
            try:
                signal.pause()
            finally:
                os._exit(0)
        # `pid` is the intermediate outside the PID namespace; it only waits for the jailed
        # process, without a copy of any of our fds (or of `held`, which the jail keeps).
        assert os.listdir(f"/proc/{pid}/fd") == []
        os.kill(pid, signal.SIGKILL)  # its death takes the jailed process with it (pdeathsig)
        assert jail.wait(pid, timeout=10).signal == signal.SIGKILL
    finally:
        os.close(held)
