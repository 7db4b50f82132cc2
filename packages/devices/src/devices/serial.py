"""A 16550A UART (with the TI 16750 64-byte FIFO mode), the PC's COM1-COM4.

The guest's console and early debug output go through here, one ``out`` instruction -- one vCPU
exit -- per byte, so the transmit path is built to keep that exit cheap: a THR write appends the
byte to a buffer under the device lock and returns. A per-device *flusher* thread writes the
buffer out: at once on a newline, at the end of a transmit burst (the guest driver rewriting IER),
or when a buffer threshold is reached, and otherwise after a short delay (``flush_delay``), so an
interactive prompt without a newline still shows up promptly while a boot log goes out in large
writes. A slow reader of the output (a stopped terminal, a full pipe) blocks only the flusher;
the vCPU waits for buffer space for at most ``output_stall_timeout`` seconds and then drops
output (counted in :attr:`Serial.dropped_output`) until the reader catches up -- a real UART
without flow control loses characters the same way, and the guest keeps running.

Interrupts are edge pulses: the device writes its interrupt event (an ``EventFd`` that ``arch``
registers as an irqfd on GSI 4 or 3) when an enabled interrupt condition *arises* -- data
arrives, the transmitter becomes empty, a line or modem status change -- and the guest's driver
reads IIR until no interrupt is pending, as Linux's 8250 driver does. IIR reports the highest
priority source (line status > data available > THR empty > modem status). Like QEMU and crosvm,
the MCR OUT2 bit does not gate the interrupt line.

Input arrives through :meth:`Serial.queue_input_bytes` (non-blocking, takes what fits the
receive FIFO), :meth:`Serial.write_input` (blocks until the guest has room: back-pressure, no
byte lost) or a reader thread on a file descriptor (:meth:`Serial.start_input`, e.g. stdin).

The module also parses crosvm's ``--serial`` option (:class:`SerialParameters`) and builds the
four COM ports with crosvm's defaults (:func:`create_com_ports`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import syslog
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import BinaryIO, Protocol

from devices.errors import SerialConfigError

__all__ = [
    "COM_PORTS",
    "ComPort",
    "FdWriter",
    "InterruptEvent",
    "Serial",
    "SerialHardware",
    "SerialParameters",
    "SerialType",
    "SerialWriter",
    "SyslogWriter",
    "create_com_ports",
    "merge_serial_parameters",
]

_log = logging.getLogger(__name__)

# Register offsets.
_DATA = 0  # RBR (read) / THR (write); DLL when LCR.DLAB
_IER = 1  # DLM when LCR.DLAB
_IIR = 2  # IIR (read) / FCR (write)
_LCR = 3
_MCR = 4
_LSR = 5
_MSR = 6
_SCR = 7

_IER_RDA = 0x01  # received data available
_IER_THRE = 0x02  # transmitter holding register empty
_IER_RLS = 0x04  # receiver line status
_IER_MS = 0x08  # modem status
_IER_MASK = 0x0F

_IIR_NONE = 0x01
_IIR_MS = 0x00
_IIR_THRE = 0x02
_IIR_RDA = 0x04
_IIR_RLS = 0x06
_IIR_FIFO64 = 0x20
_IIR_FIFO = 0xC0

_FCR_ENABLE = 0x01
_FCR_CLEAR_RX = 0x02
_FCR_FIFO64 = 0x20

_LCR_DLAB = 0x80

_MCR_DTR = 0x01
_MCR_RTS = 0x02
_MCR_OUT1 = 0x04
_MCR_OUT2 = 0x08
_MCR_LOOP = 0x10
_MCR_MASK = 0x1F

_LSR_DR = 0x01
_LSR_OE = 0x02
_LSR_THRE = 0x20
_LSR_TEMT = 0x40

_MSR_DCTS = 0x01
_MSR_DDSR = 0x02
_MSR_TERI = 0x04
_MSR_DDCD = 0x08
_MSR_CTS = 0x10
_MSR_DSR = 0x20
_MSR_RI = 0x40
_MSR_DCD = 0x80

# crosvm's reset values: 9600 baud (divisor 12), 8N1, OUT2 set, modem lines DCD|DSR|CTS active.
_DEFAULT_DIVISOR = 12
_DEFAULT_LCR = 0x03
_DEFAULT_MCR = _MCR_OUT2
_DEFAULT_MSR = _MSR_DCD | _MSR_DSR | _MSR_CTS

_FIFO16 = 16
_FIFO64 = 64

_BYTE = tuple(bytes((i,)) for i in range(256))

_FLUSH_THRESHOLD = 4096
_OUTPUT_LIMIT = 1 << 20


class InterruptEvent(Protocol):
    """What the UART signals its interrupt with: a ``sys_util.EventFd`` (an irqfd) or a fake."""

    def write(self, n: int = 1) -> None: ...


class SerialWriter(Protocol):
    """Where transmitted bytes go: a binary file, :class:`FdWriter`, :class:`SyslogWriter`..."""

    def write(self, data: bytes, /) -> object: ...


class FdWriter:
    """Writes every byte to a file descriptor (``os.write`` until done; EINTR-safe).

    ``owned`` says whether :meth:`close` closes the fd (true for a file opened by
    :func:`create_com_ports`, false for the process's stdout).
    """

    def __init__(self, fd: int, *, owned: bool = False) -> None:
        self._fd = fd
        self._owned = owned

    def fileno(self) -> int:
        if self._fd < 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return self._fd

    def __enter__(self) -> FdWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def create_file(cls, path: str | os.PathLike[str]) -> FdWriter:
        """Create (truncate) ``path`` for writing, as crosvm does for ``type=file``."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        return cls(fd, owned=True)

    def write(self, data: bytes, /) -> int:
        view = memoryview(data)
        fd = self.fileno()
        while view:
            n = os.write(fd, view)
            view = view[n:]
        return len(data)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0 and self._owned:
            os.close(fd)


class SyslogWriter:
    """Sends each complete line to syslog (``LOG_INFO``); a partial line waits for its end."""

    def __init__(self, tag: str = "crosvm") -> None:
        self._tag = tag
        self._partial = b""

    def write(self, data: bytes, /) -> int:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._emit(line)
        return len(data)

    def _emit(self, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        syslog.openlog(self._tag, syslog.LOG_PID, syslog.LOG_USER)
        syslog.syslog(syslog.LOG_INFO, text)

    def close(self) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = b""


class Serial:
    """A 16550A UART on 8 I/O ports (a :class:`~devices.bus.BusDevice`).

    ``interrupt_evt`` is written (``write(1)``) to raise the interrupt line (edge). ``output``
    receives transmitted bytes (``None``: discarded). With ``owns_output`` the output's
    ``close()`` is called by :meth:`close`. All methods are thread-safe.
    """

    def __init__(
        self,
        interrupt_evt: InterruptEvent,
        output: SerialWriter | BinaryIO | None = None,
        *,
        label: str = "serial",
        owns_output: bool = False,
        flush_delay: float = 0.01,
        output_stall_timeout: float = 1.0,
        output_buffer_limit: int = _OUTPUT_LIMIT,
    ) -> None:
        if output_buffer_limit < 1:
            raise ValueError("output_buffer_limit must be at least 1")
        self._interrupt_evt = interrupt_evt
        self._output = output
        self._owns_output = owns_output
        self._label = label
        self._flush_delay = flush_delay
        self._stall_timeout = output_stall_timeout
        self._out_limit = output_buffer_limit
        # Below this many buffered bytes a THR write only appends (see write()).
        self._fast_limit = min(_FLUSH_THRESHOLD, output_buffer_limit)

        self._lock = threading.Lock()
        # Signalled when receive FIFO space frees up or transmit buffer state changes.
        self._rx_space = threading.Condition(self._lock)
        self._tx_cond = threading.Condition(self._lock)
        self._write_lock = threading.Lock()  # serialises writes to the output, in order

        # Registers.
        self._ier = 0
        self._lcr = _DEFAULT_LCR
        self._mcr = _DEFAULT_MCR
        self._lsr = _LSR_THRE | _LSR_TEMT
        self._msr = _DEFAULT_MSR
        self._scr = 0
        self._dll = _DEFAULT_DIVISOR & 0xFF
        self._dlm = _DEFAULT_DIVISOR >> 8
        self._fifo_enabled = False
        self._fifo64 = False
        self._thre_pending = False
        self._rx: deque[int] = deque()
        self._irq_failed = False

        # Output buffering.
        self._tx_buf = bytearray()
        self._tx_urgent = False
        self._tx_stalled = False
        self._flusher: threading.Thread | None = None
        self._closed = False
        self.dropped_output = 0

        # Input thread.
        self._input_thread: threading.Thread | None = None
        self._input_stop: tuple[int, int] | None = None

    # -- BusDevice ----------------------------------------------------------------------------

    def debug_label(self) -> str:
        return self._label

    # The hot paths take the lock with acquire()/release(): on CPython 3.11 that is about half
    # the cost of a ``with`` block, and these run once per vCPU exit.

    def read(self, offset: int, size: int) -> bytes:
        lock = self._lock
        if size == 1:
            lock.acquire()
            try:
                if offset == _LSR:
                    # Fast path: Linux's console polls LSR before every byte it prints.
                    lsr = self._lsr
                    self._lsr = lsr & ~_LSR_OE  # reading LSR clears the error bits
                    return _BYTE[lsr | _LSR_DR if self._rx else lsr]
                return _BYTE[self._read_reg(offset)]
            finally:
                lock.release()
        with lock:
            return bytes(self._read_reg(offset + i) for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        lock = self._lock
        if offset == _DATA and len(data) == 1:
            # Fast path for the console's THR writes (one vCPU exit per printed byte).
            lock.acquire()
            try:
                if self._lcr & _LCR_DLAB or self._mcr & _MCR_LOOP:
                    trigger = self._write_reg(_DATA, data[0])
                else:
                    trigger = not self._thre_pending and bool(self._ier & _IER_THRE)
                    self._thre_pending = True  # the byte leaves at once: THR is empty again
                    if self._output is not None and not self._closed:
                        value = data[0]
                        buf = self._tx_buf
                        if 0 < len(buf) < self._fast_limit and value != 0x0A:
                            buf.append(value)  # the flusher already knows there is output
                        else:
                            self._buffer_output(value)
            finally:
                lock.release()
        else:
            trigger = False
            with lock:
                for i, value in enumerate(data):
                    trigger |= self._write_reg(offset + i, value)
        if trigger:
            self._pulse()

    def _pulse(self) -> None:
        """Raise the (edge) interrupt. Never raises: an interrupt event closed during teardown
        must not kill the vCPU or input thread that happened to be delivering it."""
        try:
            self._interrupt_evt.write(1)
        except OSError as e:
            if not self._irq_failed:
                self._irq_failed = True
                _log.warning("%s: cannot raise the interrupt: %s", self._label, e)

    # -- register model (called with the lock held) ---------------------------------------------

    def _read_reg(self, offset: int) -> int:
        if offset == _LSR:
            lsr = self._lsr | (_LSR_DR if self._rx else 0)
            self._lsr &= ~_LSR_OE  # reading LSR clears the error bits
            return lsr
        if offset == _DATA:
            if self._lcr & _LCR_DLAB:
                return self._dll
            if not self._rx:
                return 0
            value = self._rx.popleft()
            self._rx_space.notify()
            return value
        if offset == _IIR:
            iir = self._iir()
            if iir == _IIR_THRE:
                self._thre_pending = False  # reading IIR acknowledges THR-empty
            fifo_bits = (_IIR_FIFO | (_IIR_FIFO64 if self._fifo64 else 0)) * self._fifo_enabled
            return iir | fifo_bits
        if offset == _IER:
            return self._dlm if self._lcr & _LCR_DLAB else self._ier
        if offset == _LCR:
            return self._lcr
        if offset == _MCR:
            return self._mcr
        if offset == _MSR:
            msr = self._msr
            self._msr &= 0xF0  # reading MSR clears the delta bits
            return msr
        if offset == _SCR:
            return self._scr
        return 0xFF

    def _write_reg(self, offset: int, value: int) -> bool:
        """Apply one register write; returns whether the interrupt line must be pulsed."""
        if offset == _DATA:
            if self._lcr & _LCR_DLAB:
                self._dll = value
                return False
            return self._transmit(value)
        if offset == _IER:
            if self._lcr & _LCR_DLAB:
                self._dlm = value
                return False
            return self._set_ier(value & _IER_MASK)
        if offset == _IIR:
            return self._set_fcr(value)
        if offset == _LCR:
            self._lcr = value
        elif offset == _MCR:
            return self._set_mcr(value & _MCR_MASK)
        elif offset == _SCR:
            self._scr = value
        # LSR and MSR are read-only; offsets past 7 cannot happen through a Bus (length 8).
        return False

    def _iir(self) -> int:
        ier = self._ier
        if ier & _IER_RLS and self._lsr & _LSR_OE:
            return _IIR_RLS
        if ier & _IER_RDA and self._rx:
            return _IIR_RDA
        if ier & _IER_THRE and self._thre_pending:
            return _IIR_THRE
        if ier & _IER_MS and self._msr & 0x0F:
            return _IIR_MS
        return _IIR_NONE

    def _transmit(self, value: int) -> bool:
        was_pending = self._thre_pending
        self._thre_pending = True  # the byte leaves at once: THR is empty again
        if self._mcr & _MCR_LOOP:
            if len(self._rx) < self._rx_capacity():
                self._rx.append(value)
            else:
                self._lsr |= _LSR_OE
            return bool(self._ier & (_IER_RDA | _IER_RLS)) or (
                not was_pending and bool(self._ier & _IER_THRE)
            )
        if self._output is not None and not self._closed:
            self._buffer_output(value)
        return not was_pending and bool(self._ier & _IER_THRE)

    def _set_ier(self, ier: int) -> bool:
        newly = ier & ~self._ier
        self._ier = ier
        if newly & _IER_THRE:
            self._thre_pending = True  # enabling THRE while THR is empty raises it at once
        # A driver rewriting IER marks the end of a transmit burst (Linux's 8250 console write
        # restores IER, its interrupt handler clears THRE when done): push the output out now.
        if self._tx_buf:
            self._tx_urgent = True
            self._tx_cond.notify()
        return bool(newly) and self._iir() != _IIR_NONE

    def _set_fcr(self, fcr: int) -> bool:
        enable = bool(fcr & _FCR_ENABLE)
        if enable != self._fifo_enabled:
            self._rx.clear()  # toggling the FIFO enable resets the FIFOs
        elif fcr & _FCR_CLEAR_RX:
            self._rx.clear()
        self._fifo_enabled = enable
        if self._lcr & _LCR_DLAB:  # the 16750 64-byte bit is writable only with DLAB set
            self._fifo64 = bool(fcr & _FCR_FIFO64)
        if not enable:
            self._fifo64 = False
        while len(self._rx) > self._rx_capacity():
            self._rx.pop()
        self._rx_space.notify_all()
        return False

    def _set_mcr(self, mcr: int) -> bool:
        old_msr = self._msr
        self._mcr = mcr
        if mcr & _MCR_LOOP:
            # Loopback: the modem outputs drive the modem inputs internally.
            status = (
                (_MSR_CTS if mcr & _MCR_RTS else 0)
                | (_MSR_DSR if mcr & _MCR_DTR else 0)
                | (_MSR_RI if mcr & _MCR_OUT1 else 0)
                | (_MSR_DCD if mcr & _MCR_OUT2 else 0)
            )
        else:
            status = _DEFAULT_MSR
        changed = (old_msr ^ status) & 0xF0
        delta = (
            (_MSR_DCTS if changed & _MSR_CTS else 0)
            | (_MSR_DDSR if changed & _MSR_DSR else 0)
            | (_MSR_TERI if changed & _MSR_RI and old_msr & _MSR_RI else 0)
            | (_MSR_DDCD if changed & _MSR_DCD else 0)
        )
        self._msr = status | (old_msr & 0x0F) | delta
        if not mcr & _MCR_LOOP:
            self._rx_space.notify_all()  # host input may flow again
        return bool(delta) and bool(self._ier & _IER_MS)

    def _rx_capacity(self) -> int:
        if not self._fifo_enabled:
            return 1
        return _FIFO64 if self._fifo64 else _FIFO16

    # -- input ----------------------------------------------------------------------------------

    def queue_input_bytes(self, data: bytes) -> int:
        """Offer host input to the receiver; returns how many leading bytes were taken.

        Takes only what fits the receive FIFO (1 byte with the FIFO disabled, 16 or 64 with it
        enabled) and nothing in loopback mode or after :meth:`close`; the caller keeps the rest
        (see :meth:`write_input` for a blocking variant).
        """
        with self._lock:
            n = self._accept_input(data)
            trigger = n > 0 and bool(self._ier & _IER_RDA)
        if trigger:
            self._pulse()
        return n

    def _accept_input(self, data: bytes) -> int:
        if self._closed or self._mcr & _MCR_LOOP:
            return 0
        n = min(len(data), self._rx_capacity() - len(self._rx))
        if n > 0:
            self._rx.extend(data[:n])
        return n

    def write_input(self, data: bytes, timeout: float | None = None) -> int:
        """Feed all of ``data`` to the receiver, waiting for the guest to make room.

        Returns the number of bytes delivered: all of them, unless ``timeout`` seconds passed
        or the device was closed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        done = 0
        while done < len(data):
            with self._lock:
                while not self._closed and (
                    self._mcr & _MCR_LOOP or len(self._rx) >= self._rx_capacity()
                ):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return done
                    self._rx_space.wait(remaining)
                n = self._accept_input(data[done:])
                trigger = n > 0 and bool(self._ier & _IER_RDA)
            if n == 0:
                return done  # closed
            done += n
            if trigger:
                self._pulse()
        return done

    def start_input(self, fd: int) -> None:
        """Start a thread feeding bytes read from ``fd`` (e.g. stdin) to the receiver.

        The fd is not closed by the device. The thread stops at end of file, on a read error
        or at :meth:`close`. Bytes read are never dropped: the thread waits for FIFO room.
        """
        with self._lock:
            if self._input_thread is not None:
                raise RuntimeError(f"{self._label}: input already started")
            if self._closed:
                raise OSError(errno.EBADF, f"{self._label} is closed")
            self._input_stop = os.pipe2(os.O_CLOEXEC)
            thread = threading.Thread(
                target=self._input_loop,
                args=(fd, self._input_stop[0]),
                name=f"{self._label} input",
                daemon=True,
            )
            self._input_thread = thread
        thread.start()

    def _input_loop(self, fd: int, stop_fd: int) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(stop_fd, select.POLLIN)
        while True:
            ready = {f for f, _ in poller.poll()}
            if stop_fd in ready:
                return
            try:
                data = os.read(fd, 256)
            except BlockingIOError:
                continue
            except OSError as e:
                _log.warning("%s: input read failed: %s", self._label, e)
                return
            if not data:
                return
            if self.write_input(data) < len(data):
                return  # closed

    # -- output ---------------------------------------------------------------------------------

    def _buffer_output(self, value: int) -> None:
        buf = self._tx_buf
        if len(buf) >= self._out_limit and (self._tx_stalled or not self._wait_for_output_room()):
            self.dropped_output += 1
            return
        was_empty = not buf
        buf.append(value)
        if value == 0x0A or len(buf) >= _FLUSH_THRESHOLD:
            if self._tx_urgent:
                return  # the flusher was already told to write at once
            self._tx_urgent = True
        elif not was_empty:
            return  # the flusher already knows there is output
        if self._flusher is None:
            self._start_flusher()
        self._tx_cond.notify()

    def _wait_for_output_room(self) -> bool:
        deadline = time.monotonic() + self._stall_timeout
        self._tx_urgent = True
        self._tx_cond.notify()
        while len(self._tx_buf) >= self._out_limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                _log.warning("%s: output reader stalled; dropping output", self._label)
                self._tx_stalled = True
                return False
            self._tx_cond.wait(remaining)
        return True

    def _start_flusher(self) -> None:
        self._flusher = threading.Thread(
            target=self._flush_loop, name=f"{self._label} output", daemon=True
        )
        self._flusher.start()

    def _flush_loop(self) -> None:
        while True:
            with self._lock:
                while not self._tx_buf and not self._closed:
                    self._tx_cond.wait()
                if not self._tx_buf:
                    return  # closed and drained
                if not self._tx_urgent and not self._closed:
                    # Give the guest a moment to finish its line: one write instead of many.
                    self._tx_cond.wait(self._flush_delay)
            self.flush()

    def flush(self) -> None:
        """Write out buffered output now (blocks on a slow reader; never call from a vCPU)."""
        with self._write_lock:
            with self._lock:
                data = bytes(self._tx_buf)
                self._tx_buf.clear()
                self._tx_urgent = False
                self._tx_stalled = False
                self._tx_cond.notify_all()
            if not data or self._output is None:
                return
            try:
                self._output.write(data)
                flush = getattr(self._output, "flush", None)
                if flush is not None:
                    flush()
            except (OSError, ValueError) as e:
                # A gone reader (EPIPE, closed file) must not take the VM down: drop output.
                _log.warning("%s: output write failed, discarding output: %s", self._label, e)
                with self._lock:
                    self.dropped_output += len(data)
                    self._output = None

    # -- lifetime -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, timeout: float = 5.0) -> None:
        """Flush output, stop the input and output threads, close an owned output. Idempotent.

        Waits at most ``timeout`` seconds for each thread: an output reader that never reads
        (a terminal stopped with ^S) must not hang the VMM's exit; its pending output is then
        abandoned and the output is left open for the stuck thread.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._tx_cond.notify_all()
            self._rx_space.notify_all()
            input_thread, stop = self._input_thread, self._input_stop
            flusher = self._flusher
        if stop is not None:
            os.write(stop[1], b"x")
        stuck = False
        for thread in (input_thread, flusher):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)
                stuck |= thread.is_alive()
        if stuck:
            _log.warning("%s: I/O thread did not stop; abandoning its output", self._label)
            return
        self.flush()
        if stop is not None:
            os.close(stop[0])
            os.close(stop[1])
        if self._owns_output and self._output is not None:
            close = getattr(self._output, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Serial({self._label!r})"


# -- configuration ---------------------------------------------------------------------------


class SerialType(Enum):
    """Where a COM port's output goes (crosvm's ``type=``)."""

    STDOUT = "stdout"
    FILE = "file"
    SINK = "sink"
    SYSLOG = "syslog"


class SerialHardware(Enum):
    """Which device presents the port to the guest (crosvm's ``hardware=``)."""

    SERIAL = "serial"
    VIRTIO_CONSOLE = "virtio-console"


_MAX_PORTS = 4


@dataclass(frozen=True, slots=True)
class SerialParameters:
    """One ``--serial`` option: ``type=stdout|file|sink|syslog[,num=1-4][,path=P][,console]
    [,stdin][,hardware=serial|virtio-console]``."""

    type: SerialType
    num: int = 1
    path: str | None = None
    console: bool = False
    stdin: bool = False
    hardware: SerialHardware = SerialHardware.SERIAL

    def __post_init__(self) -> None:
        if not 1 <= self.num <= _MAX_PORTS:
            raise SerialConfigError(f"num={self.num}", f"num must be 1 to {_MAX_PORTS}")
        if self.type is SerialType.FILE and not self.path:
            raise SerialConfigError("type=file", "type=file needs path=PATH")
        if self.path is not None and self.type is not SerialType.FILE:
            raise SerialConfigError(f"path={self.path}", "path= is only valid with type=file")

    @classmethod
    def parse(cls, text: str) -> SerialParameters:
        """Parse one ``--serial`` value; raises :class:`~devices.errors.SerialConfigError`."""
        kind: SerialType | None = None
        num = 1
        path: str | None = None
        console = stdin = False
        hardware = SerialHardware.SERIAL
        seen: set[str] = set()
        for item in text.split(","):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not key:
                raise SerialConfigError(text, "empty item")
            if key in seen:
                raise SerialConfigError(item, f"{key} given twice")
            seen.add(key)
            if key == "type":
                try:
                    kind = SerialType(value)
                except ValueError:
                    choices = "|".join(t.value for t in SerialType)
                    raise SerialConfigError(
                        item, f"unknown type {value!r} (expected {choices})"
                    ) from None
            elif key == "num":
                try:
                    num = int(value, 10)
                except ValueError:
                    raise SerialConfigError(item, "num must be an integer 1 to 4") from None
                if not 1 <= num <= _MAX_PORTS:
                    raise SerialConfigError(item, f"num must be 1 to {_MAX_PORTS}")
            elif key == "path":
                if not value:
                    raise SerialConfigError(item, "path must not be empty")
                path = value
            elif key in ("console", "stdin"):
                flag = _parse_flag(item, value if sep else "true")
                if key == "console":
                    console = flag
                else:
                    stdin = flag
            elif key == "hardware":
                try:
                    hardware = SerialHardware(value)
                except ValueError:
                    choices = "|".join(h.value for h in SerialHardware)
                    raise SerialConfigError(
                        item, f"unknown hardware {value!r} (expected {choices})"
                    ) from None
            else:
                raise SerialConfigError(item, f"unknown key {key!r}")
        if kind is None:
            raise SerialConfigError(text, "type= is required")
        return cls(kind, num, path, console, stdin, hardware)


def _parse_flag(item: str, value: str) -> bool:
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise SerialConfigError(item, "expected true or false")


def merge_serial_parameters(
    params: Iterable[SerialParameters],
) -> dict[int, SerialParameters]:
    """Combine user ``--serial`` options with crosvm's defaults, one entry per port 1-4.

    Defaults: COM1 = stdout + console (+ stdin), COM2-4 = sink. A user option replaces the
    default of its port. Rules (one-line :class:`SerialConfigError` otherwise): a port is given
    once, at most one console and one stdin port. When the user named no stdin port, the
    console port reads stdin if its output is stdout (crosvm's interactive default).
    """
    user: dict[int, SerialParameters] = {}
    for p in params:
        if p.num in user:
            raise SerialConfigError(f"num={p.num}", f"serial port {p.num} given twice")
        user[p.num] = p
    merged: dict[int, SerialParameters] = {}
    for num in range(1, _MAX_PORTS + 1):
        if num in user:
            merged[num] = user[num]
        elif num == 1:
            # COM1's default console role yields to a user console on another port.
            user_console = any(p.console for p in user.values())
            merged[num] = SerialParameters(SerialType.STDOUT, 1, console=not user_console)
        else:
            merged[num] = SerialParameters(SerialType.SINK, num)
    consoles = [n for n, p in merged.items() if p.console]
    if len(consoles) > 1:
        raise SerialConfigError("console", f"console set on ports {consoles}; allowed on one")
    stdins = [n for n, p in merged.items() if p.stdin]
    if len(stdins) > 1:
        raise SerialConfigError("stdin", f"stdin set on ports {stdins}; allowed on one")
    if not stdins and consoles:
        n = consoles[0]
        if merged[n].type is SerialType.STDOUT:
            p = merged[n]
            merged[n] = SerialParameters(p.type, p.num, p.path, p.console, True, p.hardware)
    return merged


# (I/O base, GSI) of COM1..COM4 (ttyS0..ttyS3), as on a PC.
COM_PORTS: tuple[tuple[int, int], ...] = ((0x3F8, 4), (0x2F8, 3), (0x3E8, 4), (0x2E8, 3))
COM_PORT_LENGTH = 8


@dataclass
class ComPort:
    """One built COM port: insert ``serial`` on the I/O bus at ``base`` (length 8) and register
    ``interrupt`` as an irqfd on ``gsi``; put ``console=<tty_name>`` on the kernel command line
    when ``params.console``; call :meth:`start` once the VM runs and :meth:`close` at exit."""

    num: int
    base: int
    gsi: int
    params: SerialParameters
    serial: Serial
    interrupt: InterruptEvent
    stdin_fd: int | None = None
    _owned: list[object] = field(default_factory=list, repr=False)

    @property
    def length(self) -> int:
        return COM_PORT_LENGTH

    @property
    def tty_name(self) -> str:
        return f"ttyS{self.num - 1}"

    def start(self) -> None:
        """Start reading stdin into the port when it was configured to."""
        if self.stdin_fd is not None:
            self.serial.start_input(self.stdin_fd)

    def close(self) -> None:
        self.serial.close()
        for obj in self._owned:
            close = getattr(obj, "close", None)
            if close is not None:
                close()
        self._owned.clear()


def create_com_ports(
    params: Sequence[SerialParameters] = (),
    *,
    make_event: Callable[[], InterruptEvent] | None = None,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
    syslog_tag: str = "crosvm",
) -> list[ComPort]:
    """Build the legacy-UART COM ports from ``--serial`` options merged with crosvm's defaults.

    ``make_event`` creates each port's interrupt event (default: a new ``sys_util.EventFd``,
    owned and closed by :meth:`ComPort.close`). Ports configured ``hardware=virtio-console``
    are left out (they belong to a virtio device). Output files are created here, so a bad
    path fails before the VM starts (``OSError``).
    """
    merged = merge_serial_parameters(params)
    ports: list[ComPort] = []
    try:
        for num, p in merged.items():
            if p.hardware is not SerialHardware.SERIAL:
                continue
            base, gsi = COM_PORTS[num - 1]
            owned: list[object] = []
            if make_event is None:
                from sys_util import EventFd

                evt: InterruptEvent = EventFd()
                owned.append(evt)
            else:
                evt = make_event()
            output: SerialWriter | None
            if p.type is SerialType.STDOUT:
                output = FdWriter(stdout_fd)
            elif p.type is SerialType.FILE:
                assert p.path is not None
                try:
                    output = FdWriter.create_file(p.path)
                except OSError:
                    for obj in owned:
                        with contextlib.suppress(Exception):
                            obj.close()  # type: ignore[attr-defined]
                    raise
            elif p.type is SerialType.SYSLOG:
                output = SyslogWriter(syslog_tag)
            else:
                output = None
            serial = Serial(evt, output, label=f"serial COM{num}", owns_output=True)
            ports.append(
                ComPort(num, base, gsi, p, serial, evt, stdin_fd if p.stdin else None, owned)
            )
    except BaseException:
        for port in ports:
            port.close()
        raise
    return ports
