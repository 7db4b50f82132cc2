"""Which virtio devices a ``crosvm run`` config asks for, one module per kind of device.

Each module's ``create(config, serial, stack)`` opens its backing resources (files, taps,
sockets) and returns devices in PCI slot order; ``stack`` closes them at exit. Opening everything
here, before KVM is touched, makes a bad disk or tap a clean error instead of a half-built VM.
The order of the kinds is crosvm's: console, block, rng, balloon, net, vsock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from crosvm.config import Config
from crosvm.device_setup import balloon, block, console, net, rng, vsock
from devices.serial import SerialParameters
from devices.virtio import VirtioDevice

Creator = Callable[[Config, list[SerialParameters], contextlib.ExitStack], list[VirtioDevice]]

CREATORS: list[Creator] = [
    console.create,
    block.create,
    rng.create,
    balloon.create,
    net.create,
    vsock.create,
]


def create_virtio_devices(
    config: Config, serial: list[SerialParameters], stack: contextlib.ExitStack
) -> list[VirtioDevice]:
    devices: list[VirtioDevice] = []
    for create in CREATORS:
        devices.extend(create(config, serial, stack))
    return devices
