"""The configuration of one ``crosvm run``: what the command line asked for, validated.

Parsing is separate from building the VM so that every mistake a user can make on the command line
is found before anything is created, and reported as one :class:`~crosvm.errors.ConfigError` line
(exit status 2). Option names and defaults follow crosvm's (see the repository README).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from crosvm.errors import ConfigError

DEFAULT_MEM_MIB = 256
DEFAULT_CPUS = 1
MAX_CPUS = 254  # APIC IDs are 8 bit and the IOAPIC takes the id after the last vCPU
MAX_DISKS = 26  # vda..vdz
MAX_DISK_ID_BYTES = 20  # virtio-blk's VIRTIO_BLK_ID_BYTES
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


@dataclass(frozen=True)
class DiskOption:
    """One ``--block``/``-r/--rwroot/-d/--rwdisk`` in command-line order (vda, vdb, ...).

    ``direct``: open the image with O_DIRECT (no host page cache); ``cold_reads_direct``
    (``cold-reads=direct``, the default; ``cold-reads=cached`` turns it off): large reads that
    miss the host page cache use O_DIRECT; ``serial``: the virtio-blk ID the guest reads
    (``/sys/block/vdX/serial``), at most 20 bytes.
    """

    path: Path
    read_only: bool
    root: bool = False
    direct: bool = False
    serial: str | None = None
    cold_reads_direct: bool = True


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def parse_block(text: str) -> DiskOption:
    """crosvm's ``--block PATH[,ro][,root][,direct=true][,id=SERIAL]`` (also ``path=PATH`` and
    ``ro=``/``root=``/``direct=`` with true/false), plus ``cold-reads=direct|cached``. Raises
    ``argparse.ArgumentTypeError``."""
    parts = text.split(",")
    path: str | None = None
    flags = {"ro": False, "root": False, "direct": False}
    serial: str | None = None
    cold_reads_direct = True
    for i, part in enumerate(parts):
        key, eq, value = part.partition("=")
        if i == 0 and not eq:
            path = part
        elif key == "path" and eq:
            path = value
        elif key in flags:
            if not eq or value in _TRUE:
                flags[key] = True
            elif value in _FALSE:
                flags[key] = False
            else:
                raise argparse.ArgumentTypeError(f"--block: {key}={value!r} is not true or false")
        elif key == "id" and eq:
            if not value or len(value.encode()) > MAX_DISK_ID_BYTES:
                raise argparse.ArgumentTypeError(
                    f"--block: id must be 1 to {MAX_DISK_ID_BYTES} bytes, got {value!r}"
                )
            serial = value
        elif key == "cold-reads" and eq:
            if value not in ("direct", "cached"):
                raise argparse.ArgumentTypeError(
                    f"--block: cold-reads={value!r} is not direct or cached"
                )
            cold_reads_direct = value == "direct"
        else:
            raise argparse.ArgumentTypeError(f"--block: unknown option {part!r}")
    if not path:
        raise argparse.ArgumentTypeError(f"--block: no image path in {text!r}")
    return DiskOption(
        Path(path), read_only=flags["ro"], root=flags["root"], direct=flags["direct"],
        serial=serial, cold_reads_direct=cold_reads_direct,
    )  # fmt: skip


@dataclass(frozen=True)
class NetOption:
    """A virtio-net NIC: a tap crosvm creates (host_ip/netmask/mac) or one given by name or fd."""

    host_ip: ipaddress.IPv4Address | None = None
    netmask: ipaddress.IPv4Address | None = None
    mac: str | None = None
    tap_name: str | None = None
    tap_fd: int | None = None
    vhost_net: bool = False


@dataclass
class Config:
    """Everything ``crosvm run`` was asked to do."""

    kernel: Path
    mem_mib: int = DEFAULT_MEM_MIB
    #: ask for transparent huge pages for guest memory (crosvm's --hugepages)
    hugepages: bool = False
    cpus: int = DEFAULT_CPUS
    params: list[str] = field(default_factory=list)
    initrd: Path | None = None
    serial: list[str] = field(default_factory=list)
    disks: list[DiskOption] = field(default_factory=list)
    socket_path: Path | None = None
    sandbox: bool = True
    seccomp_policy_dir: Path | None = None
    seccomp_log_failures: bool = False
    balloon: bool = True
    rng: bool = True
    cid: int | None = None
    #: virtio-vsock host socket (default: $TMPDIR/crosvm-vsock-<cid>.sock)
    vsock_uds: Path | None = None
    #: virtio-vsock backend: "uds" (host Unix sockets), "vhost" (the kernel's vhost-vsock) or
    #: "auto" (vhost when the node exists and no --vsock-uds was given)
    vsock_backend: str = "uds"
    #: the vhost-vsock node (crosvm's --vhost-vsock-device)
    vhost_vsock_device: Path = Path("/dev/vhost-vsock")
    #: the vhost-net node used by --vhost-net (crosvm's --vhost-net-device)
    vhost_net_device: Path = Path("/dev/vhost-net")
    net: list[NetOption] = field(default_factory=list)

    @property
    def root_disk_index(self) -> int | None:
        return next((i for i, d in enumerate(self.disks) if d.root), None)


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a mistake as one line and exit status 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message}")


def _positive_int(name: str, limit: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not 1 <= value <= limit:
            raise argparse.ArgumentTypeError(f"{name} must be between 1 and {limit}, got {value}")
        return value

    return parse


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory, expected a file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: not readable")
    return path


def _ipv4(text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from None


def _netmask(text: str) -> ipaddress.IPv4Address:
    mask = _ipv4(text)
    bits = int(mask)
    inverted = ~bits & 0xFFFFFFFF
    if inverted & (inverted + 1):  # the ones must be contiguous from the top
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid netmask")
    return mask


def _mac(text: str) -> str:
    if not _MAC_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a MAC address (xx:xx:xx:xx:xx:xx)")
    if int(text[:2], 16) & 1:
        raise argparse.ArgumentTypeError(f"{text!r} is a multicast MAC address")
    return text.lower()


class _DiskAction(argparse.Action):
    """Collect every disk option into one list, keeping command-line order (vda, vdb, ...)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        disks: list[DiskOption] = getattr(namespace, "disks", None) or []
        if option_string == "--block":
            try:
                disk = parse_block(values)
            except argparse.ArgumentTypeError as err:
                parser.error(str(err))
        else:
            read_only = option_string in ("-r", "--root", "-d", "--disk")
            root = option_string in ("-r", "--root", "--rwroot")
            disk = DiskOption(Path(values), read_only=read_only, root=root)
        if disk.root and any(d.root for d in disks):
            parser.error(
                "only one root disk (-r/--root, --rwroot or --block ...,root) may be given"
            )
        if len(disks) >= MAX_DISKS:
            parser.error(f"at most {MAX_DISKS} disks are supported")
        disks.append(disk)
        namespace.disks = disks


