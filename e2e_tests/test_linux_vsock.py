"""virtio-vsock with a Linux guest: the kernel's virtio_transport against pycrosvm's hybrid
Unix-socket backend, driven from the guest with the kit's ``vsockcat`` (tools/vsockcat.c).

One boot of the kit's tiny kernel under ``crosvm run --cid 3 --vsock-uds <tmp>/vm.vsock`` in the
default (sandboxed) mode checks, in order:

* a guest ``connect`` to a host port nobody serves (no ``<uds>_P`` socket): the device answers
  RST and the guest tool reports ``Connection reset by peer`` (ECONNRESET), status 1;
* a host ``CONNECT`` to a guest port nobody listens on: the host socket is closed, no ``OK``;
* host -> guest connection (guest ``vsockcat listen``, host ``CONNECT`` through the uds) and
  guest -> host connection (host listens on ``<uds>_P``, guest ``vsockcat connect 2 P``), each
  carrying random data BOTH ways at once, compared by sha256 on the receiving side;
* clean shutdown both ways: each side half-closes when it has sent everything, the other sees
  EOF (not a reset), both ends finish with status 0 and nothing is printed on error paths.

Sizes: 64 MiB each way on hardware KVM; 256 KiB where the guest kernel is emulated (~1M
instructions/s: the guest's vsock stack then moves a few hundred KB/s).
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from fixture import HostProfile, connect_guest_port
from kit import (
    CommandResult,
    ensure_initramfs,
    ensure_tiny_kernel,
    ensure_vsockcat,
    kernel_cmdline,
)
from test_linux_crosvm import CrosvmLinux

CID = 3
HOST_CID = 2
UNUSED_PORT = 4999


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _exchange(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data`` then half-close, while reading until the peer's EOF: a reset (or any error)
    on either direction raises."""
    errors: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except BaseException as err:  # re-raised below
            errors.append(err)

    sender = threading.Thread(target=send, name="vsock-send")
    sender.start()
    got = bytearray()
    try:
        while chunk := sock.recv(1 << 16):
            got += chunk
    finally:
        sender.join()
    if errors:
        raise errors[0]
    return bytes(got)


class LinuxVsockVm(CrosvmLinux):
    """The booted guest plus a worker thread for guest commands that run while the host acts."""

    def __init__(self, tmp: Path, mem_mib: int) -> None:
        self.uds = tmp / "vm.vsock"
        args = ["-m", str(mem_mib), "-p", kernel_cmdline(), "-i", str(ensure_initramfs()),
                "--cid", str(CID), "--vsock-uds", str(self.uds)]  # fmt: skip
        args.append(str(ensure_tiny_kernel()))
        super().__init__(args, tmp)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="guest-cmd")

    def start(self, command: str, timeout: float) -> Future[CommandResult]:
        return self.pool.submit(self.run, command, timeout)

    def close(self) -> None:
        super().close()  # kills crosvm first, so a command still running ends with the console
        self.pool.shutdown(wait=True)


@pytest.fixture
def vm(host_profile: HostProfile, tmp_path: Path) -> Iterator[LinuxVsockVm]:
    guest = LinuxVsockVm(tmp_path, 160 if host_profile.emulating else 320)
    try:
        try:
            seconds = guest.wait_ready(host_profile.scale(180))
        except TimeoutError as err:
            pytest.fail(f"no GUEST-INIT-READY: {err}{guest.context()}")
        print(f"GUEST-INIT-READY after {seconds:.1f} s")
        yield guest
    finally:
        guest.close()


def _wait_listening(vm: LinuxVsockVm, port: int, job: Future[CommandResult], t: float) -> None:
    """Until the guest's ``vsockcat -v listen`` has said it listens (or the command ended)."""
    deadline = time.monotonic() + t
    marker = f"vsockcat: listening on port {port}"
    while not any(marker in line for line in vm.console.lines):
        if job.done():
            pytest.fail(f"vsockcat listen ended early: {job.result()}{vm.context()}")
        if time.monotonic() > deadline:
            pytest.fail(f"guest never listened on {port}{vm.context()}")
        time.sleep(0.1)


def _result_lines(r: CommandResult) -> list[str]:
    """Output lines except vsockcat's -v progress lines."""
    return [ln for ln in r.lines if not ln.startswith("vsockcat: listening")
            and not ln.startswith("vsockcat: connection from")]  # fmt: skip


