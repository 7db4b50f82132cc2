"""Which devices ``crosvm run`` jails, what their jails see, and the balloon commands answered
through a :class:`~crosvm.vm.BalloonHandle` wherever the balloon runs (no KVM needed)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from crosvm import control, vm
from devices.proxy import BalloonState, policy_dir
from devices.virtio import Block, Console, Rng
from devices.virtio.balloon import Balloon, BalloonStat
from devices.virtio.net import Net
from devices.virtio.vhost import VhostNet, VhostVsock
from devices.virtio.vsock import Vsock
from io_jail import Policy


def test_every_virtio_device_crosvm_creates_is_jailed_by_a_shipped_policy() -> None:
    assert set(vm.SANDBOX_POLICIES) == {
        Block,
        Rng,
        Console,
        Balloon,
        Net,
        Vsock,
        VhostNet,
        VhostVsock,
    }
    for name in vm.SANDBOX_POLICIES.values():
        Policy.parse_file(policy_dir() / f"{name}.policy")  # parses, includes resolve


def test_only_vsock_gets_a_bind_mount_of_its_socket_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "socks").mkdir()
    device = Vsock(3, "socks/vm.vsock")  # relative: the jail's cwd is its own root
    try:
        directory = str(tmp_path / "socks")
        assert vm.jail_bind_mounts(device) == [(directory, directory, True)]
    finally:
        device.close()
    assert not os.path.exists(tmp_path / "socks" / "vm.vsock")
    rng = Rng()
    try:
        assert vm.jail_bind_mounts(rng) == []
    finally:
        rng.close()


class FakeBalloon:
    """A BalloonHandle that records the target and answers stats as told."""

    def __init__(self, answer: BalloonState | OSError) -> None:
        self.answer = answer
        self.targets: list[int] = []
        self.timeouts: list[float] = []

    def balloon_adjust(self, num_bytes: int) -> None:
        if isinstance(self.answer, OSError) and self.answer.errno == errno.EIO:
            raise self.answer
        self.targets.append(num_bytes)

    def balloon_stats(self, timeout: float) -> BalloonState:
        self.timeouts.append(timeout)
        if isinstance(self.answer, OSError):
            raise self.answer
        return self.answer


def _handle(balloon: FakeBalloon | None) -> vm._Controller:
    return vm._Controller(None, balloons=[] if balloon is None else [balloon])  # type: ignore[arg-type]


def test_balloon_adjust_and_stats_go_through_the_handle() -> None:
    state = BalloonState(256, {BalloonStat.MEMFREE: 5 << 20, BalloonStat.MAJFLT: 3})
    balloon = FakeBalloon(state)
    handler = _handle(balloon)
    assert handler.handle(control.BalloonCommand(control.Adjust(64 << 20))) == control.Ok()
    assert balloon.targets == [64 << 20]
    reply = handler.handle(control.BalloonCommand(control.Stats()))
    assert reply == control.BalloonStats(
        balloon_actual=256 * 4096, swap_in=None, swap_out=None, major_faults=3,
        minor_faults=None, free_memory=5 << 20, total_memory=None, available_memory=None,
        disk_caches=None,
    )  # fmt: skip
    assert balloon.timeouts == [vm.BALLOON_STATS_TIMEOUT]
    assert vm.BALLOON_STATS_TIMEOUT + 1.0 < control.REQUEST_TIMEOUT  # the proxy's margin


def test_a_driver_without_stats_still_reports_the_balloon_size() -> None:
    reply = _handle(FakeBalloon(BalloonState(3, None))).handle(
        control.BalloonCommand(control.Stats())
    )
    assert isinstance(reply, control.BalloonStats)
    assert reply.balloon_actual == 3 * 4096 and reply.free_memory is None


@pytest.mark.parametrize("code", [errno.ETIMEDOUT, errno.EIO])
def test_balloon_failures_are_errors_not_crashes(code: int) -> None:
    handler = _handle(FakeBalloon(OSError(code, os.strerror(code))))
    assert handler.handle(control.BalloonCommand(control.Stats())) == control.Err(code)


def test_balloon_commands_without_a_balloon_are_enodev() -> None:
    handler = _handle(None)
    for command in (control.Adjust(1 << 20), control.Stats()):
        assert handler.handle(control.BalloonCommand(command)) == control.Err(errno.ENODEV)


def test_local_balloon_sets_the_target_and_reports_without_a_driver() -> None:
    balloon = Balloon()
    try:
        local = vm.LocalBalloon(balloon)
        local.balloon_adjust(8 << 20)
        assert balloon.num_pages == 2048
        assert local.balloon_stats(0.1) == BalloonState(0, None)
        with pytest.raises(OSError) as info:
            local.balloon_adjust(-1)
        assert info.value.errno == errno.EINVAL
    finally:
        balloon.close()
