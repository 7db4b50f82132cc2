"""``Minijail``: describe a jail, then fork a child into it (or enter it in place).

The steps run in an order that is forced by the kernel, not chosen:

1. **user namespace first** (``unshare(CLONE_NEWUSER)`` + uid/gid maps): it grants the
   capabilities every later step needs, so the whole jail works without host privileges;
2. the other namespaces (mount, PID, net, IPC, UTS, cgroup), owned by that user namespace; a new
   PID namespace only applies to *children*, so :meth:`Minijail.fork` forks twice: the
   intermediate process stays outside, waits, and mirrors the jailed process's end to the caller;
3. mounts: everything private, a fresh read-only tmpfs on the pivot directory holding only the
   requested bind mounts (and ``/tmp`` when asked), then ``pivot_root`` and detach the old root;
4. resource limits; every fd closed except the kept ones;
5. capabilities dropped from every set (bounding, ambient, inheritable, permitted, effective);
6. ``no_new_privs``; optionally the reporter of refused syscalls (log mode);
7. **seccomp last**: the filter would otherwise refuse the setup's own syscalls.

Errors in the child before step 7 travel to the parent over a pipe and are raised there as
:class:`~io_jail.errors.JailSetupError`; ``fork()`` returns only once the child is jailed.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from io_jail._bpf import compile_policy
from io_jail._policy import Policy
from io_jail._report import JailExit, SeccompReport, wait_for_jailed
from io_jail.errors import JailSetupError, NotSingleThreaded
from sys_util import jail as sj

__all__ = ["Minijail"]

_SETUP_FAILED = 126


@dataclass(frozen=True)
class _Bind:
    src: str
    dst: str
    writable: bool


class Minijail:
    """A jail description (builder methods return ``self``) and the means to enter it.

    Example::

        jail = Minijail().namespace_user().namespace_pids().namespace_vfs() \\
            .enter_pivot_root("/var/empty").namespace_net().use_caps(0).no_new_privs() \\
            .use_seccomp_policy("write: 1\\nexit_group: 1\\n")
        pid = jail.fork(keep_fds=[1, 2])
        if pid == 0:
            os.write(1, b"hello from the jail\\n")
            os._exit(0)
        print(jail.wait(pid))
    """

    def __init__(self) -> None:
        self._userns = False
        self._uid_map: str | None = None
        self._gid_map: str | None = None
        self._ns_flags = 0
        self._pivot_root: str | None = None
        self._binds: list[_Bind] = []
        self._tmp_size: int | None = None
        self._caps: int | None = None
        self._no_new_privs = False
        self._rlimits: dict[int, tuple[int, int]] = {resource.RLIMIT_CORE: (0, 0)}
        self._keep: set[int] = set()
        self._policy: Policy | None = None
        self._log_failures = False
        self._run_as_init = False
        self._reports: dict[int, SeccompReport] = {}

    # -- builder ---------------------------------------------------------------------------

    def namespace_user(self, uid_map: str | None = None, gid_map: str | None = None) -> Self:
        """New user namespace. A map is one ``/proc/PID/uid_map`` line (``"0 1000 1"``) that
        maps the caller's own effective uid (gid) outside, the only kind a process may write
        for itself; the default maps id 0 inside to the caller's euid/egid."""
        self._userns = True
        self._uid_map, self._gid_map = uid_map, gid_map
        return self

    def namespace_pids(self) -> Self:
        self._ns_flags |= sj.CLONE_NEWPID
        return self

    def namespace_vfs(self) -> Self:
        self._ns_flags |= sj.CLONE_NEWNS
        return self

    def namespace_net(self) -> Self:
        self._ns_flags |= sj.CLONE_NEWNET
        return self

    def namespace_ipc(self) -> Self:
        self._ns_flags |= sj.CLONE_NEWIPC
        return self

    def namespace_uts(self) -> Self:
        self._ns_flags |= sj.CLONE_NEWUTS
        return self

    def namespace_cgroup(self) -> Self:
        self._ns_flags |= sj.CLONE_NEWCGROUP
        return self

    def enter_pivot_root(self, directory: str | os.PathLike[str]) -> Self:
        """Make ``directory`` (any existing directory; it is covered by a private, empty,
        read-only tmpfs, the host copy is untouched) the root. Implies a mount namespace."""
        if not Path(directory).is_dir():
            raise JailSetupError("enter_pivot_root", f"{os.fspath(directory)} is not a directory")
        self._pivot_root = os.fspath(directory)
        return self.namespace_vfs()

    def bind_mount(
        self, src: str | os.PathLike[str], dst: str | os.PathLike[str], writable: bool = False
    ) -> Self:
        """Make host path ``src`` visible at ``dst`` inside the new root (read-only unless
        ``writable``). Needs :meth:`enter_pivot_root`."""
        dst_s = os.fspath(dst)
        if not dst_s.startswith("/") or ".." in Path(dst_s).parts:
            raise JailSetupError("bind_mount", f"destination {dst_s!r} must be absolute, no '..'")
        self._binds.append(_Bind(os.fspath(src), dst_s, writable))
        return self

    def mount_tmp(self, size: int = 64 << 20) -> Self:
        """A fresh writable tmpfs at ``/tmp`` inside the new root."""
        self._tmp_size = size
        return self

    def use_caps(self, mask: int) -> Self:
        """Keep only the capabilities in ``mask`` (``0``: none) in every capability set."""
        self._caps = mask
        return self

    def no_new_privs(self) -> Self:
        self._no_new_privs = True
        return self

    def set_rlimit(self, which: int, soft: int, hard: int | None = None) -> Self:
        """``resource.RLIMIT_*`` for the jailed process (RLIMIT_CORE defaults to 0)."""
        self._rlimits[which] = (soft, soft if hard is None else hard)
        return self

    def keep_fds(self, fds: list[int] | tuple[int, ...] | set[int]) -> Self:
        """fds that stay open in the jail (every other fd is closed); 0, 1, 2 are not implied."""
        self._keep.update(int(fd) for fd in fds)
        return self

    def parse_seccomp_filters(self, path: str | os.PathLike[str]) -> Self:
        """Use the policy file at ``path`` (see :class:`~io_jail.Policy`); implies no_new_privs."""
        self._policy = Policy.parse_file(path)
        self._no_new_privs = True
        return self

    def use_seccomp_policy(
        self, text: str | Policy, name: str = "<policy>", base_dir: str | None = None
    ) -> Self:
        self._policy = text if isinstance(text, Policy) else Policy.parse(text, name, base_dir)
        self._no_new_privs = True
        return self

    def log_seccomp_failures(self) -> Self:
        """Log mode: a refused syscall is reported by name (then the process still dies of
        SIGSYS), instead of a silent ``SECCOMP_RET_KILL_PROCESS``. For writing policies."""
        self._log_failures = True
        return self

    def run_as_init(self) -> Self:
        """In a new PID namespace, the jailed program itself is PID 1 (no init process that
        reaps orphans for it)."""
        self._run_as_init = True
        return self

    @property
    def policy(self) -> Policy | None:
        return self._policy

    def seccomp_program(self) -> bytes | None:
        """The BPF program the jail will load (``None`` without a policy)."""
        if self._policy is None:
            return None
        default = sj.SECCOMP_RET_TRAP if self._log_failures else sj.SECCOMP_RET_KILL_PROCESS
        return compile_policy(self._policy, default)

    # -- running ---------------------------------------------------------------------------

    def fork(self, keep_fds: list[int] | tuple[int, ...] = ()) -> int:
        """Fork a jailed child: returns its pid in the parent and 0 in the child.

        In the parent the pid is that of the process to wait for (:meth:`wait`); when a PID
        namespace is used, it is the intermediate process that mirrors the jailed one's end.
        Raises :class:`NotSingleThreaded` if other threads run, :class:`JailSetupError` if the
        child could not be jailed (it is reaped by then).
        """
        threads = threading.active_count()
        if threads != 1:
            raise NotSingleThreaded(threads)
        program = self.seccomp_program()
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        report_r = report_w = -1
        if self._log_failures and program is not None:
            report_r, report_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, checked through its behaviour
            os.close(status_r)
            if report_r >= 0:
                os.close(report_r)
            self._child(status_w, report_w, program, set(keep_fds))
            return 0
        os.close(status_w)
        if report_w >= 0:
            os.close(report_w)
        try:
            chunks = []
            while chunk := os.read(status_r, 4096):
                chunks.append(chunk)
        finally:
            os.close(status_r)
        if chunks:
            if report_r >= 0:
                os.close(report_r)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            step, _, reason = b"".join(chunks).decode(errors="replace").partition("\0")
            raise JailSetupError(step, reason)
        if report_r >= 0:
            self._reports[pid] = SeccompReport(report_r)
        return pid

    def take_report(self, pid: int) -> SeccompReport | None:
        """Hand over the refused-syscall report of child ``pid`` (log mode), if any."""
        return self._reports.pop(pid, None)

    def wait(self, pid: int, timeout: float | None = None) -> JailExit:
        """Reap child ``pid`` and describe its end (naming a refused syscall in log mode)."""
        report = self._reports.get(pid)
        result = wait_for_jailed(pid, report, timeout)
        if report is not None:
            report.close()
            del self._reports[pid]
        return result

    def enter(self) -> None:
        """Jail the calling process itself (no PID namespace: that only applies to children).

        Fds not kept are closed, so keep 0-2 if the process still needs them.
        """
        if self._ns_flags & sj.CLONE_NEWPID:
            raise JailSetupError("enter", "a PID namespace needs fork(), not enter()")
        threads = threading.active_count()
        if self._userns and threads != 1:
            raise NotSingleThreaded(threads)
        self._enter_namespaces()
        self._setup_process(set())
        self._load_seccomp(self.seccomp_program(), -1)

    # -- child side ------------------------------------------------------------------------

    def _child(self, status_w: int, report_w: int, program: bytes | None, keep: set[int]) -> None:
        step = "fork"
        try:
            sj.set_pdeathsig(signal.SIGKILL)
            step = "namespaces"
            self._enter_namespaces()
            if self._ns_flags & sj.CLONE_NEWPID:
                step = "fork into the PID namespace"
                inner = os.fork()
                if inner != 0:
                    # The intermediate only waits: it must not keep the VMM's fds alive
                    # (sockets would not hang up, images would stay locked).
                    _close_all_but(set())
                    _mirror(inner, from_init=not self._run_as_init)
                sj.set_pdeathsig(signal.SIGKILL)  # the intermediate is our parent now
            extra = {status_w, *keep, *([report_w] if report_w >= 0 else [])}
            step = self._setup_process(extra)
            if self._ns_flags & sj.CLONE_NEWPID and not self._run_as_init:
                step = "init"
                program_pid = os.fork()
                if program_pid != 0:
                    _close_all_but(set())
                    _init(program_pid)
            step = "seccomp"
            os.close(status_w)  # the parent's fork() returns now; a seccomp failure exits
            status_w = -1
            self._load_seccomp(program, report_w)
        except BaseException as err:  # report every failure, never run on half-jailed
            if isinstance(err, JailSetupError):
                step, err = err.step, err.reason  # type: ignore[assignment]
            if status_w >= 0:
                with contextlib.suppress(OSError):
                    os.write(status_w, f"{step}\0{err}".encode())
            os._exit(_SETUP_FAILED)

    def _enter_namespaces(self) -> None:
        if self._userns:
            uid, gid = os.geteuid(), os.getegid()
            sj.unshare(sj.CLONE_NEWUSER)
            # A process may map only its own ids into the namespace it just created (and the
            # gid only after giving up setgroups); that is all a jail needs.
            with open("/proc/self/setgroups", "w", encoding="ascii") as f:
                f.write("deny")
            with open("/proc/self/uid_map", "w", encoding="ascii") as f:
                f.write(self._uid_map or f"0 {uid} 1")
            with open("/proc/self/gid_map", "w", encoding="ascii") as f:
                f.write(self._gid_map or f"0 {gid} 1")
        if self._ns_flags:
            sj.unshare(self._ns_flags)

    def _setup_process(self, extra_keep: set[int]) -> str:
        step = "capabilities"
        try:
            last_cap = sj.capability_last_cap()  # /proc is gone after pivot_root
            step = "mounts"
            if self._ns_flags & sj.CLONE_NEWNS:
                sj.mount(None, "/", None, sj.MS_REC | sj.MS_PRIVATE)
                if self._pivot_root is not None:
                    self._pivot()
            step = "rlimits"
            for which, (soft, hard) in self._rlimits.items():
                resource.setrlimit(which, (soft, hard))
            step = "close fds"
            _close_all_but(self._keep | extra_keep)
            step = "capabilities"
            if self._caps is not None:
                _drop_caps(self._caps, last_cap)
            step = "no_new_privs"
            if self._no_new_privs:
                sj.set_no_new_privs()
        except JailSetupError:
            raise
        except Exception as err:
            raise JailSetupError(step, str(err)) from err
        return step

    def _pivot(self) -> None:
        root = self._pivot_root
        assert root is not None
        flags = sj.MS_NOSUID | sj.MS_NODEV
        sj.mount("none", root, "tmpfs", flags, "size=1m,mode=0755")
        for bind in self._binds:
            target = os.path.join(root, bind.dst.lstrip("/"))
            if os.path.isdir(bind.src):
                os.makedirs(target, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "a", encoding="utf-8"):
                    pass
            sj.mount(bind.src, target, None, sj.MS_BIND | sj.MS_REC)
            if not bind.writable:
                # A remount must repeat the flags the kernel locked on the source mount.
                locked = _locked_flags(target)
                sj.mount(None, target, None, sj.MS_BIND | sj.MS_REMOUNT | sj.MS_RDONLY | locked)
        if self._tmp_size is not None:
            tmp = os.path.join(root, "tmp")
            os.makedirs(tmp, exist_ok=True)
            sj.mount("none", tmp, "tmpfs", flags, f"size={self._tmp_size},mode=1777")
        sj.mount(None, root, None, sj.MS_REMOUNT | sj.MS_RDONLY | flags)
        os.chdir(root)
        sj.pivot_root(".", ".")
        sj.umount2(".", sj.MNT_DETACH)
        os.chdir("/")

    def _load_seccomp(self, program: bytes | None, report_w: int) -> None:
        if program is None:
            return
        if self._log_failures:
            sj.install_sigsys_reporter(report_w)
        sj.seccomp_set_filter(program, tsync=True)


