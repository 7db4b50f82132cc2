"""CMOS RAM and the MC146818 real-time clock on ports 0x70 (index) / 0x71 (data).

The guest reads the wall-clock time here at boot (Linux's ``mach_get_cmos_time``) and firmware
conventions put the amount of RAM in fixed CMOS bytes, which some guests read instead of an
e820 map. The model:

* 128 bytes, index masked with 0x7F (bit 7 of the index write is the NMI-disable bit, kept but
  without effect);
* time registers (0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 weekday, 0x07 day, 0x08 month,
  0x09 year, 0x32 century) come from the host's UTC wall clock plus a guest-set offset, in BCD
  and 24-hour format by default and in binary and/or 12-hour format when the guest sets
  register B's DM / 24/12 bits;
* the guest may set the clock as on hardware -- set register B's SET bit, write the time
  registers, clear SET -- which changes only this device's offset from the host clock (the host
  clock is never touched); an impossible date is ignored;
* register A reports the 32.768 kHz divider and the update-in-progress bit for the last 244 us
  of each second, so a guest waiting for UIP to clear (as Linux does) gets a consistent read;
  register B is read/write; register C reports the update-ended flag once per second (read
  clears; there is no RTC interrupt, as in crosvm 2019); register D has VRT (valid RAM and time)
  set;
* 0x34-0x35: RAM between 16 MiB and 4 GiB, 0x5B-0x5D: RAM above 4 GiB, in 64 KiB units, given
  at construction;
* every other byte is NVRAM: written values are kept.
"""

from __future__ import annotations

import calendar
import math
import threading
import time
from collections.abc import Callable

__all__ = ["CMOS_BASE", "CMOS_LENGTH", "Cmos"]

CMOS_BASE = 0x70
CMOS_LENGTH = 2

_SECONDS = 0x00
_MINUTES = 0x02
_HOURS = 0x04
_WEEKDAY = 0x06
_DAY = 0x07
_MONTH = 0x08
_YEAR = 0x09
_REG_A = 0x0A
_REG_B = 0x0B
_REG_C = 0x0C
_REG_D = 0x0D
_CENTURY = 0x32
_MEM_LOW = 0x34  # 2 bytes: RAM in [16 MiB, 4 GiB), 64 KiB units
_MEM_HIGH = 0x5B  # 3 bytes: RAM above 4 GiB, 64 KiB units

_TIME_REGS = frozenset((_SECONDS, _MINUTES, _HOURS, _WEEKDAY, _DAY, _MONTH, _YEAR, _CENTURY))

_A_UIP = 0x80
_A_DIVIDER_MASK = 0x70
_A_DIVIDER_32K = 0x20
_A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate

_B_SET = 0x80
_B_UIE = 0x10
_B_DM_BINARY = 0x04
_B_24H = 0x02
_B_DEFAULT = _B_24H

_C_IRQF = 0x80
_C_UF = 0x10

_D_VRT = 0x80

# time register -> (index in the [y, mon, d, h, min, s] list, lowest, highest)
_FIELD_RANGES = {
    _MONTH: (1, 1, 12),
    _DAY: (2, 1, 31),
    _HOURS: (3, 0, 23),
    _MINUTES: (4, 0, 59),
    _SECONDS: (5, 0, 59),
}

_UIP_WINDOW = 244e-6  # the update cycle's 244 us warning window before each second

_MIB = 1 << 20
_GIB = 1 << 30
_UNIT = 64 << 10


