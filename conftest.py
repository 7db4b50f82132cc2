"""Test-tier gates shared by every package's tests and the e2e suite.

Markers name what a test needs from its environment (see pyproject.toml). Where the resource
is missing the test is skipped with the reason, except that under ``CI=true`` a missing
``/dev/kvm`` (or a missing QEMU peer) is a failure: CI must exercise the VMM, never skip it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Held (flock, exclusive) by every test that boots Linux, across xdist workers and pytest runs.
LINUX_GUEST_LOCK = Path(tempfile.gettempdir()) / "pycrosvm-linux-guest.lock"


def _kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kvm") and not _kvm_usable():
        if os.environ.get("CI") == "true":
            pytest.fail("/dev/kvm is missing or not accessible, and CI=true requires it")
        pytest.skip("needs a usable /dev/kvm")
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.skip("needs root")
    if item.get_closest_marker("qemu") and not (
        shutil.which("qemu-system-x86_64") and shutil.which("qemu-img")
    ):
        if os.environ.get("CI") == "true":
            pytest.fail("qemu-system-x86_64/qemu-img missing, and CI=true requires the peers")
        pytest.skip(
            "needs qemu-system-x86_64 and qemu-img (apt-get install qemu-system-x86 qemu-utils)"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that boot Linux share one xdist group (``--dist=loadgroup``), so they run one after
    another on one worker: on an emulating host each Linux guest needs a whole CPU and two at
    once make both miss their timeouts. pytest 9 with xdist 3.8 ignores the group (xdist sets
    ``item._nodeid``, pytest 9 reads ``item._id``), so :func:`_one_linux_guest_at_a_time`
    enforces the same with a lock."""
    for item in items:
        if item.get_closest_marker("linux"):
            item.add_marker(pytest.mark.xdist_group("linux"))


@pytest.fixture(autouse=True)
def _one_linux_guest_at_a_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """A ``linux``-marked test holds an exclusive flock while it runs (a worker that picks one
    while another worker's Linux guest is up waits for it)."""
    if request.node.get_closest_marker("linux") is None:
        yield
        return
    fd = os.open(LINUX_GUEST_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