def _host_listener(
    path: Path, handler: Callable[[socket.socket], None], timeout: float
) -> tuple[threading.Thread, list[BaseException]]:
    """Serve ONE connection on the Unix socket ``path`` (a guest connecting to host port P
    reaches ``<uds>_P``) with ``handler`` in a thread; its exceptions go to the returned list."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    srv.settimeout(timeout)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with srv:
                conn, _ = srv.accept()
            with conn:
                conn.settimeout(timeout)
                handler(conn)
        except BaseException as err:  # reported by the test
            errors.append(err)

    thread = threading.Thread(target=serve, name="host-listener", daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        ([], 2, "usage: vsockcat"),
        (["listen"], 2, "usage: vsockcat"),
        (["connect", "2"], 2, "usage: vsockcat"),
        (["listen", "abc"], 2, "vsockcat: bad port: abc"),
        (["connect", "-1", "5000"], 2, "vsockcat: bad cid: -1"),
        (["connect", "2", "4294967296"], 2, "vsockcat: bad port: 4294967296"),
        (["-v", "frobnicate", "1"], 2, "usage: vsockcat"),
    ],
)
def test_vsockcat_rejects_bad_arguments_in_one_line(
    args: list[str], status: int, message: str
) -> None:
    """The guest tool as the kit builds it (static: no loader, no libraries to copy)."""
    tool = ensure_vsockcat()
    elf = tool.read_bytes()
    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", elf, 0x20)[0],
        *struct.unpack_from("<HH", elf, 0x36),
    )
    types = [struct.unpack_from("<I", elf, phoff + i * phentsize)[0] for i in range(phnum)]
    assert 3 not in types  # no PT_INTERP: static, runs without a loader in the initramfs
    proc = subprocess.run([str(tool), *args], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == status
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and message in proc.stderr


@pytest.mark.kvm
@pytest.mark.linux
@pytest.mark.slow
def test_linux_vsock_streams_both_ways(vm: LinuxVsockVm, host_profile: HostProfile) -> None:
    size = (256 << 10) if host_profile.emulating else (64 << 20)
    t = host_profile.scale(30)
    xfer = host_profile.scale(120)

    # 1. guest -> host port that nothing serves: RST, reported as ECONNRESET
    assert not Path(f"{vm.uds}_{UNUSED_PORT}").exists()
    r = vm.run(f"vsockcat connect {HOST_CID} {UNUSED_PORT}", t)
    assert r.rc == 1, f"{r}{vm.context()}"
    assert r.lines == ("vsockcat: connect: Connection reset by peer",), vm.context()

    # 2. host -> guest port nobody listens on: the device closes our socket without "OK"
    sock, line = connect_guest_port(vm.uds, 5999, t)
    with sock:
        assert line == b"", line
        assert sock.recv(1) == b""

    # the guest's data for both connections: random, kept in tmpfs to hash it on its own
    (guest_sha,) = vm.ok(
        f"dd if=/dev/urandom of=/tmp/g2h bs=4096 count={size // 4096} 2>/dev/null && "
        "sha256sum /tmp/g2h | cut -d' ' -f1",
        xfer,
    )

    # 3. host -> guest connection: guest listens, host CONNECTs; both send at once
    to_guest = os.urandom(size)
    job = vm.start("vsockcat -v listen 5000 < /tmp/g2h | sha256sum", xfer)
    _wait_listening(vm, 5000, job, xfer)
    sock, line = connect_guest_port(vm.uds, 5000, xfer)
    t0 = time.monotonic()
    with sock:
        assert line.startswith(b"OK ") and line.endswith(b"\n"), line
        host_port = int(line[3:])  # the port the guest sees the connection come from
        from_guest = _exchange(sock, to_guest)  # EOF, not a reset, ends it
    print(f"host->guest connection, {size >> 10} KiB each way: {time.monotonic() - t0:.1f} s")
    r = job.result(xfer)
    assert r.rc == 0, f"{r}{vm.context()}"
    assert [ln.split()[0] for ln in _result_lines(r)] == [_sha(to_guest)], vm.context()
    assert len(from_guest) == size and _sha(from_guest) == guest_sha
    assert f"vsockcat: connection from {HOST_CID}:{host_port}" in r.lines, r.lines

    # 4. guest -> host connection: host serves <uds>_5001, guest connects to cid 2 port 5001
    to_guest = os.urandom(size)
    received: list[bytes] = []
    listener, errors = _host_listener(
        Path(f"{vm.uds}_5001"), lambda conn: received.append(_exchange(conn, to_guest)), xfer
    )
    r = vm.run(f"vsockcat connect {HOST_CID} 5001 < /tmp/g2h | sha256sum", xfer)
    print(f"guest->host connection, {size >> 10} KiB each way: {r.guest_seconds:.1f} s guest time")
    listener.join(xfer)
    assert not listener.is_alive() and not errors, f"host side: {errors}{vm.context()}"
    assert r.rc == 0, f"{r}{vm.context()}"
    assert [ln.split()[0] for ln in r.lines] == [_sha(to_guest)], vm.context()
    assert len(received[0]) == size and _sha(received[0]) == guest_sha

    # 5. the device still works after all that, and the VM shuts down cleanly
    r = vm.run(f"vsockcat connect {HOST_CID} {UNUSED_PORT}", t)
    assert r.rc == 1 and "Connection reset by peer" in r.output, r
    assert vm.reboot(t) == 0, vm.context()
    assert "Traceback" not in vm.stderr, vm.stderr