class Cmos:
    """CMOS RAM + RTC (a :class:`~devices.bus.BusDevice`), inserted at 0x70 with length 2.

    ``mem_below_4g`` and ``mem_above_4g`` are the guest's RAM sizes in bytes below and above the
    4 GiB boundary. ``clock`` returns the host time in seconds since the epoch (injectable for
    tests; default :func:`time.time`).
    """

    def __init__(
        self,
        mem_below_4g: int = 0,
        mem_above_4g: int = 0,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if mem_below_4g < 0 or mem_above_4g < 0:
            raise ValueError("memory sizes must not be negative")
        self._clock = clock
        self._lock = threading.Lock()
        self._index = 0
        self._nmi_disabled = False
        self._data = bytearray(128)
        self._offset = 0.0  # guest time minus host time, seconds
        # While register B's SET bit is held: the time fields the guest is writing.
        self._shadow: list[int] | None = None
        self._last_update = math.floor(clock())  # second of the last register C read

        self._data[_REG_A] = _A_DEFAULT
        self._data[_REG_B] = _B_DEFAULT
        self._data[_REG_D] = _D_VRT
        low = min(max(mem_below_4g - 16 * _MIB, 0) // _UNIT, 0xFFFF)
        self._data[_MEM_LOW : _MEM_LOW + 2] = low.to_bytes(2, "little")
        high = min(mem_above_4g // _UNIT, 0xFFFFFF)
        self._data[_MEM_HIGH : _MEM_HIGH + 3] = high.to_bytes(3, "little")

    def debug_label(self) -> str:
        return "cmos"

    # -- BusDevice ----------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            return bytes(self._read_port(offset + i) for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            for i, value in enumerate(data):
                self._write_port(offset + i, value)

    # -- ports (lock held) ----------------------------------------------------------------------

    def _read_port(self, port: int) -> int:
        if port == 0:
            return self._index
        if port == 1:
            return self._read_reg(self._index)
        return 0xFF

    def _write_port(self, port: int, value: int) -> None:
        if port == 0:
            self._index = value & 0x7F
            self._nmi_disabled = bool(value & 0x80)
        elif port == 1:
            self._write_reg(self._index, value)

    def _fields(self) -> list[int]:
        """[year, month, day, hour, minute, second] of the guest clock (or the SET shadow)."""
        if self._shadow is not None:
            return list(self._shadow)
        tm = time.gmtime(math.floor(self._clock() + self._offset))
        return [tm.tm_year, tm.tm_mon, tm.tm_mday, tm.tm_hour, tm.tm_min, min(tm.tm_sec, 59)]

    def _read_reg(self, index: int) -> int:
        if index in _TIME_REGS:
            return self._time_field(index, self._fields())
        if index == _REG_A:
            a = self._data[_REG_A] & 0x7F
            if self._updating():
                a |= _A_UIP
            return a
        if index == _REG_C:
            now = math.floor(self._clock())
            c = 0
            if now > self._last_update and self._shadow is None:
                c = _C_UF
                if self._data[_REG_B] & _B_UIE:
                    c |= _C_IRQF
            self._last_update = now
            return c
        if index == _REG_D:
            return _D_VRT
        return self._data[index]

    def _updating(self) -> bool:
        if self._shadow is not None:
            return False  # SET inhibits update cycles
        if self._data[_REG_A] & _A_DIVIDER_MASK != _A_DIVIDER_32K:
            return False  # oscillator stopped or in reset
        t = self._clock() + self._offset
        return t - math.floor(t) >= 1.0 - _UIP_WINDOW

    def _write_reg(self, index: int, value: int) -> None:
        if index in _TIME_REGS:
            self._set_time_field(index, value)
        elif index == _REG_A:
            self._data[_REG_A] = value & 0x7F  # UIP is read-only
        elif index == _REG_B:
            old = self._data[_REG_B]
            self._data[_REG_B] = value
            if value & _B_SET and not old & _B_SET:
                self._shadow = self._fields()  # freeze: the guest now writes a new time
            elif not value & _B_SET and self._shadow is not None:
                shadow, self._shadow = self._shadow, None
                self._commit(shadow)
        elif index in (_REG_C, _REG_D):
            pass  # read-only
        else:
            self._data[index] = value

    # -- time encoding ------------------------------------------------------------------------

    def _encode(self, value: int) -> int:
        if self._data[_REG_B] & _B_DM_BINARY:
            return value
        return ((value // 10) << 4) | (value % 10)

    def _decode(self, value: int) -> int | None:
        if self._data[_REG_B] & _B_DM_BINARY:
            return value
        hi, lo = value >> 4, value & 0xF
        if hi > 9 or lo > 9:
            return None
        return hi * 10 + lo

    def _time_field(self, index: int, f: list[int]) -> int:
        year, month, day, hour, minute, second = f
        if index == _SECONDS:
            return self._encode(second)
        if index == _MINUTES:
            return self._encode(minute)
        if index == _HOURS:
            if self._data[_REG_B] & _B_24H:
                return self._encode(hour)
            return self._encode(hour % 12 or 12) | (0x80 if hour >= 12 else 0)
        if index == _WEEKDAY:
            try:
                wday = calendar.weekday(year, month, day)  # Monday = 0
            except ValueError:
                wday = 6
            return self._encode((wday + 1) % 7 + 1)  # Sunday = 1
        if index == _DAY:
            return self._encode(day)
        if index == _MONTH:
            return self._encode(month)
        if index == _YEAR:
            return self._encode(year % 100)
        return self._encode(year // 100)  # century

    def _set_time_field(self, index: int, value: int) -> None:
        """Change one time field. Inside SET the shadow changes (the date is checked when SET
        clears, since guests write day and month one at a time); outside SET the change applies
        at once if the resulting date exists. Out-of-range values are ignored."""
        if index == _WEEKDAY:
            return  # derived from the date
        if index == _HOURS and not self._data[_REG_B] & _B_24H:
            h = self._decode(value & 0x7F)
            if h is None or not 1 <= h <= 12:
                return
            decoded: int | None = h % 12 + (12 if value & 0x80 else 0)
        else:
            decoded = self._decode(value)
        if decoded is None:
            return
        f = self._fields()
        if index == _YEAR:
            if decoded > 99:
                return
            f[0] = f[0] // 100 * 100 + decoded
        elif index == _CENTURY:
            if not 1 <= decoded <= 99:
                return
            f[0] = decoded * 100 + f[0] % 100
        else:
            slot, low, high = _FIELD_RANGES[index]
            if not low <= decoded <= high:
                return
            f[slot] = decoded
        if self._shadow is not None:
            self._shadow = f
        else:
            self._commit(f)

    def _commit(self, f: list[int]) -> None:
        """Make the guest clock read ``f`` from now on (ignored when the date does not exist)."""
        year, month, day = f[0], f[1], f[2]
        try:
            if not 1 <= year <= 9999 or day > calendar.monthrange(year, month)[1]:
                return
        except ValueError:
            return
        new = calendar.timegm((*f, 0, 0, 0))
        self._offset = float(new - math.floor(self._clock()))
