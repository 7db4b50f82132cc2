"""TCP over virtio-net with a Linux guest: Debian's iperf3 in the guest against ``iperf3 -s`` on
the host side, and a checked bulk transfer each way.

The guest is the kit's tiny kernel with the iperf3 initramfs (``ensure_initramfs(iperf3=True)``:
iperf3, its libraries and the loader). crosvm runs inside the test's own network namespace
(``Netns`` from test_crosvm_net) and creates the tap there from ``--host_ip/--netmask/--mac``;
the host-side peers (iperf3 server, TCP sink/source) run in the same namespace, so no packet
leaves it. Devices run in the default sandboxed mode.

Sizes: the bulk transfer is 64 MiB each way on hardware KVM and 256 KiB where the guest kernel
is emulated (its TCP stack moves 0.01-0.2 MB/s there, depending on the host's load: 1 MiB took
99 s down and 126 s up at load average 7); iperf3 runs 5 s per direction.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from fixture import HostProfile
from kit import (
    CommandResult,
    GuestConsole,
    busybox_tree,
    ensure_initramfs,
    ensure_tiny_kernel,
    iperf3_closure,
    kernel_cmdline,
    stop_guest_process,
)
from test_crosvm_net import GUEST_MAC, HOST_IP, Netns, tap_args

#: the marks of every test here that boots the guest (the closure check below needs none)
LINUX_VM = (pytest.mark.kvm, pytest.mark.root, pytest.mark.linux, pytest.mark.slow)


def linux_vm(test: Any) -> Any:
    for mark in LINUX_VM:
        test = mark(test)
    return test


_VENV_CROSVM = Path(sys.executable).with_name("crosvm")
CROSVM = str(_VENV_CROSVM) if _VENV_CROSVM.exists() else (shutil.which("crosvm") or "crosvm")
GUEST_IP = "10.213.7.2"
IPERF_SECONDS = 5


class NetnsGuest:
    """A VMM (any argv, already wrapped in ``ip netns exec``) booting the kit's delegate /init,
    its serial console on pipes and its stderr in ``workdir``."""

    def __init__(self, argv: Sequence[str], workdir: Path, name: str = "guest") -> None:
        self.argv = list(argv)
        self.console_log = open(workdir / f"{name}.console", "w")  # noqa: SIM115 - close()
        self.stderr_path = workdir / f"{name}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err
            )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.console = GuestConsole(self.proc.stdout, self.proc.stdin, self.console_log)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def context(self) -> str:
        tail = "\n".join(self.console.lines[-40:])
        status = self.proc.poll()
        return (
            f"\n--- VMM ({'running' if status is None else status}) stderr ---\n"
            f"{self.stderr[-2000:]}\n--- console tail ---\n{tail}"
        )

    def wait_ready(self, timeout: float) -> float:
        """Wait for /init's ready marker; return seconds since launch."""
        try:
            self.console.wait_ready(timeout)
        except TimeoutError as err:
            raise AssertionError(f"no GUEST-INIT-READY: {err}{self.context()}") from None
        return time.monotonic() - self.started

    def run(self, command: str, timeout: float) -> CommandResult:
        try:
            return self.console.run(command, timeout)
        except TimeoutError as err:
            raise AssertionError(
                f"{command!r}: {str(err).splitlines()[0]}{self.context()}"
            ) from None

    def ok(self, command: str, timeout: float) -> tuple[str, ...]:
        r = self.run(command, timeout)
        assert r.rc == 0, f"{command!r} -> rc={r.rc} {r.lines}{self.context()}"
        return r.lines

    def close(self) -> None:
        stop_guest_process(self.proc, self.console)
        self.console_log.close()

    def __enter__(self) -> NetnsGuest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _listening(ns: Netns, port: int) -> bool:
    return bool(ns.run("ss", "-Hltn", f"sport = :{port}").strip())