def build_run_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="crosvm run",
        description="Boot a Linux kernel (ELF vmlinux or bzImage) in a KVM virtual machine.",
    )
    parser.add_argument("kernel", metavar="KERNEL", type=_existing_file, help="kernel to boot")
    parser.add_argument(
        "-m", "--mem", type=_positive_int("--mem", 1 << 20), default=DEFAULT_MEM_MIB,
        metavar="N", help=f"guest memory in MiB (default {DEFAULT_MEM_MIB})",
    )  # fmt: skip
    parser.add_argument(
        "-c", "--cpus", type=_positive_int("--cpus", MAX_CPUS), default=DEFAULT_CPUS,
        metavar="N", help=f"number of vCPUs (default {DEFAULT_CPUS})",
    )  # fmt: skip
    parser.add_argument(
        "-p", "--params", action="append", default=[], metavar="PARAMS",
        help="extra kernel command line (repeatable)",
    )  # fmt: skip
    parser.add_argument("-i", "--initrd", type=_existing_file, metavar="PATH", help="initramfs")
    parser.add_argument(
        "--serial", action="append", default=[], metavar="PARAMS",
        help="type=stdout|file|sink|syslog[,num=1-4][,path=P][,console][,stdin]"
        "[,hardware=serial|virtio-console]",
    )  # fmt: skip
    parser.add_argument(
        "--block", action=_DiskAction, dest="disks",
        metavar="PATH[,ro][,root][,direct=true][,cold-reads=direct|cached][,id=SERIAL]",
        help="virtio-blk disk (raw or qcow2; repeatable): read-only, root (adds root=/dev/vdX), "
        "O_DIRECT, serial",
    )  # fmt: skip
    for flags, text in (
        (("-r", "--root"), "read-only root disk; adds root=/dev/vdX ro"),
        (("--rwroot",), "writable root disk; adds root=/dev/vdX rw"),
        (("-d", "--disk"), "read-only virtio-blk disk (raw or qcow2; repeatable)"),
        (("--rwdisk",), "writable virtio-blk disk (raw or qcow2; repeatable)"),
    ):
        parser.add_argument(*flags, action=_DiskAction, dest="disks", metavar="PATH", help=text)
    parser.add_argument("-s", "--socket", type=Path, metavar="PATH", help="control socket")
    parser.add_argument(
        "--hugepages", action="store_true",
        help="back guest memory with transparent huge pages (needs THP for shmem on the host)",
    )  # fmt: skip
    parser.add_argument(
        "--disable-sandbox", action="store_true", help="run every device in the main process"
    )
    parser.add_argument("--seccomp-policy-dir", type=Path, metavar="DIR")
    parser.add_argument("--seccomp-log-failures", action="store_true")
    balloon = parser.add_mutually_exclusive_group()
    balloon.add_argument("--balloon", dest="balloon", action="store_true", default=True)
    balloon.add_argument("--no-balloon", dest="balloon", action="store_false")
    parser.add_argument("--no-rng", dest="rng", action="store_false", help="no virtio-rng")
    parser.add_argument("--cid", type=_positive_int("--cid", 0xFFFFFFFE), metavar="CID")
    parser.add_argument(
        "--vsock-uds", type=Path, metavar="PATH",
        help="virtio-vsock host socket (default $TMPDIR/crosvm-vsock-CID.sock); needs --cid",
    )  # fmt: skip
    parser.add_argument("--host_ip", "--host-ip", dest="host_ip", type=_ipv4, metavar="IP")
    parser.add_argument("--netmask", type=_netmask, metavar="MASK")
    parser.add_argument("--mac", type=_mac, metavar="MAC")
    parser.add_argument("--tap-name", metavar="NAME")
    parser.add_argument("--tap-fd", type=_positive_int("--tap-fd", 1 << 20), metavar="FD")
    parser.add_argument(
        "--vhost-net", action="store_true",
        help="serve the NIC's rings in the host kernel (vhost-net) instead of crosvm",
    )  # fmt: skip
    parser.add_argument(
        "--vhost-net-device", type=Path, metavar="PATH",
        help="vhost-net node for --vhost-net (default /dev/vhost-net)",
    )  # fmt: skip
    parser.add_argument(
        "--vsock-backend", choices=("auto", "uds", "vhost"), metavar="{auto,uds,vhost}",
        help="virtio-vsock backend: uds (host Unix sockets, the default), vhost (the kernel's "
        "vhost-vsock: host programs use AF_VSOCK) or auto (vhost if its node exists and no "
        "--vsock-uds is given)",
    )  # fmt: skip
    parser.add_argument(
        "--vhost-vsock-device", type=Path, metavar="PATH",
        help="vhost-vsock node (default /dev/vhost-vsock); implies --vsock-backend vhost",
    )  # fmt: skip
    return parser


