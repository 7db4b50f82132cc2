"""virtio-balloon (on by default, ``--no-balloon`` turns it off).

``crosvm balloon SIZE SOCKET`` sets its target and ``crosvm balloon_stats SOCKET`` asks the
guest for memory statistics, both through the control socket (:mod:`crosvm.vm`).
"""

from __future__ import annotations

import contextlib

from crosvm.config import Config
from devices.serial import SerialParameters
from devices.virtio import VirtioDevice
from devices.virtio.balloon import Balloon


def create(
    config: Config, serial: list[SerialParameters], stack: contextlib.ExitStack
) -> list[VirtioDevice]:
    if not config.balloon:
        return []
    balloon = Balloon()
    stack.callback(balloon.close)
    return [balloon]
