"""Drive the guest's /init over a serial console (QEMU's or crosvm's stdio).

The guest prints ``GUEST-*`` marker lines (see guest-init.sh). In delegate mode the host
writes ``<id> <command>`` lines and reads the output between ``GUEST-CMD-START <id>`` and
``GUEST-CMD-END <id> rc=N``. A reader thread collects the console so waits have timeouts and
the whole transcript is kept for failure messages.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import IO

__all__ = ["CommandResult", "ConsoleTimeout", "GuestConsole", "stop_guest_process"]


class ConsoleTimeout(TimeoutError):
    """An expected console line did not come in time. ``transcript`` holds the tail."""

    def __init__(self, what: str, timeout: float, transcript: str) -> None:
        self.what = what
        self.timeout = timeout
        self.transcript = transcript
        super().__init__(f"no {what} within {timeout:g} s; console tail:\n{transcript[-3000:]}")


@dataclass(frozen=True)
class CommandResult:
    """One delegated command: its exit status, output lines and guest-clock duration."""

    command: str
    rc: int
    lines: tuple[str, ...]
    guest_seconds: float

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


class GuestConsole:
    """The host side of the guest console.

    Args:
        rx: file descriptor (or binary file) the guest's console output is read from.
        tx: file descriptor (or binary file) the host writes console input to.
        log: optional file that receives a copy of everything the guest prints.
    """

    def __init__(self, rx: int | IO[bytes], tx: int | IO[bytes], log: IO[str] | None = None):
        self._rx = rx if isinstance(rx, int) else rx.fileno()
        self._tx = tx if isinstance(tx, int) else tx.fileno()
        self._log = log
        self._lines: list[str] = []
        self._partial = ""
        self._eof = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._reader, name="guest-console", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        while True:
            try:
                chunk = os.read(self._rx, 65536)
            except OSError:
                chunk = b""
            with self._cond:
                if not chunk:
                    if self._partial:
                        self._lines.append(self._partial)
                        self._partial = ""
                    self._eof = True
                    self._cond.notify_all()
                    return
                text = self._partial + chunk.decode("utf-8", errors="replace").replace("\r", "")
                *complete, self._partial = text.split("\n")
                self._lines.extend(complete)
                if self._log is not None:
                    for line in complete:
                        self._log.write(line + "\n")
                    self._log.flush()
                self._cond.notify_all()

    @property
    def lines(self) -> list[str]:
        """Every complete line so far."""
        with self._cond:
            return list(self._lines)

    @property
    def transcript(self) -> str:
        with self._cond:
            return "\n".join([*self._lines, self._partial])

    @property
    def eof(self) -> bool:
        with self._cond:
            return self._eof

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> tuple[int, re.Match[str]]:
        """Wait for a line matching ``pattern`` (regex, searched) at index ``start`` or later;
        return its index and match. Raises :class:`ConsoleTimeout` (also at EOF)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self._lines):
                    m = rx.search(self._lines[i])
                    if m:
                        return i, m
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    tail = "\n".join(self._lines[-60:])
                    what = f"line matching {pattern!r}" + (" (console closed)" if self._eof else "")
                    raise ConsoleTimeout(what, timeout, tail)
                self._cond.wait(left)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._tx, view)
            view = view[n:]

    def wait_ready(self, timeout: float) -> str:
        """Wait for ``GUEST-INIT-READY``; return the guest's mode."""
        _, m = self.wait_for(r"GUEST-INIT-READY(?: mode=(\S+))?", timeout)
        return m.group(1) or ""

    def run(self, command: str, timeout: float = 60.0) -> CommandResult:
        """Run one shell command in a delegate-mode guest; return its status and output."""
        if "\n" in command or "\r" in command:
            raise ValueError("one command per line: join with ';' or '&&'")
        cid = secrets.token_hex(4)
        start = len(self.lines)
        self.write(f"{cid} {command}\n".encode())
        i, _ = self.wait_for(rf"^GUEST-CMD-START {cid}$", timeout, start)
        j, m = self.wait_for(rf"GUEST-CMD-END {cid} rc=(\d+) cs=(-?\d+)", timeout, i + 1)
        all_lines = self.lines
        lines = all_lines[i + 1 : j]
        if m.start() > 0:  # the output did not end with a newline
            lines.append(all_lines[j][: m.start()])
        return CommandResult(command, int(m.group(1)), tuple(lines), int(m.group(2)) / 100)

    def close(self) -> None:
        """Stop reading (the reader ends at EOF of ``rx``; the caller owns the fds)."""
        self._thread.join(timeout=5)


def stop_guest_process(proc: subprocess.Popen[bytes], console: GuestConsole) -> None:
    """Kill a VMM whose console ``console`` reads (if it still runs), then close both ends."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    console.close()
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            try:
                f.close()
            except BrokenPipeError:
                pass
