"""e2e fixtures: the test guest, the VMM launcher and the host profile.

The host profile (emulating vs hardware KVM, measured by the guest's ``speed`` scenario) is
printed in the pytest header and given to tests as the session fixture ``host_profile`` so they
can scale timeouts (``host_profile.scale(seconds)``). It is probed once per host boot and guest
version and cached, so parallel workers share one probe.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixture import HostProfile, build_guest, host_profile
from fixture.errors import Error as FixtureError


def _qemu_kvm_available() -> str | None:
    """None if QEMU+KVM can run the guest here, else the reason why not."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no usable /dev/kvm"
    if not shutil.which("qemu-system-x86_64"):
        return "qemu-system-x86_64 not installed"
    if not shutil.which("gcc") or not shutil.which("ld"):
        return "gcc/ld not installed (the guest is built from source)"
    return None


def pytest_report_header(config: pytest.Config) -> list[str]:
    why = _qemu_kvm_available()
    if why:
        return [f"host profile: unavailable ({why})"]
    try:
        return [host_profile("qemu").describe(), f"test guest: {build_guest()}"]
    except FixtureError as err:
        return [f"host profile: probe failed: {str(err).splitlines()[0]}"]


@pytest.fixture(scope="session")
def guest_elf() -> Path:
    """The built test guest image (cached by source hash)."""
    return build_guest()


@pytest.fixture(scope="session")
def host_profile_fixture() -> HostProfile:
    why = _qemu_kvm_available()
    if why:
        pytest.skip(f"host profile needs QEMU+KVM: {why}")
    return host_profile("qemu")


@pytest.fixture(scope="session", name="host_profile")
def _host_profile(host_profile_fixture: HostProfile) -> HostProfile:
    """The session's :class:`fixture.HostProfile` (kind, CPL0/CPL3 speed, ``scale()``)."""
    return host_profile_fixture
