"""crosvm's vhost options: parsing, backend choice, the one-line errors of a host without the
nodes, cleanup on failure, and that vhost devices are jailed like every other device."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crosvm import vm
from crosvm.config import parse_run_args
from crosvm.device_setup import net as net_setup
from crosvm.device_setup import vsock as vsock_setup
from crosvm.errors import ConfigError, VmError
from devices.proxy import policy_dir
from devices.virtio.vhost import VhostNet as VhostNetDevice
from devices.virtio.vhost import VhostVsock as VhostVsockDevice
from sys_util import EventFd, VhostError

FEATURES = 1 << 32 | 1 << 29 | 1 << 28 | 1 << 15


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF")
    return path


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as s:
        yield s


class FakeFd:
    """Stands in for sys_util.VhostNet/VhostVsock: an fd, features, a CID."""

    def __init__(self, features: int = FEATURES, cid_error: int | None = None) -> None:
        self._evt = EventFd()
        self.features = features
        self.cid_error = cid_error
        self.cids: list[int] = []

    def fileno(self) -> int:
        return self._evt.fileno()

    def close(self) -> None:
        self._evt.close()

    @property
    def closed(self) -> bool:
        return self._evt.closed

    def get_features(self) -> int:
        return self.features

    def set_guest_cid(self, cid: int) -> None:
        if self.cid_error is not None:
            raise VhostError("VHOST_VSOCK_SET_GUEST_CID", self.cid_error)
        self.cids.append(cid)


class FakeTap:
    name = "faketap0"

    def __init__(self) -> None:
        self._evt = EventFd()

    def fileno(self) -> int:
        return self._evt.fileno()

    def close(self) -> None:
        self._evt.close()

    @property
    def closed(self) -> bool:
        return self._evt.closed

    def set_offload(self, flags: int) -> None:
        pass

    def set_vnet_hdr_size(self, size: int) -> None:
        pass


# -- parsing ---------------------------------------------------------------------------------------


def test_defaults_keep_the_unix_socket_backend(kernel: Path) -> None:
    config = parse_run_args(["--cid", "3", str(kernel)])
    assert config.vsock_backend == "uds"
    assert config.vhost_vsock_device == Path("/dev/vhost-vsock")
    assert config.vhost_net_device == Path("/dev/vhost-net")


def test_vhost_vsock_device_selects_the_vhost_backend(kernel: Path, tmp_path: Path) -> None:
    config = parse_run_args(["--cid", "3", "--vhost-vsock-device", str(tmp_path / "v"),
                             str(kernel)])  # fmt: skip
    assert config.vsock_backend == "vhost"
    assert config.vhost_vsock_device == tmp_path / "v"
    auto = parse_run_args(["--cid", "3", "--vsock-backend", "auto", str(kernel)])
    assert auto.vsock_backend == "auto"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cid", "3", "--vsock-backend", "vhost", "--vsock-uds", "/tmp/x"], "--vsock-uds is for"),
        (["--vsock-backend", "vhost"], "--vsock-backend needs --cid"),
        (["--cid", "3", "--vsock-backend", "uds", "--vhost-vsock-device", "/x"], "needs --vsock"),
        (["--cid", "3", "--vsock-backend", "kernel"], "invalid choice"),
        (["--tap-name", "t0", "--vhost-net-device", "/x"], "--vhost-net-device needs --vhost-net"),
    ],
)
def test_inconsistent_vhost_options_are_config_errors(
    kernel: Path, args: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_run_args([*args, str(kernel)])


def test_auto_picks_vhost_only_when_the_node_exists_and_no_uds(
    kernel: Path, tmp_path: Path
) -> None:
    node = tmp_path / "vhost-vsock"
    argv = ["--cid", "3", "--vsock-backend", "auto", "--vhost-vsock-device", str(node)]
    assert vsock_setup.backend(parse_run_args([*argv, str(kernel)])) == "uds"
    node.write_bytes(b"")
    assert vsock_setup.backend(parse_run_args([*argv, str(kernel)])) == "vhost"
    with_uds = parse_run_args([*argv, "--vsock-uds", str(tmp_path / "s"), str(kernel)])
    assert vsock_setup.backend(with_uds) == "uds"


# -- device setup without the nodes --------------------------------------------------------------


def test_vhost_net_without_the_node_is_one_line_and_opens_no_tap(
    kernel: Path, tmp_path: Path, stack: contextlib.ExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "vhost-net"

    def no_tap(option: Any) -> Any:
        raise AssertionError("the tap must not be created before vhost-net is known to work")

    monkeypatch.setattr(net_setup, "open_tap", no_tap)
    config = parse_run_args(["--tap-name", "t0", "--vhost-net", "--vhost-net-device",
                             str(missing), str(kernel)])  # fmt: skip
    with pytest.raises(VmError) as info:
        net_setup.create(config, [], stack)
    assert str(info.value) == f"vhost-net not available on this host ({missing} missing)"


@pytest.mark.skipif(os.path.exists("/dev/vhost-net"), reason="this host has /dev/vhost-net")
def test_default_vhost_net_node_missing_message(kernel: Path, stack: contextlib.ExitStack) -> None:
    config = parse_run_args(["--tap-name", "t0", "--vhost-net", str(kernel)])
    with pytest.raises(VmError, match=r"^vhost-net not available on this host \(/dev/vhost-net"):
        net_setup.create(config, [], stack)


def test_vhost_vsock_without_the_node_is_one_line(
    kernel: Path, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    missing = tmp_path / "vhost-vsock"
    config = parse_run_args(["--cid", "3", "--vsock-backend", "vhost", "--vhost-vsock-device",
                             str(missing), str(kernel)])  # fmt: skip
    with pytest.raises(VmError) as info:
        vsock_setup.create(config, [], stack)
    assert str(info.value) == f"vhost-vsock not available on this host ({missing} missing)"


def test_a_node_that_is_not_vhost_fails_cleanly(
    kernel: Path, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    """A file that is no vhost device: VHOST_GET_FEATURES fails, the error is one line."""
    node = tmp_path / "not-vhost"
    node.write_bytes(b"")
    config = parse_run_args(["--cid", "3", "--vhost-vsock-device", str(node), str(kernel)])
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(VmError, match="--cid 3: vhost-vsock: cannot read features"):
        vsock_setup.create(config, [], stack)
    assert set(os.listdir("/proc/self/fd")) <= before  # the node's fd was closed


def test_vhost_net_device_error_closes_tap_and_vhost(
    kernel: Path, stack: contextlib.ExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, tap = FakeFd(features=FEATURES & ~(1 << 32)), FakeTap()  # no VERSION_1
    monkeypatch.setattr(net_setup, "open_vhost_net", lambda path: fd)
    monkeypatch.setattr(net_setup, "open_tap", lambda option: tap)
    config = parse_run_args(["--tap-name", "t0", "--vhost-net", str(kernel)])
    with pytest.raises(VmError, match=r"--vhost-net: vhost-net.*VERSION_1"):
        net_setup.create(config, [], stack)
    assert fd.closed and tap.closed


def test_vhost_vsock_cid_in_use_is_one_line(
    kernel: Path, stack: contextlib.ExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    fd = FakeFd(cid_error=errno.EADDRINUSE)
    monkeypatch.setattr(vsock_setup.VhostVsockFd, "open", classmethod(lambda cls, path: fd))
    config = parse_run_args(["--cid", "9", "--vsock-backend", "vhost", str(kernel)])
    with pytest.raises(VmError, match="--cid 9: vhost-vsock: cannot claim guest CID 9"):
        vsock_setup.create(config, [], stack)
    assert fd.closed


# -- the devices crosvm builds, and their jail ---------------------------------------------------


def test_vhost_devices_are_built_and_jailed_by_default(
    kernel: Path, stack: contextlib.ExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    net_fd, vsock_fd, tap = FakeFd(), FakeFd(), FakeTap()
    monkeypatch.setattr(net_setup, "open_vhost_net", lambda path: net_fd)
    monkeypatch.setattr(net_setup, "open_tap", lambda option: tap)
    monkeypatch.setattr(vsock_setup.VhostVsockFd, "open", classmethod(lambda cls, path: vsock_fd))
    config = parse_run_args(["--tap-name", "t0", "--mac", "02:00:00:00:00:07", "--vhost-net",
                             "--cid", "7", "--vsock-backend", "vhost", str(kernel)])  # fmt: skip
    (net,) = net_setup.create(config, [], stack)
    (vsock,) = vsock_setup.create(config, [], stack)
    assert isinstance(net, VhostNetDevice) and net.mac == bytes.fromhex("020000000007")
    assert isinstance(vsock, VhostVsockDevice) and vsock_fd.cids == [7]
    assert net.keep_fds() == [net_fd.fileno(), tap.fileno()]
    for device_type, policy in ((VhostNetDevice, "vhost_net_device"),
                                (VhostVsockDevice, "vhost_vsock_device")):  # fmt: skip
        assert vm.SANDBOX_POLICIES[device_type] == policy
        assert (policy_dir() / f"{policy}.policy").is_file()
    stack.close()
    assert net_fd.closed and vsock_fd.closed and tap.closed


def test_cli_reports_the_missing_node_on_one_line(kernel: Path, tmp_path: Path) -> None:
    missing = tmp_path / "vhost-vsock"
    proc = subprocess.run(
        [sys.executable, "-m", "crosvm", "run", "--cid", "3", "--vsock-backend", "vhost",
         "--vhost-vsock-device", str(missing), str(kernel)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"crosvm: vhost-vsock not available on this host ({missing} missing)\n"
