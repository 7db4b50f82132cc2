"""virtio-vsock under `crosvm run --cid N` with the C test guest, both connect directions.

Host -> guest (``vsock-echo``): the host connects to the device's Unix socket (Firecracker's
hybrid vsock), writes ``CONNECT 5000``, reads ``OK <port>``, streams random bytes and compares
the sha256 of what the guest echoed.

Guest -> host (``vsock-connect``): the host listens on ``<uds>_<port>``; the guest connects to
CID 2, sends seeded pseudo-random bytes and prints the sha256 of what it sent and of what it
received, so both directions are checked against the host's own hashes. The guest fails the run
itself if the device ever sends past the credit it advertised.

Every test runs crosvm in its default mode (sandboxed devices), as users do.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fixture import GuestConfig, GuestVm, build_guest, command, connect_guest_port, launch

pytestmark = [pytest.mark.kvm]

CROSVM = shutil.which("crosvm") or "crosvm"
TIMEOUT = 120.0


def _cid() -> int:
    # distinct per xdist worker and run: the default socket path is derived from the CID
    return 3 + (os.getpid() * 7919 + int.from_bytes(os.urandom(2), "little")) % 1_000_000


def _default_path(cid: int) -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"crosvm-vsock-{cid}.sock"


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


def _assert_same(got: bytes, want: bytes, context: str = "") -> None:
    """Equal bytes; otherwise say where they part (lost, reordered or corrupted data)."""
    if got == want:
        return
    at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    if at is None:
        at = min(len(got), len(want))
    found = want.find(got[at : at + 64]) if at < len(got) else -1
    pytest.fail(
        f"{len(got)} bytes, want {len(want)}; first difference at {at}; the bytes there are "
        f"the expected stream's at {found}\n{context[-3000:]}"
    )


@pytest.mark.parametrize("size", [1 << 20, 64 << 20])
def test_host_to_guest_echo_matches_sha256(size: int) -> None:
    cid = _cid()
    path = _default_path(cid)
    with launch(GuestConfig("vsock-echo", vsock_cid=cid), vmm="crosvm", crosvm=CROSVM) as vm:
        vm.wait_for("READY vsock-echo", TIMEOUT)
        sock, line = connect_guest_port(path, 5000)
        with sock:
            assert line.startswith(b"OK ") and int(line[3:]) >= 1 << 30, line
            data = os.urandom(size) + b"END\n"
            echoed = _echo(sock, data)
        result = vm.wait(TIMEOUT).check()
    _assert_same(echoed, data, result.output + result.stderr)
    row = result.find("vsock_cid")
    assert row["vsock_cid"] == str(cid)
    assert int(row["vsock_rx"]) == int(row["vsock_tx"]) == len(data)
    assert row["rst"] == "1"  # the device confirmed the close after the last byte was out
    assert not path.exists()  # crosvm removed its socket on exit


def test_connect_to_a_port_the_guest_does_not_listen_on_is_refused(tmp_path: Path) -> None:
    """The guest answers RST; crosvm closes the host socket without an OK line."""
    path = tmp_path / "vm.vsock"
    cid = _cid()
    argv = [
        CROSVM, "run", "--no-rng", "--no-balloon",
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
        sock, line = connect_guest_port(path, 5001)
        sock.close()
        assert line == b""
        sock, line = connect_guest_port(path, 5000)  # the guest is still serving
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
    base = [CROSVM, "run", "--no-rng", "--no-balloon", "-p", "scenario=hello"]
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


# -- guest -> host ---------------------------------------------------------------------------


def _listen(cid: int, port: int) -> socket.socket:
    """The host side of guest port connections: ``<uds>_<port>`` next to the device socket."""
    path = f"{_default_path(cid)}_{port}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock.bind(path)
    sock.listen(1)
    sock.settimeout(TIMEOUT)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    got = bytearray()
    while chunk := sock.recv(1 << 16):
        got += chunk
    return bytes(got)


def _connect_run(
    cid: int, port: int, host: Callable[[socket.socket], None], **params: object
) -> dict[str, str]:
    """Run ``vsock-connect`` to ``port``; ``host`` serves the accepted socket (in a thread)."""
    errors: list[BaseException] = []
    with _listen(cid, port) as listener:
        cfg = GuestConfig("vsock-connect", vsock_cid=cid, params={"port": port, **params})
        with launch(cfg, vmm="crosvm", crosvm=CROSVM) as vm:
            vm.wait_for("READY vsock-connect", TIMEOUT)
            conn, _ = listener.accept()

            def serve() -> None:
                try:
                    with conn:
                        conn.settimeout(TIMEOUT)
                        host(conn)
                except BaseException as err:  # surfaced below
                    errors.append(err)

            server = threading.Thread(target=serve)
            server.start()
            result = vm.wait(TIMEOUT)
            server.join(TIMEOUT)
        os.unlink(f"{_default_path(cid)}_{port}")
    assert not server.is_alive()
    assert not errors, errors
    return result.check().find("vsock_connect")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("rx_buf", [65536, 4096])
def test_guest_connects_and_both_directions_half_close(rx_buf: int) -> None:
    """Guest sends 3 MiB then SHUTDOWN(SEND): the host reads it to EOF while its own direction
    stays open; then the host sends 2 MiB and half-closes, which reaches the guest as
    SHUTDOWN(SEND) followed by the RST that ends the connection.
    """
    host_data = os.urandom(2 << 20)
    seen: dict[str, object] = {}

    def host(conn: socket.socket) -> None:
        seen["from_guest"] = _read_all(conn)  # EOF: the guest's SHUTDOWN(SEND)
        conn.sendall(host_data)
        conn.shutdown(socket.SHUT_WR)
        seen["after"] = _read_all(conn)  # the device closes once both sides are done

    row = _connect_run(_cid(), 6000, host, bytes=3 << 20, seed=7, close="guest", rx_buf=rx_buf)
    from_guest = seen["from_guest"]
    assert isinstance(from_guest, bytes)
    assert row["vsock_connect"] == "ok"
    assert int(row["sent"]) == len(from_guest) == 3 << 20
    assert row["sent_sha256"] == _sha(from_guest)
    assert int(row["recv"]) == len(host_data)
    assert row["recv_sha256"] == _sha(host_data)
    assert int(row["peer_shutdown"]) & 2  # the host's half-close reached the guest
    assert row["rst"] == "1"  # and the device ended the connection with RST
    assert seen["after"] == b""


def test_host_half_closes_first_and_guest_closes_both_ways() -> None:
    """The host sends 1 MiB and half-closes at once while the guest is still sending 4 MiB;
    the guest finishes, answers with SHUTDOWN(RCV|SEND), and the host reads EOF after the data.
    """
    host_data = os.urandom(1 << 20)
    got: list[bytes] = []

    def host(conn: socket.socket) -> None:
        conn.sendall(host_data)
        conn.shutdown(socket.SHUT_WR)
        got.append(_read_all(conn))

    row = _connect_run(_cid(), 6001, host, bytes=4 << 20, seed=3, close="host")
    assert row["vsock_connect"] == "ok"
    assert int(row["sent"]) == len(got[0]) == 4 << 20
    assert row["sent_sha256"] == _sha(got[0])
    assert row["recv_sha256"] == _sha(host_data)
    assert int(row["peer_shutdown"]) & 2
    assert row["rst"] == "1"


def test_guest_connect_to_a_port_nobody_listens_on_gets_rst() -> None:
    cid = _cid()
    assert not os.path.exists(f"{_default_path(cid)}_6999")
    cfg = GuestConfig("vsock-connect", vsock_cid=cid, params={"port": 6999, "bytes": 4096})
    with launch(cfg, vmm="crosvm", crosvm=CROSVM) as vm:
        row = vm.wait(TIMEOUT).check().find("vsock_connect")
    assert row == {"vsock_connect": "reset", "port": "6999", "rst": "1"}


def test_host_that_stops_reading_throttles_the_guest_by_credit() -> None:
    """The host reads nothing for 3 s while the guest sends 8 MiB: the device may buffer only
    its advertised credit, so the guest must stall (it counts running out of credit) and every
    byte still arrives. The other way the guest advertises only 16 KiB: the device must never
    send past it (the guest fails the run if it does) while the host pushes 2 MiB.
    """
    host_data = os.urandom(2 << 20)
    got: list[bytes] = []

    def host(conn: socket.socket) -> None:
        sender = threading.Thread(target=conn.sendall, args=(host_data,))
        sender.start()
        time.sleep(3)
        got.append(_read_all(conn))
        sender.join(TIMEOUT)
        conn.shutdown(socket.SHUT_WR)

    row = _connect_run(
        _cid(), 6002, host, bytes=8 << 20, seed=11, close="guest", buf_alloc=16384, rx_buf=4096
    )
    assert row["vsock_connect"] == "ok"
    assert int(row["credit_stalls"]) >= 1
    assert row["sent_sha256"] == _sha(got[0])
    assert int(row["recv"]) == len(host_data)
    assert row["recv_sha256"] == _sha(host_data)


def test_guest_connects_through_an_explicit_vsock_uds_path(tmp_path: Path) -> None:
    """``--vsock-uds`` elsewhere than $TMPDIR: the (jailed) device reaches ``<path>_<port>``."""
    uds = tmp_path / "vm.vsock"
    cfg = GuestConfig("vsock-connect", vsock_cid=_cid(), params={"port": 6003, "bytes": 200_000})
    argv = command(cfg, vmm="crosvm", crosvm=CROSVM)
    argv[-1:-1] = ["--vsock-uds", str(uds)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(f"{uds}_6003")
        listener.listen(1)
        listener.settimeout(TIMEOUT)
        with GuestVm(argv) as vm:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                got = _read_all(conn)
                conn.sendall(b"reply")
                conn.shutdown(socket.SHUT_WR)
                assert _read_all(conn) == b""
            row = vm.wait(TIMEOUT).check().find("vsock_connect")
    assert row["sent_sha256"] == _sha(got) and int(row["sent"]) == len(got) == 200_000
    assert row["recv_sha256"] == _sha(b"reply") and row["rst"] == "1"
    assert not uds.exists()
