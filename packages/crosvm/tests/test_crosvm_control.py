"""The control socket protocol, served by a fake VM."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from crosvm import control
from crosvm.errors import ControlError


class FakeVm:
    def __init__(self) -> None:
        self.requests: list[control.VmRequest] = []

    def handle(self, request: control.VmRequest) -> control.VmResponse:
        self.requests.append(request)
        if isinstance(request, control.DiskCommand) and request.disk_index > 0:
            return control.Err(22)
        if isinstance(request, control.BalloonCommand) and isinstance(
            request.command, control.Stats
        ):
            return control.BalloonStats(4096, None, None, 1, 2, 3 << 20, 8 << 20, None, None)
        return control.Ok()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[control.ControlServer, FakeVm]]:
    vm = FakeVm()
    srv = control.ControlServer(tmp_path / "vm.sock", vm)
    stop = threading.Event()

    def serve() -> None:
        import select

        while not stop.is_set():
            if select.select([srv], [], [], 0.05)[0]:
                srv.on_readable()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv, vm
    stop.set()
    thread.join()
    srv.close()


def crosvm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crosvm", *args], capture_output=True, text=True, timeout=60
    )


def test_socket_is_private_and_removed(tmp_path: Path) -> None:
    srv = control.ControlServer(tmp_path / "x.sock", FakeVm())
    mode = os.stat(srv.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    srv.close()
    assert not srv.path.exists()


def test_directory_gets_pid_named_socket(tmp_path: Path) -> None:
    srv = control.ControlServer(tmp_path, FakeVm())
    assert srv.path == tmp_path / f"crosvm-{os.getpid()}.sock"
    srv.close()


def test_requests_reach_the_vm(server: tuple[control.ControlServer, FakeVm]) -> None:
    srv, vm = server
    for name in ("stop", "suspend", "resume"):
        assert crosvm(name, str(srv.path)).returncode == 0
    assert crosvm("balloon", "64M", str(srv.path)).returncode == 0
    assert crosvm("disk", "resize", "0", "2M", str(srv.path)).returncode == 0
    assert vm.requests == [
        control.Exit(),
        control.Suspend(),
        control.Resume(),
        control.BalloonCommand(control.Adjust(64 << 20)),
        control.DiskCommand(0, control.Resize(2 << 20)),
    ]


def test_balloon_stats_printed(server: tuple[control.ControlServer, FakeVm]) -> None:
    srv, _ = server
    result = crosvm("balloon_stats", str(srv.path))
    assert result.returncode == 0 and '"free_memory": 3145728' in result.stdout


def test_refusal_is_one_line(server: tuple[control.ControlServer, FakeVm]) -> None:
    srv, _ = server
    result = crosvm("disk", "resize", "3", "1M", str(srv.path))
    assert result.returncode == 1 and "Invalid argument" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_missing_socket_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="cannot connect"):
        control.send_request(tmp_path / "none.sock", control.Exit())
    result = crosvm("stop", str(tmp_path / "none.sock"))
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1


def test_garbage_client_does_not_break_server(
    server: tuple[control.ControlServer, FakeVm],
) -> None:
    srv, vm = server
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
        raw.connect(str(srv.path))
        raw.send(b"\xff" * 3)
        raw.settimeout(5)
        assert raw.recv(100) == b""  # server hung up on the malformed request
    assert crosvm("stop", str(srv.path)).returncode == 0
    assert vm.requests == [control.Exit()]


@pytest.mark.parametrize(
    "args",
    [
        ["stop"],
        ["balloon", "lots", "/x"],
        ["disk", "grow", "0", "1", "/x"],
        ["disk", "resize", "a", "1", "/x"],
    ],
)
def test_control_misuse_is_status_2(args: list[str]) -> None:
    result = crosvm(*args)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
