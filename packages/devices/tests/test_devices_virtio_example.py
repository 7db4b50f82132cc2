"""The usage example in devices.virtio's docstring runs (it is the README example)."""

from __future__ import annotations

import doctest

import devices.virtio


def test_package_docstring_example_runs() -> None:
    result = doctest.testmod(devices.virtio, verbose=False)
    assert result.attempted > 10
    assert result.failed == 0
