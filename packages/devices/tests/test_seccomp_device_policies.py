"""The shipped device seccomp policies: each parses, includes the common policy, compiles with
our compiler and with libseccomp to the same verdicts, and allows what its device needs and no
more (checked on the compiled program, and in a real jail for vsock's one host path)."""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devices.irq import IoEvent, IrqRouter
from devices.pci import BarAllocator, PciBar
from devices.proxy import Sandbox, policy_dir
from devices.testing import FakeIrqRouter, make_guest_memory
from io_jail import Policy, compile_policy, simulate, syscall_number
from sys_util import EventFd, GuestMemory
from sys_util import jail as sj

DEVICES = ("block", "rng", "console", "balloon", "net", "vsock")
KILL = sj.SECCOMP_RET_KILL_PROCESS
ALLOW = sj.SECCOMP_RET_ALLOW
M64 = (1 << 64) - 1

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
FIONBIO = 0x5421
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MADV_REMOVE = 9


def _policy(name: str) -> Policy:
    return Policy.parse_file(policy_dir() / f"{name}_device.policy")


def _verdict(name: str, syscall: str, *args: int) -> int:
    return simulate(compile_policy(_policy(name), KILL), syscall_number(syscall), list(args))


def _errno(code: int) -> int:
    return sj.SECCOMP_RET_ERRNO | code


@pytest.mark.parametrize("name", DEVICES)
def test_every_device_policy_includes_common_and_compiles(name: str) -> None:
    common = Policy.parse_file(policy_dir() / "common_device.policy")
    policy = _policy(name)
    assert set(common.names) <= set(policy.names)
    assert any(r.path.endswith("common_device.policy") for r in policy.rules.values())
    assert "ioctl" in policy.names  # every device states its own ioctls
    assert len(compile_policy(policy, KILL)) // 8 < 4096


def _libseccomp_rules(policy: Policy) -> list[tuple[int, int, list[tuple[int, str, int, int]]]]:
    """The policy's allow rules for libseccomp (a rule's ``otherwise`` action is left to the
    caller: libseccomp cannot express "this errno when no clause holds" next to the clauses)."""
    out: list[tuple[int, int, list[tuple[int, str, int, int]]]] = []
    for rule in policy.rules.values():
        if rule.clauses is None:
            out.append((rule.action, rule.nr, []))
            continue
        for clause in rule.clauses:
            cmps: list[tuple[int, str, int, int]] = []
            for a in clause:
                if a.op == "in":
                    cmps.append((a.arg, "masked==", ~a.value & M64, 0))
                elif a.op == "&":
                    assert a.value & (a.value - 1) == 0, f"{rule.name}: multi-bit '&' mask"
                    cmps.append((a.arg, "masked==", a.value, a.value))
                else:
                    cmps.append((a.arg, a.op, a.value, 0))
            out.append((rule.action, rule.nr, cmps))
    return out


def _probe_args(policy: Policy, nr: int) -> list[list[int]]:
    """Arguments at and around every constant the rule for ``nr`` compares with."""
    rule = policy.rules.get(nr)
    probes = [[0] * 6, [M64] * 6, [3, 0x1234, 7, 0, 0, 0]]
    for clause in rule.clauses or () if rule is not None else ():
        for a in clause:
            for v in (a.value - 1, a.value, a.value + 1, ~a.value, a.value | 1 << 40):
                args = [0] * 6
                args[a.arg] = v & M64
                probes.append(args)
    return probes


@pytest.mark.parametrize("name", DEVICES)
def test_same_verdicts_as_libseccomp(name: str) -> None:
    try:
        sj.libseccomp_export_bpf(KILL, [])
    except OSError as err:  # pragma: no cover - libseccomp missing
        pytest.skip(f"libseccomp unavailable: {err}")
    policy = _policy(name)
    ours = compile_policy(policy, KILL)
    theirs = sj.libseccomp_export_bpf(KILL, _libseccomp_rules(policy))
    extra = [syscall_number(n) for n in ("socket", "execve", "open", "ptrace", "kill", "mount")]
    for nr in sorted(set(policy.rules) | set(extra)):
        rule = policy.rules.get(nr)
        for args in _probe_args(policy, nr):
            mine = simulate(ours, nr, args)
            if rule is not None and rule.otherwise is not None and mine == rule.otherwise:
                assert simulate(theirs, nr, args) == KILL, (name, rule.name, args)
            else:
                assert simulate(theirs, nr, args) == mine, (name, nr, args)


