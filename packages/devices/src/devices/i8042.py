"""The smallest i8042 (PS/2 controller) a Linux guest needs: a way to reset the machine.

crosvm puts no keyboard here: the guest's console is the serial port and input devices are
virtio. What Linux still touches on a PC is

* port 0x61 (system control port B): ``pit_calibrate_tsc`` polls bit 5 (the PIT channel 2
  output) and would spin forever if it never rose, so reads return ``0x20``;
* port 0x64 (controller status/command): status reads as 0 (no data, input buffer empty, so the
  guest's writes are "accepted" at once), and the command ``0xFE`` pulses the CPU reset line.
  With ``reboot=k`` on the kernel command line, ``reboot`` in the guest ends up here, and the
  device writes its exit event so the VMM stops (``crosvm run`` exits 0).

The device is inserted at 0x61 with length 4 (offset 0 is port 0x61, offset 3 is port 0x64),
as in crosvm.
"""

from __future__ import annotations

import threading
from typing import Protocol

__all__ = ["I8042", "I8042_BASE", "I8042_LENGTH", "ResetEvent"]

I8042_BASE = 0x61
I8042_LENGTH = 4

_PORT_61 = 0
_PORT_64 = 3
_CMD_RESET_CPU = 0xFE
_PORT_61_VALUE = 0x20  # PIT channel 2 output high: lets pit_calibrate_tsc finish


class ResetEvent(Protocol):
    """Signalled on a guest reset request: a ``sys_util.EventFd`` the main loop polls, or a fake."""

    def write(self, n: int = 1) -> None: ...


class I8042:
    """Reset-only i8042 (a :class:`~devices.bus.BusDevice`).

    ``reset_evt`` is written once per reset command; :attr:`reset_count` counts them (for
    tests and logs).
    """

    def __init__(self, reset_evt: ResetEvent) -> None:
        self._reset_evt = reset_evt
        self._lock = threading.Lock()
        self.reset_count = 0

    def debug_label(self) -> str:
        return "i8042"

    def read(self, offset: int, size: int) -> bytes:
        # Byte-wise: a wide access starting at 0x61 covers 0x62.. too (which read as 0).
        return bytes(_PORT_61_VALUE if offset + i == _PORT_61 else 0 for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        for i, value in enumerate(data):
            if offset + i == _PORT_64 and value == _CMD_RESET_CPU:
                with self._lock:
                    self.reset_count += 1
                self._reset_evt.write(1)
