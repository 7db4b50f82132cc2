"""virtio-net NICs for ``--host_ip/--netmask/--mac``, ``--tap-name`` and ``--tap-fd``.

With ``--host_ip`` crosvm creates a tap (``vmtap0``, ``vmtap1``... the kernel picks the number),
gives the HOST side of it the address and netmask and brings it up; the guest gets ``--mac`` in
the device's configuration space and configures its own address. ``--tap-name`` attaches to an
existing (usually persistent, pre-configured) tap; ``--tap-fd`` adopts a tap fd the caller
opened and passed down. Host configuration goes through rtnetlink (pyroute2), never by running
``ip``.

``--vhost-net`` keeps the same tap and guest-visible device but hands the rings to the host
kernel (:class:`devices.virtio.vhost.VhostNet`): frames then move between the tap and guest
memory without passing through crosvm. The vhost-net node (``--vhost-net-device``, default
``/dev/vhost-net``) is opened here, before the tap is created, so a host without it fails with
one line and leaves no tap behind. Like every virtio device it runs jailed
(``vhost_net_device.policy``): the fd is opened here and kept across the fork, and the jailed
process becomes the vhost owner when the guest activates the device.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
from pathlib import Path

from crosvm.config import Config, NetOption
from crosvm.errors import VmError
from devices.serial import SerialParameters
from devices.virtio import VirtioDevice
from devices.virtio.net import Net, Tap, TapError, parse_mac
from devices.virtio.vhost import VhostDeviceError
from devices.virtio.vhost import VhostNet as VhostNetDevice
from sys_util import VhostError
from sys_util import VhostNet as VhostNetFd

__all__ = ["VHOST_NET_PATH", "configure_host_side", "create", "open_tap", "open_vhost_net"]

log = logging.getLogger(__name__)

VHOST_NET_PATH = "/dev/vhost-net"
TAP_NAME_TEMPLATE = "vmtap%d"


def configure_host_side(
    name: str, host_ip: ipaddress.IPv4Address, netmask: ipaddress.IPv4Address
) -> None:
    """Assign ``host_ip/netmask`` to interface ``name`` and set it up (rtnetlink)."""
    from pyroute2 import IPRoute  # imported here: only tap creation needs it
    from pyroute2.netlink.exceptions import NetlinkError

    prefix = ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                raise VmError(f"tap {name}: interface vanished before it could be configured")
            index = found[0]
            ipr.addr("add", index=index, address=str(host_ip), prefixlen=prefix)
            ipr.link("set", index=index, state="up")
    except NetlinkError as err:
        raise VmError(f"tap {name}: cannot set {host_ip}/{prefix} or bring it up: {err}") from None


def open_tap(option: NetOption) -> Tap:
    """The tap ``option`` describes, configured and ready for a :class:`Net`."""
    try:
        if option.tap_fd is not None:
            try:
                os.fstat(option.tap_fd)
            except OSError:
                raise VmError(f"--tap-fd {option.tap_fd}: not an open file descriptor") from None
            return Tap.from_fd(option.tap_fd)
        if option.tap_name is not None:
            return Tap.create(option.tap_name)
        tap = Tap.create(TAP_NAME_TEMPLATE)
    except TapError as err:
        raise VmError(str(err)) from None
    try:
        assert option.host_ip is not None and option.netmask is not None
        configure_host_side(tap.name, option.host_ip, option.netmask)
    except BaseException:
        tap.close()
        raise
    log.info("tap %s: host side %s/%s", tap.name, option.host_ip, option.netmask)
    return tap


def open_vhost_net(path: str | os.PathLike[str] = VHOST_NET_PATH) -> VhostNetFd:
    """Open the vhost-net node; a missing node is the one-line "not available" error."""
    try:
        return VhostNetFd.open(path)
    except VhostError as err:
        if err.errno == errno.ENOENT:
            raise VmError(f"vhost-net not available on this host ({path} missing)") from None
        raise VmError(f"--vhost-net: cannot open {path}: {err.strerror}") from None


def _vhost_net(option: NetOption, mac: bytes | None, device: Path) -> VhostNetDevice:
    vhost = open_vhost_net(device)
    try:
        tap = open_tap(option)
    except BaseException:
        vhost.close()
        raise
    try:
        net = VhostNetDevice(vhost, tap, mac=mac)
    except VhostDeviceError as err:
        vhost.close()
        tap.close()
        raise VmError(f"--vhost-net: {err}") from None
    except BaseException:
        vhost.close()
        tap.close()
        raise
    return net


def create(
    config: Config, serial: list[SerialParameters], stack: contextlib.ExitStack
) -> list[VirtioDevice]:
    devices: list[VirtioDevice] = []
    for option in config.net:
        mac = parse_mac(option.mac) if option.mac is not None else None
        device: VirtioDevice
        if option.vhost_net:
            device = _vhost_net(option, mac, config.vhost_net_device)
        else:
            device = Net(open_tap(option), mac=mac)
        stack.callback(device.close)
        devices.append(device)
    return devices