@pytest.mark.parametrize("name", DEVICES)
def test_no_device_may_execute_open_or_reach_the_network(name: str) -> None:
    assert _verdict(name, "execve") == KILL
    assert _verdict(name, "ptrace") == KILL
    assert _verdict(name, "mmap", 0, 4096, PROT_READ | PROT_EXEC, 0x22, M64, 0) == KILL
    assert _verdict(name, "mprotect", 0, 4096, PROT_READ | PROT_WRITE | PROT_EXEC) == KILL
    assert _verdict(name, "openat", M64, 0, 0) == _errno(errno.ENOENT)
    assert _verdict(name, "socket", socket.AF_INET, socket.SOCK_STREAM, 0) == KILL
    assert _verdict(name, "socket", socket.AF_NETLINK, socket.SOCK_RAW, 0) == KILL
    assert _verdict(name, "ioctl", 3, FIONBIO) == ALLOW
    assert _verdict(name, "ioctl", 3, TUNSETIFF) == _errno(errno.ENOTTY)


def test_balloon_discards_guest_pages_and_nothing_more() -> None:
    assert _verdict("balloon", "madvise", 0, 4096, MADV_REMOVE) == ALLOW
    for call in ("pwrite64", "fallocate", "connect", "ftruncate"):
        assert _verdict("balloon", call) == KILL, call


def test_net_sets_tap_offloads_but_never_attaches_another_interface() -> None:
    assert _verdict("net", "ioctl", 3, TUNSETOFFLOAD) == ALLOW
    assert _verdict("net", "ioctl", 3, TUNSETVNETHDRSZ) == ALLOW
    assert _verdict("net", "ioctl", 3, TUNSETIFF) == _errno(errno.ENOTTY)
    for call in ("socket", "connect", "sendto", "accept4"):
        assert _verdict("net", call, socket.AF_UNIX) == KILL, call


def test_vsock_may_use_unix_sockets_only_and_never_unlink() -> None:
    assert _verdict("vsock", "socket", socket.AF_UNIX, socket.SOCK_STREAM, 0) == ALLOW
    assert _verdict("vsock", "socket", socket.AF_INET6, socket.SOCK_STREAM, 0) == KILL
    assert _verdict("vsock", "socket", socket.AF_UNIX | 1 << 32, socket.SOCK_STREAM) == KILL
    assert _verdict("vsock", "connect") == ALLOW and _verdict("vsock", "accept4") == ALLOW
    assert _verdict("vsock", "unlink") == _errno(errno.EPERM)
    assert _verdict("vsock", "bind") == KILL and _verdict("vsock", "listen") == KILL


# -- in a real jail: vsock's bind mount is its only host path ------------------------------------


@dataclass(frozen=True)
class Ctx:
    memory: GuestMemory
    irq_router: IrqRouter