def _wait_listening(ns: Netns, port: int, proc: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _listening(ns, port):
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise RuntimeError(f"host server on port {port} exited {proc.returncode}: {err}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"host server on port {port} not listening after {timeout:g} s")
        time.sleep(0.05)


class IperfServer:
    """``iperf3 -s -1 -J`` in the namespace: serves ONE test, then prints its JSON report."""

    def __init__(self, ns: Netns, bind: str, port: int = 5201) -> None:
        argv = ["iperf3", "-s", "-1", "-J", "-B", bind, "-p", str(port)]
        self.proc = subprocess.Popen(
            ns.exec_argv(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        _wait_listening(ns, port, self.proc, 30)

    def report(self, timeout: float) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=timeout)
        if not out.strip():
            raise RuntimeError(
                f"iperf3 -s printed no report (status {self.proc.returncode}): {err}"
            )
        report: dict[str, Any] = json.loads(out)
        return report

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def iperf3_client(
    guest: NetnsGuest, server: str, seconds: int, reverse: bool, timeout: float, port: int = 5201
) -> dict[str, Any]:
    """Run ``iperf3 -c`` in the guest (JSON report, no interval reports) and return the report.
    iperf3's own failures (its ``error`` field, a nonzero status) fail the caller's test."""
    cmd = f"iperf3 -c {server} -p {port} -t {seconds} -i 0 -J" + (" -R" if reverse else "")
    r = guest.run(cmd, timeout)
    try:
        report: dict[str, Any] = json.loads(r.output)
    except ValueError:
        raise AssertionError(f"{cmd!r} -> rc={r.rc}: not JSON: {r.output[-2000:]}") from None
    assert r.rc == 0 and "error" not in report, f"{cmd!r} -> rc={r.rc}: {report.get('error')}"
    return report


def test_iperf3_closure_runs_from_the_initramfs_tree(tmp_path: Path) -> None:
    """The kit's iperf3 tree is self-contained: its loader, given only the tree's library
    directory, resolves every library inside the tree and runs iperf3."""
    if not Path("/usr/bin/iperf3").exists():
        pytest.skip("iperf3 not installed (apt-get install iperf3)")
    closure = iperf3_closure()
    assert {"bin/iperf3", "lib64/ld-linux-x86-64.so.2"} <= set(closure)
    tree = busybox_tree("delegate", iperf3=True)
    for guest_path in closure:
        assert tree.entries[guest_path].mode == 0o755, guest_path
    tree.write_dir(tmp_path)
    loader = str(tmp_path / "lib64/ld-linux-x86-64.so.2")
    base = [loader, "--inhibit-cache", "--library-path", str(tmp_path / "lib/x86_64-linux-gnu")]
    listing = subprocess.run([*base, "--list", str(tmp_path / "bin/iperf3")],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    resolved = [ln.split("=>")[1].split()[0] for ln in listing.splitlines() if "=>" in ln]
    assert len(resolved) == len(closure) - 1, listing  # the libraries and the loader
    assert all(p.startswith(str(tmp_path)) for p in resolved), listing
    version = subprocess.run([*base, str(tmp_path / "bin/iperf3"), "--version"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert version.startswith("iperf 3."), version


# One boot for both checks, in ONE test: a boot costs minutes where the guest kernel is emulated,
# and with pytest 9.2 + xdist 3.8 `xdist_group` does not keep a module's tests on one worker
# (xdist renames `item._nodeid`, pytest 9 reads `item._id`), so two tests could boot twice at once.
@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    ns = Netns()
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture(scope="module")
def guest(
    netns: Netns, host_profile: HostProfile, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NetnsGuest]:
    mem = 192 if host_profile.emulating else 320  # 64 MiB in the guest's tmpfs on hardware
    args = ["-m", str(mem), "-p", kernel_cmdline(), "-i", str(ensure_initramfs(iperf3=True)),
            *tap_args(), str(ensure_tiny_kernel())]  # fmt: skip
    workdir = tmp_path_factory.mktemp("iperf-guest")
    with NetnsGuest(netns.exec_argv([CROSVM, "run", *args]), workdir) as vm:
        print(f"GUEST-INIT-READY after {vm.wait_ready(host_profile.scale(180)):.1f} s")
        vm.ok(f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up", host_profile.scale(30))
        (mac,) = vm.ok("cat /sys/class/net/eth0/address", host_profile.scale(30))
        assert mac == GUEST_MAC
        vm.ok(f"ping -c 1 -W 20 {HOST_IP}", host_profile.scale(30))  # ARP, off the clock
        yield vm


@linux_vm
def test_iperf3_and_tcp_bulk_both_ways(
    netns: Netns, guest: NetnsGuest, host_profile: HostProfile, tmp_path: Path
) -> None:
    """iperf3 both ways, then a sha256-checked blob each way (see the two checks)."""
    check_iperf3_both_directions(netns, guest, host_profile)
    check_tcp_bulk_transfer_sha256_both_ways(netns, guest, host_profile, tmp_path)


def check_iperf3_both_directions(
    netns: Netns, guest: NetnsGuest, host_profile: HostProfile
) -> None:
    """Guest iperf3 client -> host server (guest transmits), then ``-R`` (guest receives): both
    ends report bytes moved, and neither reports an error."""
    timeout = host_profile.scale(60) + IPERF_SECONDS
    for reverse in (False, True):
        server = IperfServer(netns, HOST_IP)
        try:
            client = iperf3_client(guest, HOST_IP, IPERF_SECONDS, reverse, timeout)
            host = server.report(timeout)
        finally:
            server.close()
        assert "error" not in host, host["error"]
        label = "host->guest" if reverse else "guest->host"
        assert client["start"]["test_start"]["reverse"] == int(reverse)
        sent, received = client["end"]["sum_sent"], client["end"]["sum_received"]
        assert sent["bytes"] > 0 and received["bytes"] > 0, client["end"]
        assert received["bytes"] <= sent["bytes"]
        # the host's own account of the same test: what it received (or sent, with -R)
        host_side = host["end"]["sum_sent" if reverse else "sum_received"]
        assert host_side["bytes"] > 0, host["end"]
        print(f"iperf3 {label}: {received['bits_per_second'] / 1e6:.2f} Mbit/s "
              f"({received['bytes']} B in {received['seconds']:.1f} s)")  # fmt: skip


_TCP_PEER = r"""
import hashlib, socket, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
srv = socket.create_server((host, port))
srv.settimeout(float(sys.argv[5]))
conn, _ = srv.accept()
conn.settimeout(float(sys.argv[5]))
if mode == "send":  # the file, then close: the guest's nc sees EOF
    with open(sys.argv[4], "rb") as f:
        conn.sendfile(f)
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(1 << 16):
        pass
else:  # read until the guest's half-close, report what came
    h, n = hashlib.sha256(), 0
    while chunk := conn.recv(1 << 20):
        h.update(chunk)
        n += len(chunk)
    print(n, h.hexdigest(), flush=True)
conn.close()
"""


def _tcp_peer(ns: Netns, mode: str, port: int, path: str, timeout: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ns.exec_argv([sys.executable, "-c", _TCP_PEER, mode, HOST_IP, str(port), path,
                      str(timeout)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_listening(ns, port, proc, 30)
    return proc


def check_tcp_bulk_transfer_sha256_both_ways(
    netns: Netns, guest: NetnsGuest, host_profile: HostProfile, tmp_path: Path
) -> None:
    """A random blob each way over one TCP connection per direction (busybox ``nc`` in the
    guest, half-close at the end), compared by sha256: 64 MiB each way on hardware KVM, 256 KiB
    where the guest kernel is emulated."""
    size = (256 << 10) if host_profile.emulating else (64 << 20)
    timeout = host_profile.scale(120)

    # host -> guest
    blob = random.Random(11).randbytes(size)
    (tmp_path / "down").write_bytes(blob)
    peer = _tcp_peer(netns, "send", 9001, str(tmp_path / "down"), timeout)
    try:
        r = guest.run(f"nc {HOST_IP} 9001 | sha256sum", timeout)
        _, err = peer.communicate(timeout=timeout)
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.communicate()
    assert peer.returncode == 0, err
    assert r.rc == 0 and r.lines, f"{r}{guest.context()}"
    assert r.lines[-1].split()[0] == hashlib.sha256(blob).hexdigest(), guest.context()
    print(f"{size >> 10} KiB host->guest: {r.guest_seconds:.2f} s guest time")

    # guest -> host: random data made in the guest, hashed there, sent, hashed here
    (guest_sha,) = guest.ok(
        f"dd if=/dev/urandom of=/tmp/up bs=65536 count={size >> 16} 2>/dev/null && "
        "sha256sum /tmp/up | cut -d' ' -f1",
        timeout,
    )
    peer = _tcp_peer(netns, "recv", 9002, "-", timeout)
    try:
        r = guest.run(f"nc {HOST_IP} 9002 < /tmp/up", timeout)
        out, err = peer.communicate(timeout=timeout)
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.communicate()
    assert r.rc == 0, f"{r}{guest.context()}"
    assert peer.returncode == 0, err
    assert out.split() == [str(size), guest_sha], (out, guest_sha)
    print(f"{size >> 10} KiB guest->host: {r.guest_seconds:.2f} s guest time")
