"""virtio-block for ``--block`` and ``-r/--rwroot/-d/--rwdisk``, in command-line order (vda,
vdb, ...)."""

from __future__ import annotations

import contextlib

from crosvm.config import Config
from crosvm.errors import VmError
from devices.serial import SerialParameters
from devices.virtio import Block, VirtioDevice, VirtioError


def create(
    config: Config, serial: list[SerialParameters], stack: contextlib.ExitStack
) -> list[VirtioDevice]:
    devices: list[VirtioDevice] = []
    for disk in config.disks:
        try:
            block = Block.open(
                disk.path,
                read_only=disk.read_only,
                direct=disk.direct,
                cold_reads_direct=disk.cold_reads_direct,
                serial=disk.serial,
            )
        except (VirtioError, OSError) as err:
            raise VmError(f"disk {disk.path}: {err}") from None
        stack.callback(block.close)
        devices.append(block)
    return devices