class Connector:
    """A device process that connects to Unix socket paths as told (vsock's guest connects)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def debug_label(self) -> str:
        return "connector"

    def read_config_register(self, reg_idx: int) -> int:
        if reg_idx == 99:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # refused by the policy
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.paths[reg_idx])
            sock.sendall(b"hello from the jail")
            return 0
        except OSError as err:
            return err.errno or 0xFFFF
        finally:
            sock.close()

    def write_config_register(self, reg_idx: int, offset: int, data: bytes) -> None:
        pass

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass

    def allocate_bars(self, allocator: BarAllocator) -> list[PciBar]:
        return []

    def ioevents(self) -> list[IoEvent]:
        return []

    def assign_irq(
        self, irq_evt: EventFd, resample_evt: EventFd | None, line: int, pin: int
    ) -> None:
        pass

    def keep_fds(self) -> list[int]:
        return []

    def close(self) -> None:
        pass


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with make_guest_memory(1 << 20) as m:
        yield m


@pytest.mark.root
def test_jailed_vsock_policy_reaches_only_its_bound_directory(
    mem: GuestMemory, tmp_path: Path
) -> None:
    bound, other = tmp_path / "vsock", tmp_path / "elsewhere"
    bound.mkdir()
    other.mkdir()
    inside, outside = bound / "v.sock_5000", other / "v.sock_5000"
    listeners = []
    for path in (inside, outside):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(10)
        listeners.append(listener)
    deaths: list[str] = []
    try:
        with Sandbox(log_failures=True, on_device_death=lambda d: deaths.append(d.message)) as sb:
            proxy = sb.sandboxed(
                lambda ctx: Connector([str(inside), str(outside)]),
                "vsock_device",
                bind_mounts=[(str(bound), str(bound), True)],
            )(Ctx(mem, FakeIrqRouter()))
            sb.start()
            assert proxy.read_config_register(0) == 0  # inside the bind mount: connected
            conn, _ = listeners[0].accept()
            with conn:
                assert conn.recv(100) == b"hello from the jail"
            assert proxy.read_config_register(1) == errno.ENOENT  # not in the jail's root
            assert proxy.read_config_register(99) == 0xFFFF_FFFF  # AF_INET: killed
            ready, _, _ = select.select([sb.monitor], [], [], 10)
            assert ready
            sb.monitor.on_readable()
            assert deaths == [
                f"device connector (pid {proxy.pid}) died: "
                "killed by SIGSYS (seccomp refused syscall socket)"
            ]
    finally:
        for listener in listeners:
            listener.close()


def _jailed_pid(proxy_pid: int) -> int:
    """The device process: the child of the intermediate process ``ProxyDevice.pid`` names."""
    kids = Path(f"/proc/{proxy_pid}/task/{proxy_pid}/children").read_text().split()
    return int(kids[0]) if kids else proxy_pid


@pytest.mark.root
def test_jailed_vsock_keeps_only_its_listener_eventfds_memory_and_sockets(
    mem: GuestMemory, tmp_path: Path
) -> None:
    from devices.virtio import VirtioPciDevice
    from devices.virtio.vsock import Vsock

    path = tmp_path / "vm.vsock"
    with Sandbox() as sb:
        proxy = sb.sandboxed(
            lambda ctx: VirtioPciDevice(Vsock(3, path), ctx.memory, msix_router=ctx.irq_router),
            "vsock_device",
            bind_mounts=[(str(tmp_path), str(tmp_path), True)],
        )(Ctx(mem, FakeIrqRouter()))
        sb.start()
        assert proxy.pid is not None
        assert proxy.read_config_register(0) & 0xFFFF == 0x1AF4  # served by the jail
        pid = _jailed_pid(proxy.pid)
        links = {
            fd.name: os.readlink(fd)
            for fd in Path(f"/proc/{pid}/fd").iterdir()
            if fd.name not in ("0", "1", "2")
        }
        kinds = {link.split(":")[0] if ":" in link else link for link in links.values()}
        assert kinds <= {"socket", "anon_inode", "/memfd"}, links
        memfds = {link for link in links.values() if link.startswith("/memfd:")}
        assert len(memfds) == 1, links  # guest memory only (its fd may be kept twice)
        assert not any(link.startswith("/") and not link.startswith("/memfd:")
                       for link in links.values()), links  # fmt: skip
        # The root it sees: only the bind-mounted socket directory, at its own path.
        root = Path(f"/proc/{pid}/root")
        assert sorted(p.name for p in root.iterdir()) == [tmp_path.parts[1]]
        assert (root / str(path).lstrip("/")).exists()
    assert not path.exists()  # the main process removed the socket
