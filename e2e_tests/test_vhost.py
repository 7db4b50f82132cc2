"""The kernel vhost backends under ``crosvm run``: ``--vhost-net`` and ``--vsock-backend vhost``.

The guest runs need the host nodes (``/dev/vhost-net``, ``/dev/vhost-vsock``) and are skipped
where they are missing; they run the same C-guest scenarios as the userspace backends' tests
(``net-echo`` through a tap in a private network namespace, ``vsock-echo`` over ``AF_VSOCK``),
so the two backends are held to the same results. The error tests run everywhere: a host
without a node gets one line on stderr and exit status 1, and nothing is left behind.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from fixture import GuestConfig, build_guest
from fixture._run import GuestVm
from fixture._vmm import crosvm_command
from test_crosvm_net import (
    CROSVM,
    GUEST_MAC,
    Netns,
    echo_round_trip,
    finish_echo,
    launch_in,
    netns,
    tap_args,
)
from test_crosvm_vsock import _assert_same, _echo

pytestmark = [pytest.mark.kvm]

__all__ = ["netns"]  # the fixture, re-used from the userspace net tests

TIMEOUT = 120.0
HAVE_VHOST_NET = os.path.exists("/dev/vhost-net")
HAVE_VHOST_VSOCK = os.path.exists("/dev/vhost-vsock")


def _argv_with(cfg: GuestConfig, extra: list[str]) -> list[str]:
    argv = crosvm_command(build_guest(), cfg, crosvm=CROSVM)
    return [*argv[:-1], *extra, argv[-1]]


def _one_line_failure(argv: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 1, proc
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


# -- errors on a host without the nodes (run everywhere) -------------------------------------


def test_vhost_net_without_the_node_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "vhost-net"
    argv = _argv_with(GuestConfig("hello"), ["--tap-name", "pyvhost0", "--vhost-net",
                                             "--vhost-net-device", str(missing)])  # fmt: skip
    proc = _one_line_failure(argv)
    assert proc.stderr == f"crosvm: vhost-net not available on this host ({missing} missing)\n"


@pytest.mark.skipif(HAVE_VHOST_NET, reason="this host has /dev/vhost-net")
def test_vhost_net_on_this_host_is_refused_before_any_tap_exists() -> None:
    """The default node: no tap is created (the tap name would otherwise appear)."""
    argv = _argv_with(GuestConfig("hello"), ["--tap-name", "pyvhost1", "--vhost-net"])
    proc = _one_line_failure(argv)
    assert "vhost-net not available on this host (/dev/vhost-net missing)" in proc.stderr
    assert not os.path.exists("/sys/class/net/pyvhost1")


def test_vhost_vsock_without_the_node_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "vhost-vsock"
    argv = _argv_with(GuestConfig("hello"), ["--cid", "77", "--vsock-backend", "vhost",
                                             "--vhost-vsock-device", str(missing)])  # fmt: skip
    proc = _one_line_failure(argv)
    assert proc.stderr == f"crosvm: vhost-vsock not available on this host ({missing} missing)\n"


@pytest.mark.skipif(HAVE_VHOST_VSOCK, reason="this host has /dev/vhost-vsock")
def test_vsock_backend_vhost_on_this_host_is_refused() -> None:
    proc = _one_line_failure(
        _argv_with(GuestConfig("hello"), ["--cid", "78", "--vsock-backend", "vhost"])
    )
    assert "vhost-vsock not available on this host (/dev/vhost-vsock missing)" in proc.stderr


def test_vsock_backend_auto_without_the_node_falls_back_to_unix_sockets(tmp_path: Path) -> None:
    """``auto`` with no node boots with the Unix-socket backend (its socket appears)."""
    uds = tmp_path / "vm.vsock"
    argv = _argv_with(
        GuestConfig("hello"),
        ["--cid", "79", "--vsock-backend", "auto", "--vhost-vsock-device",
         str(tmp_path / "none"), "--vsock-uds", str(uds)],
    )  # fmt: skip
    with GuestVm(argv) as vm:
        result = vm.wait(TIMEOUT).check()
    assert result.find("status")["status"] == "ok"


# -- guests on the kernel backends (only where the nodes exist) -----------------------------


@pytest.mark.root
@pytest.mark.skipif(not HAVE_VHOST_NET, reason="no /dev/vhost-net on this host")
def test_net_echo_through_vhost_net(netns: Netns) -> None:
    """The userspace net-echo scenario with the rings in the kernel: every frame echoed whole."""
    cfg = GuestConfig("net-echo", params={"timeout_ms": 120000})
    argv = _argv_with(cfg, [*tap_args(), "--vhost-net"])
    with launch_in(netns, argv) as vm:
        m = vm.wait_for(r"READY net-echo mac=(\S+)", TIMEOUT)
        assert m.group(1) == GUEST_MAC  # the config space is ours, not the kernel's
        mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
        with netns.packet_socket("vmtap0") as sock:
            payload_bytes = echo_round_trip(sock, mac, 200)
            res = finish_echo(vm, sock, mac)
    assert int(res["net_rx"]) == 201 and int(res["net_tx"]) == 201
    assert int(res["bad"]) == 0
    assert int(res["net_bytes"]) == payload_bytes + 200 * 14 + 60


@pytest.mark.skipif(not HAVE_VHOST_VSOCK, reason="no /dev/vhost-vsock on this host")
def test_vsock_echo_through_vhost_vsock() -> None:
    """Host -> guest over AF_VSOCK (the kernel's vhost-vsock), as QEMU's vhost-vsock test."""
    cid = 3 + (os.getpid() * 7919 + int.from_bytes(os.urandom(2), "little")) % 1_000_000
    message = os.urandom(1 << 20) + b"END\n"
    cfg = GuestConfig("vsock-echo", vsock_cid=cid)
    with GuestVm(_argv_with(cfg, ["--vsock-backend", "vhost"])) as vm:
        vm.wait_for("READY vsock-echo", TIMEOUT)
        with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT)
            s.connect((cid, 5000))
            echoed = _echo(s, message)  # sends while reading the echo back
        result = vm.wait(TIMEOUT).check()
    _assert_same(echoed, message, result.output)
    row = result.find("vsock_cid")
    assert row["vsock_cid"] == str(cid)
    assert int(row["vsock_rx"]) == int(row["vsock_tx"]) == len(message)
