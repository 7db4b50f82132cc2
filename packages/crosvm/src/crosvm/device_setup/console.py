"""virtio-console for ``--serial ...,hardware=virtio-console`` (the guest's ``hvc0``)."""

from __future__ import annotations

import contextlib
import os
import sys

from crosvm.config import Config
from devices.serial import SerialHardware, SerialParameters, SerialType, merge_serial_parameters
from devices.virtio import Console, VirtioDevice


def _console(params: SerialParameters, stack: contextlib.ExitStack) -> Console:
    output: int | None = None
    if params.type is SerialType.STDOUT:
        output = sys.stdout.fileno()
    elif params.type is SerialType.FILE:
        assert params.path is not None
        output = os.open(params.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        stack.callback(os.close, output)
    console = Console(sys.stdin.fileno() if params.stdin else None, output)
    stack.callback(console.close)
    return console


def create(
    config: Config, serial: list[SerialParameters], stack: contextlib.ExitStack
) -> list[VirtioDevice]:
    return [
        _console(p, stack)
        for p in merge_serial_parameters(serial).values()
        if p.hardware is SerialHardware.VIRTIO_CONSOLE
    ]
