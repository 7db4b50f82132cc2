"""virtio-vsock under `crosvm run --cid N` with the C test guest's vsock-echo scenario.

The host reaches the guest through the device's Unix socket (Firecracker's hybrid vsock): it
connects, writes ``CONNECT 5000``, reads ``OK <port>``, streams random bytes and compares the
sha256 of what the guest echoed. The test guest only accepts connections (it never connects
out), so guest->host connections are covered by the device unit tests instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from fixture import GuestConfig, build_guest, launch

pytestmark = [pytest.mark.kvm]

CROSVM = shutil.which("crosvm") or "crosvm"
TIMEOUT = 120.0


def _cid() -> int:
    # distinct per xdist worker and run: the default socket path is derived from the CID
    return 3 + (os.getpid() * 7919 + int.from_bytes(os.urandom(2), "little")) % 1_000_000


def _default_path(cid: int) -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"crosvm-vsock-{cid}.sock"


def _connect(path: Path, port: int) -> tuple[socket.socket, bytes]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(str(path))
    sock.sendall(f"CONNECT {port}\n".encode())
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return sock, line


def _echo(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data`` while reading the echo back (the guest echoes as it receives)."""
    errors: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(data)
        except BaseException as err:  # surfaced below
            errors.append(err)

    sender = threading.Thread(target=send)
    sender.start()
    got = bytearray()
    try:
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            got += chunk
    finally:
        sender.join(60)
    assert not errors, errors
    return bytes(got)


@pytest.mark.parametrize("size", [1 << 20, 4 << 20])
def test_host_to_guest_echo_matches_sha256(size: int) -> None:
    cid = _cid()
    path = _default_path(cid)
    with launch(GuestConfig("vsock-echo", vsock_cid=cid), vmm="crosvm", crosvm=CROSVM) as vm:
        vm.wait_for("READY vsock-echo", TIMEOUT)
        sock, line = _connect(path, 5000)
        with sock:
            assert line.startswith(b"OK ") and int(line[3:]) >= 1 << 30, line
            data = os.urandom(size) + b"END\n"
            echoed = _echo(sock, data)
        result = vm.wait(TIMEOUT).check()
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(data).hexdigest()
    row = result.find("vsock_cid")
    assert row["vsock_cid"] == str(cid)
    assert int(row["vsock_rx"]) == int(row["vsock_tx"]) == len(data)
    assert not path.exists()  # crosvm removed its socket on exit


def test_connect_to_a_port_the_guest_does_not_listen_on_is_refused(tmp_path: Path) -> None:
    """The guest answers RST; crosvm closes the host socket without an OK line."""
    path = tmp_path / "vm.vsock"
    cid = _cid()
    argv = [
        CROSVM, "run", "--disable-sandbox", "--no-rng", "--no-balloon",
        "--serial", "type=stdout,num=1,console", "--cid", str(cid), "--vsock-uds", str(path),
        "-p", "scenario=vsock-echo port=5000", str(build_guest()),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        out = b""
        while b"READY vsock-echo" not in out:
            chunk = proc.stdout.readline()
            assert chunk, out
            out += chunk
        sock, line = _connect(path, 5001)
        sock.close()
        assert line == b""
        sock, line = _connect(path, 5000)  # the guest is still serving
        with sock:
            assert line.startswith(b"OK ")
            assert _echo(sock, b"still here\nEND\n") == b"still here\nEND\n"
        rest, _ = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0
        assert b"RESULT status=ok" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cid_bad_setups_are_one_line_errors(tmp_path: Path) -> None:
    elf = str(build_guest())
    base = [CROSVM, "run", "--disable-sandbox", "--no-rng", "--no-balloon", "-p", "scenario=hello"]
    busy = tmp_path / "busy.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(busy))
        listener.listen(1)
        for extra, want in (
            (["--cid", "5", "--vsock-uds", str(busy)], "another process is listening"),
            (["--cid", "2"], "reserved"),
            (["--vsock-uds", str(tmp_path / "x.sock")], "needs --cid"),
        ):
            proc = subprocess.run(
                [*base, *extra, elf], capture_output=True, text=True, timeout=TIMEOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            assert proc.returncode != 0, proc
            assert want in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
