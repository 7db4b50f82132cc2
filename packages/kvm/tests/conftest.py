"""Fixtures for kvm's tests: a VM with 64 KiB (real mode) or 2 MiB (long mode) of RAM at 0.

Guest programs are hand-assembled bytes (GNU as source in comments); real mode and guest CPL0
are emulated on our PVM hosts (~1M instructions/s), so every guest is a few instructions.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvm.testing import Machine, machine


@pytest.fixture
def vmm() -> Iterator[Machine]:
    """64 KiB of RAM at guest 0, no irqchip: MMIO at or above 0x10000 exits to us."""
    with machine(0x10000) as m:
        yield m


@pytest.fixture
def vmm_irqchip() -> Iterator[Machine]:
    with machine(0x10000, irqchip=True) as m:
        yield m


@pytest.fixture
def vmm_dirty() -> Iterator[Machine]:
    with machine(0x10000, log_dirty=True) as m:
        yield m


@pytest.fixture
def vmm_2m() -> Iterator[Machine]:
    with machine(0x200000) as m:
        yield m
