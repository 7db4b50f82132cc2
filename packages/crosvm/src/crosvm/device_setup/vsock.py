"""virtio-vsock for ``--cid N`` (optionally ``--vsock-uds PATH``).

The device is always the Unix-socket ("hybrid") backend from :mod:`devices.virtio.vsock`: host
programs talk to the guest through ``PATH`` (``CONNECT <port>\\n``) and guest connections to host
port P go to ``PATH_P``. Without ``--vsock-uds`` the path is
``$TMPDIR/crosvm-vsock-<cid>.sock`` (``/tmp`` by default), so a host tool that knows the CID can
find it. A path some other live process listens on is an error, a stale one is replaced.

crosvm proper would use the kernel's vhost-vsock; that needs ``/dev/vhost-vsock`` and an ioctl
binding this tree does not have, so it is not attempted: the Unix-socket backend works on every
host and needs no privileges.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from crosvm.config import Config
from crosvm.errors import VmError
from devices.serial import SerialParameters
from devices.virtio import VirtioDevice
from devices.virtio.vsock import Vsock, VsockError, default_uds_path


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
    # Absolute: a sandboxed device resolves ``<path>_P`` from its jail's root, not our cwd.
    path = Path(os.path.abspath(uds_path(config)))
    try:
        device = Vsock(config.cid, path)
    except VsockError as err:
        raise VmError(f"--cid {config.cid}: {err}") from None
    stack.callback(device.close)
    return [device]
