"""virtio-rng (on by default, ``--no-rng`` turns it off)."""

from __future__ import annotations

import contextlib

from crosvm.config import Config
from devices.serial import SerialParameters
from devices.virtio import Rng, VirtioDevice


def create(
    config: Config, serial: list[SerialParameters], stack: contextlib.ExitStack
) -> list[VirtioDevice]:
    if not config.rng:
        return []
    rng = Rng()
    stack.callback(rng.close)
    return [rng]
