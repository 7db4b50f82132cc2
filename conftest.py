"""Test-tier gates shared by every package's tests and the e2e suite.

Markers name what a test needs from its environment (see pyproject.toml). Where the resource
is missing the test is skipped with the reason, except that under ``CI=true`` a missing
``/dev/kvm`` (or a missing QEMU peer) is a failure: CI must exercise the VMM, never skip it.
"""

from __future__ import annotations

import os
import shutil

import pytest


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
    """Tests that boot Linux share one xdist group (``--dist=loadgroup``): they run one after
    another on one worker, because on an emulating host each Linux guest needs a whole CPU and
    two at once make both miss their timeouts."""
    for item in items:
        if item.get_closest_marker("linux"):
            item.add_marker(pytest.mark.xdist_group("linux"))