def _vhost_options(ns: argparse.Namespace) -> dict[str, Any]:
    """The vhost options of ``ns`` as Config fields, checked against each other."""
    backend = ns.vsock_backend
    if backend is None:
        backend = "vhost" if ns.vhost_vsock_device is not None else "uds"
    if backend == "uds" and ns.vhost_vsock_device is not None:
        raise ConfigError("crosvm run: --vhost-vsock-device needs --vsock-backend vhost or auto")
    if backend == "vhost" and ns.vsock_uds is not None:
        raise ConfigError("crosvm run: --vsock-uds is for --vsock-backend uds, not vhost")
    if ns.vsock_backend is not None and ns.cid is None:
        raise ConfigError("crosvm run: --vsock-backend needs --cid")
    if ns.vhost_net_device is not None and not ns.vhost_net:
        raise ConfigError("crosvm run: --vhost-net-device needs --vhost-net")
    fields: dict[str, Any] = {"vsock_backend": backend}
    if ns.vhost_vsock_device is not None:
        fields["vhost_vsock_device"] = ns.vhost_vsock_device
    if ns.vhost_net_device is not None:
        fields["vhost_net_device"] = ns.vhost_net_device
    return fields


def parse_run_args(argv: Sequence[str]) -> Config:
    """Parse and validate ``crosvm run`` arguments. Raises ConfigError (exit status 2)."""
    try:
        ns = build_run_parser().parse_args(list(argv))
    except argparse.ArgumentTypeError as err:  # pragma: no cover - argparse routes these to error
        raise ConfigError(f"crosvm run: {err}") from None
    disks: list[DiskOption] = ns.disks or []
    for disk in disks:
        try:
            _existing_file(str(disk.path))
        except argparse.ArgumentTypeError as err:
            raise ConfigError(f"crosvm run: disk {err}") from None
    net: list[NetOption] = []
    existing_tap = ns.tap_name is not None or ns.tap_fd is not None
    if (
        ns.host_ip is not None
        or ns.netmask is not None
        or (ns.mac is not None and not existing_tap)
    ):
        if ns.host_ip is None or ns.netmask is None or ns.mac is None:
            raise ConfigError("crosvm run: --host_ip, --netmask and --mac must be given together")
        net.append(
            NetOption(host_ip=ns.host_ip, netmask=ns.netmask, mac=ns.mac, vhost_net=ns.vhost_net)
        )
    if ns.tap_name is not None:
        net.append(NetOption(tap_name=ns.tap_name, mac=ns.mac, vhost_net=ns.vhost_net))
    if ns.tap_fd is not None:
        net.append(NetOption(tap_fd=ns.tap_fd, mac=ns.mac, vhost_net=ns.vhost_net))
    if ns.socket is not None and ns.socket.exists() and not ns.socket.is_dir():
        raise ConfigError(f"crosvm run: control socket {ns.socket} already exists")
    return Config(
        kernel=ns.kernel,
        mem_mib=ns.mem,
        hugepages=ns.hugepages,
        cpus=ns.cpus,
        params=ns.params,
        initrd=ns.initrd,
        serial=ns.serial,
        disks=disks,
        socket_path=ns.socket,
        sandbox=not ns.disable_sandbox,
        seccomp_policy_dir=ns.seccomp_policy_dir,
        seccomp_log_failures=ns.seccomp_log_failures,
        balloon=ns.balloon,
        rng=ns.rng,
        cid=ns.cid,
        vsock_uds=ns.vsock_uds,
        net=net,
        **_vhost_options(ns),
    )
