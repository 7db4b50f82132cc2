"""The VM control socket: ``crosvm run -s PATH`` serves it, ``crosvm stop PATH`` (etc.) use it.

Requests and responses are fixed-layout ``msg_socket`` messages in crosvm's shape (``VmRequest``,
``VmResponse``). Each client connection carries one request and one response; the server answers
on the main thread, between the other events of the main loop, so handlers never race with VM
teardown.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from crosvm.errors import ConfigError, ControlError
from msg_socket import MsgError, MsgSocket, TaggedUnion, u32, u64, usize
from sys_util import UnixSeqpacket, UnixSeqpacketListener

log = logging.getLogger("crosvm.control")

REQUEST_TIMEOUT = 5.0  # seconds a client waits for the VM's answer
SERVER_RECV_TIMEOUT = 1.0  # seconds the server waits for a connected client's request


class BalloonControlCommand(TaggedUnion):
    pass


class Adjust(BalloonControlCommand):
    num_bytes: u64


class Stats(BalloonControlCommand):
    pass


class DiskControlCommand(TaggedUnion):
    pass


class Resize(DiskControlCommand):
    new_size: u64


class VmRequest(TaggedUnion):
    pass


class Exit(VmRequest):
    pass


class Suspend(VmRequest):
    pass


class Resume(VmRequest):
    pass


class BalloonCommand(VmRequest):
    command: BalloonControlCommand


class DiskCommand(VmRequest):
    disk_index: usize
    command: DiskControlCommand


class VmResponse(TaggedUnion):
    pass


class Ok(VmResponse):
    pass


class Err(VmResponse):
    errno: u32


class BalloonStats(VmResponse):
    """Guest memory statistics (virtio-balloon stats queue); all in bytes except the faults."""

    balloon_actual: u64
    swap_in: u64 | None
    swap_out: u64 | None
    major_faults: u64 | None
    minor_faults: u64 | None
    free_memory: u64 | None
    total_memory: u64 | None
    available_memory: u64 | None
    disk_caches: u64 | None


class ControlHandler(Protocol):
    """What the VM does for each request (implemented by crosvm.vm)."""

    def handle(self, request: VmRequest) -> VmResponse: ...


def socket_path_for(path: Path) -> Path:
    """crosvm's rule: a directory means ``crosvm-<pid>.sock`` inside it."""
    return path / f"crosvm-{os.getpid()}.sock" if path.is_dir() else path


@dataclass
class ControlServer:
    """The listening control socket (mode 0600, removed on close)."""

    path: Path
    handler: ControlHandler

    def __post_init__(self) -> None:
        self.path = socket_path_for(self.path)
        old_umask = os.umask(0o177)  # created 0600: only the owner may control the VM
        try:
            self._listener = UnixSeqpacketListener(self.path)
        except OSError as err:
            raise ConfigError(f"crosvm run: cannot create control socket {self.path}: "
                              f"{err.strerror}") from None  # fmt: skip
        finally:
            os.umask(old_umask)

    def fileno(self) -> int:
        return self._listener.fileno()

    def on_readable(self) -> None:
        """Accept one client and answer its request; a misbehaving client only loses its own."""
        try:
            conn = self._listener.accept()
        except OSError as err:
            log.warning("control socket accept failed: %s", err)
            return
        with MsgSocket(conn, VmResponse, VmRequest, recv_timeout=SERVER_RECV_TIMEOUT,
                       send_timeout=SERVER_RECV_TIMEOUT) as sock:  # fmt: skip
            try:
                request = sock.recv()
            except MsgError as err:
                log.warning("bad control request: %s", err)
                return
            try:
                response = self.handler.handle(request)
            except Exception:  # the VM keeps running whatever a request does
                log.exception("control request %r failed", request)
                response = Err(errno.EIO)
            try:
                sock.send(response)
            except MsgError as err:
                log.warning("control reply not delivered: %s", err)
        conn.close()

    def close(self) -> None:
        self._listener.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def send_request(path: str | os.PathLike[str], request: VmRequest) -> VmResponse:
    """Send one request to the VM behind ``path`` and return its answer (ControlError if not)."""
    try:
        conn = UnixSeqpacket.connect(path)
    except OSError as err:
        raise ControlError(f"cannot connect to control socket {path}: {err.strerror}") from None
    with MsgSocket(conn, VmRequest, VmResponse, send_timeout=REQUEST_TIMEOUT,
                   recv_timeout=REQUEST_TIMEOUT) as sock:  # fmt: skip
        try:
            sock.send(request)
            response = sock.recv()
        except MsgError as err:
            raise ControlError(f"control socket {path}: {err}") from None
    conn.close()
    if isinstance(response, Err):
        raise ControlError(f"the VM refused the request: {os.strerror(response.errno)}")
    return response
