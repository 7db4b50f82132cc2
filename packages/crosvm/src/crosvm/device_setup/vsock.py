"""virtio-vsock for ``--cid N``: the Unix-socket backend or the kernel's vhost-vsock.

``--vsock-backend`` picks the backend:

* ``uds`` (the default): the Unix-socket ("hybrid") backend from :mod:`devices.virtio.vsock`.
  Host programs talk to the guest through ``PATH`` (``CONNECT <port>\\n``) and guest connections
  to host port P go to ``PATH_P``. Without ``--vsock-uds`` the path is
  ``$TMPDIR/crosvm-vsock-<cid>.sock`` (``/tmp`` by default), so a host tool that knows the CID
  can find it. A path some other live process listens on is an error, a stale one is replaced.
  It works on every host and needs no privileges, which is why it stays the default: a crosvm
  started the same way behaves the same on every host.
* ``vhost``: crosvm's own choice, the kernel's vhost-vsock (``--vhost-vsock-device``, default
  ``/dev/vhost-vsock``; giving that option selects this backend). Host programs use
  ``AF_VSOCK`` sockets with the guest's CID; the kernel serves the rx/tx rings, crosvm only the
  event queue. A missing node is a one-line error; the CID is claimed when the device is
  created, so a CID another VM holds fails before the VM starts.
* ``auto``: ``vhost`` when the node exists and no ``--vsock-uds`` was given, else ``uds``.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from crosvm.config import Config
from crosvm.errors import VmError
from devices.serial import SerialParameters
from devices.virtio import VirtioDevice
from devices.virtio.vhost import VhostDeviceError
from devices.virtio.vhost import VhostVsock as VhostVsockDevice
from devices.virtio.vsock import Vsock, VsockError, default_uds_path
from sys_util import VhostError
from sys_util import VhostVsock as VhostVsockFd


def backend(config: Config) -> str:
    """``"uds"`` or ``"vhost"``: the backend ``config`` gets (``auto`` resolved on this host)."""
    if config.vsock_backend == "auto":
        usable = config.vsock_uds is None and os.path.exists(config.vhost_vsock_device)
        return "vhost" if usable else "uds"
    return config.vsock_backend


def _vhost(cid: int, path: Path) -> VhostVsockDevice:
    try:
        vhost = VhostVsockFd.open(path)
    except VhostError as err:
        if err.errno == errno.ENOENT:
            raise VmError(f"vhost-vsock not available on this host ({path} missing)") from None
        raise VmError(f"--vsock-backend vhost: cannot open {path}: {err.strerror}") from None
    try:
        device = VhostVsockDevice(vhost, cid)
    except VhostDeviceError as err:
        vhost.close()
        raise VmError(f"--cid {cid}: {err}") from None
    except BaseException:
        vhost.close()
        raise
    return device


def uds_path(config: Config) -> Path:
    """The device's listening socket for ``config`` (``--vsock-uds`` or the CID default)."""
    assert config.cid is not None
    explicit = config.vsock_uds
    return explicit if explicit is not None else default_uds_path(config.cid)


def create(
    config: Config, serial: list[SerialParameters], stack: contextlib.ExitStack
) -> list[VirtioDevice]:
    if config.cid is None:
        if config.vsock_uds is not None:
            raise VmError("--vsock-uds needs --cid")
        return []
    if backend(config) == "vhost":
        vhost = _vhost(config.cid, config.vhost_vsock_device)
        stack.callback(vhost.close)
        return [vhost]
    # Absolute: a sandboxed device resolves ``<path>_P`` from its jail's root, not our cwd.
    path = Path(os.path.abspath(uds_path(config)))
    try:
        device = Vsock(config.cid, path)
    except VsockError as err:
        raise VmError(f"--cid {config.cid}: {err}") from None
    stack.callback(device.close)
    return [device]