def _locked_flags(path: str) -> int:
    st = os.statvfs(path)
    flags = 0
    for bit, ms in ((os.ST_NOSUID, sj.MS_NOSUID), (os.ST_NODEV, sj.MS_NODEV)):
        if st.f_flag & bit:
            flags |= ms
    if st.f_flag & os.ST_NOEXEC:
        flags |= sj.MS_NOEXEC
    return flags


def _close_all_but(keep: set[int]) -> None:
    low = 0
    for fd in sorted(k for k in keep if k >= 0):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max(os.sysconf("SC_OPEN_MAX"), low + 1))


def _drop_caps(mask: int, last_cap: int) -> None:
    for cap in range(last_cap + 1):
        if not mask >> cap & 1 and sj.capbset_read(cap):
            sj.capbset_drop(cap)
    sj.clear_ambient_caps()
    current = sj.capget()
    sj.capset(
        sj.CapSets(current.effective & mask, current.permitted & mask, current.inheritable & mask)
    )


def _init(program_pid: int) -> None:  # pragma: no cover - runs in the jail
    """PID 1 of the jail: reap every orphan until the program exits, then exit like it."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(_SETUP_FAILED)
        if pid == program_pid:
            _exit_like(status, in_init=True)


def _mirror(pid: int, from_init: bool) -> None:  # pragma: no cover - in the intermediate
    """The intermediate outside the PID namespace: end exactly as the jailed process did.

    An init cannot die of a signal, so it reports one as status 128+N (like a shell); with
    ``from_init`` that status is turned back into the signal.
    """
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        os._exit(_SETUP_FAILED)
    if from_init and os.WIFEXITED(status) and 128 < os.WEXITSTATUS(status) < 128 + signal.NSIG:
        status = os.WEXITSTATUS(status) - 128  # a wait status "killed by signal N"
    _exit_like(status)


def _exit_like(status: int, in_init: bool = False) -> None:  # pragma: no cover - in children
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if not in_init:  # a namespace init cannot kill itself with a signal
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if sig not in (signal.SIGKILL, signal.SIGSTOP):  # their disposition is fixed
                signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
            os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
