"""virtio-net end to end: the C test guest's net-echo and net-bench under ``crosvm run``.

Every test makes its own network namespace (``pycrosvm-test-<random>``) and runs crosvm inside
it with ``ip netns exec``, so the tap crosvm creates, the host address it is given and every
frame stay in that namespace; the namespace is deleted afterwards. The host end of the wire is
an AF_PACKET socket opened inside the namespace (by a short child process that passes its fd
back) and bound to the tap, listening for EtherType 0x88B5 (IEEE local experimental) only.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fixture import GuestConfig, HostProfile, build_guest
from fixture._run import GuestVm
from fixture._vmm import crosvm_command

pytestmark = [pytest.mark.kvm, pytest.mark.root]

CROSVM = shutil.which("crosvm") or "crosvm"
ETH_TEST = 0x88B5
GUEST_MAC = "02:00:5e:10:00:01"
PEER_MAC = bytes.fromhex("02005e100002")  # the "host" station the frames come from
HOST_IP, NETMASK = "10.213.7.1", "255.255.255.0"

_SOCKET_CHILD = r"""
import socket, sys, time
name, fd = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 30
while True:  # the tap appears once crosvm has set its devices up
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        s.bind((name, 0x88B5))
        break
    except OSError:
        s.close()
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: no drops while we check
socket.send_fds(socket.socket(fileno=fd), [b"ok"], [s.fileno()])
"""


class Netns:
    """A named network namespace that exists for the lifetime of this object."""

    def __init__(self) -> None:
        self.name = f"pycrosvm-test-{secrets.token_hex(4)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=30)
        try:  # no IPv6 autoconfiguration chatter (router solicitations, MLD) on the taps
            self.run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                     "net.ipv6.conf.default.disable_ipv6=1")  # fmt: skip
        except BaseException:
            self.close()
            raise

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str) -> str:
        return subprocess.run(
            self.exec_argv(argv), check=True, capture_output=True, text=True, timeout=30
        ).stdout

    def packet_socket(self, ifname: str) -> socket.socket:
        """An AF_PACKET socket for EtherType 0x88B5 on ``ifname`` inside the namespace."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        with parent, child:
            proc = subprocess.run(
                self.exec_argv([sys.executable, "-c", _SOCKET_CHILD, ifname, str(child.fileno())]),
                pass_fds=(child.fileno(),), capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if proc.returncode:
                raise RuntimeError(f"packet socket in {self.name}: {proc.stderr.strip()}")
            _, fds, _, _ = socket.recv_fds(parent, 16, 1)
        return socket.socket(fileno=fds[0])

    def persistent_tap(self, name: str) -> None:
        """A tap that exists before any VMM attaches (``--tap-name``, QEMU ``ifname=``)."""
        self.run("ip", "tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr")
        self.run("ip", "link", "set", "dev", name, "up")

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, timeout=30)


@pytest.fixture
def netns() -> Iterator[Netns]:
    ns = Netns()
    try:
        yield ns
    finally:
        ns.close()


def crosvm_net_argv(cfg: GuestConfig, net_args: Sequence[str], crosvm: str = CROSVM) -> list[str]:
    """crosvm argv for ``cfg`` with ``net_args`` before the kernel path."""
    argv = crosvm_command(build_guest(), cfg, crosvm=crosvm)
    return [*argv[:-1], *net_args, argv[-1]]


def tap_args(mac: str = GUEST_MAC) -> list[str]:
    return ["--host_ip", HOST_IP, "--netmask", NETMASK, "--mac", mac]


def launch_in(ns: Netns, argv: Sequence[str]) -> GuestVm:
    return GuestVm(ns.exec_argv(argv))


def frame(dst: bytes, payload: bytes) -> bytes:
    return dst + PEER_MAC + struct.pack(">H", ETH_TEST) + payload


def echo_round_trip(
    sock: socket.socket,
    guest_mac: bytes,
    count: int,
    window: int = 16,
    *,
    min_size: int = 46,
    digests: tuple[Any, Any] | None = None,
) -> int:
    """Send ``count`` random frames (payloads of ``min_size``..1500 bytes) in windows, check
    each echo; return payload bytes. ``digests`` (two hashlib objects) are fed every payload
    sent and every payload echoed back."""
    rng = random.Random(1234)
    sock.settimeout(30)
    total = 0
    for start in range(0, count, window):
        sent = []
        for i in range(start, min(count, start + window)):
            size = rng.randrange(min_size, 1501)
            payload = struct.pack(">I", i) + rng.randbytes(size - 4)
            sent.append(payload)
            sock.send(frame(guest_mac, payload))
            if digests is not None:
                digests[0].update(payload)
        for payload in sent:
            got = sock.recv(4096)
            assert got[:6] == PEER_MAC, "echo not addressed back to the sender"
            assert got[6:12] == guest_mac
            assert struct.unpack(">H", got[12:14])[0] == ETH_TEST
            assert got[14:] == payload, f"payload {struct.unpack('>I', payload[:4])[0]} differs"
            if digests is not None:
                digests[1].update(got[14:])
            total += len(payload)
    return total


def finish_echo(vm: GuestVm, sock: socket.socket, guest_mac: bytes) -> dict[str, str]:
    sock.send(frame(guest_mac, b"END" + bytes(43)))
    result = vm.wait(120).check()
    return result.find("net_rx")


def test_net_echo_with_a_tap_crosvm_creates(netns: Netns) -> None:
    cfg = GuestConfig("net-echo", params={"timeout_ms": 120000})
    with launch_in(netns, crosvm_net_argv(cfg, tap_args())) as vm:
        m = vm.wait_for(r"READY net-echo mac=(\S+)", 120)
        assert m.group(1) == GUEST_MAC  # the guest read --mac from the config space
        links = netns.run("ip", "-o", "-4", "addr", "show")
        assert re.search(rf"vmtap0\s+inet {HOST_IP}/24", links), links  # host side configured
        assert "UP" in netns.run("ip", "-o", "link", "show", "vmtap0")
        mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
        with netns.packet_socket("vmtap0") as sock:
            payload_bytes = echo_round_trip(sock, mac, 200)
            res = finish_echo(vm, sock, mac)
    assert int(res["net_rx"]) == 201 and int(res["net_tx"]) == 201
    assert int(res["bad"]) == 0
    assert int(res["net_bytes"]) == payload_bytes + 200 * 14 + 60


def test_net_echo_64_mib_each_way_arrives_intact(netns: Netns) -> None:
    """64 MiB of full-size frames host -> guest and back through the tap (the guest echoes each
    one), at the test guest's native speed: each echo equals its frame, and the sha256 of all
    the host got back equals that of all it sent. (The TCP transfer with a Linux guest moves
    64 MiB only on hardware KVM, where its kernel is not emulated: test_linux_iperf.)"""
    count = ((64 << 20) + 1499) // 1500
    cfg = GuestConfig("net-echo", params={"timeout_ms": 120000})
    with launch_in(netns, crosvm_net_argv(cfg, tap_args())) as vm:
        vm.wait_for(r"READY net-echo mac=(\S+)", 120)
        mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
        sent, echoed = hashlib.sha256(), hashlib.sha256()
        with netns.packet_socket("vmtap0") as sock:
            payload_bytes = echo_round_trip(sock, mac, count, 32, min_size=1500,
                                            digests=(sent, echoed))  # fmt: skip
            res = finish_echo(vm, sock, mac)
    assert payload_bytes == count * 1500 >= 64 << 20
    assert echoed.hexdigest() == sent.hexdigest()
    assert int(res["net_rx"]) == int(res["net_tx"]) == count + 1
    assert int(res["bad"]) == 0


_TAP_FD_LAUNCHER = r"""
import os, subprocess, sys
from devices.virtio.net import Tap
tap = Tap.create("pyfdtap0")
subprocess.run(["ip", "link", "set", "dev", tap.name, "up"], check=True)
fd = tap.fileno()
os.set_inheritable(fd, True)
argv = [a.replace("@FD@", str(fd)) for a in sys.argv[1:]]
os.execvp(argv[0], argv)
"""


def test_net_echo_with_an_inherited_tap_fd(netns: Netns) -> None:
    cfg = GuestConfig("net-echo", params={"timeout_ms": 120000})
    # config.py accepts --mac only together with --host_ip/--netmask: no MAC feature here, so
    # the guest uses its own default address.
    argv = crosvm_net_argv(cfg, ["--tap-fd", "@FD@"])
    with launch_in(netns, [sys.executable, "-c", _TAP_FD_LAUNCHER, *argv]) as vm:
        m = vm.wait_for(r"READY net-echo mac=(\S+)", 120)
        assert m.group(1) == "02:01:02:03:04:05"  # net.c's default without VIRTIO_NET_F_MAC
        mac = bytes.fromhex(m.group(1).replace(":", ""))
        with netns.packet_socket("pyfdtap0") as sock:
            echo_round_trip(sock, mac, 20)
            res = finish_echo(vm, sock, mac)
    assert int(res["net_rx"]) == 21


def count_bench_frames(sock: socket.socket, frames: int, timeout: float) -> tuple[set[int], int]:
    """Sequence numbers and bytes of the net-bench frames that reach the host socket."""
    sock.settimeout(5)
    seen: set[int] = set()
    nbytes = 0
    deadline = time.monotonic() + timeout
    while len(seen) < frames and time.monotonic() < deadline:
        try:
            got = sock.recv(4096)
        except TimeoutError:
            break
        assert got[:6] == b"\xff" * 6
        seen.add(struct.unpack_from("<Q", got, 14)[0])
        nbytes += len(got)
    return seen, nbytes


def test_net_bench_frames_all_arrive(netns: Netns) -> None:
    frames, size = 3000, 1514
    netns.persistent_tap("pyctap0")
    cfg = GuestConfig("net-bench", params={"frames": frames, "size": size})
    # The socket is bound before the guest sends anything.
    with (
        netns.packet_socket("pyctap0") as sock,
        launch_in(netns, crosvm_net_argv(cfg, ["--tap-name", "pyctap0"])) as vm,
    ):
        seen, nbytes = count_bench_frames(sock, frames, 120)
        res = vm.wait(120).check().find("net_bench_frames")
    assert int(res["net_bench_frames"]) == frames
    assert seen == set(range(frames)), f"host saw {len(seen)} of {frames} frames"
    assert nbytes == frames * size


def test_net_bench_receive_counts_every_frame_in_order(netns: Netns) -> None:
    """net-bench dir=rx: frames from the host reach the guest whole, once and in order. The
    tap's queue is made deep enough (txqueuelen) that nothing is dropped before crosvm."""
    frames = 3000
    netns.persistent_tap("pyctap0")
    netns.run("ip", "link", "set", "dev", "pyctap0", "txqueuelen", str(2 * frames))
    cfg = GuestConfig("net-bench", params={"dir": "rx", "idle_ms": 20000})
    argv = crosvm_net_argv(cfg, ["--tap-name", "pyctap0"])
    with launch_in(netns, argv) as vm, netns.packet_socket("pyctap0") as sock:
        mac = bytes.fromhex(vm.wait_for(r"READY net-bench dir=rx mac=(\S+)", 120).group(1)
                            .replace(":", ""))  # fmt: skip
        for i in range(frames):
            sock.send(frame(mac, struct.pack("<Q", i) + bytes(1500 - 8)))
        sock.send(frame(mac, b"END" + bytes(43)))
        res = vm.wait(120).check().find("net_rx_frames")
    assert int(res["net_rx_frames"]) == frames
    assert int(res["max_seq"]) == frames - 1
    assert int(res["reordered"]) == 0
    assert int(res["bytes"]) == frames * 1514


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host_ip", HOST_IP, "--netmask", "255.0.255.0", "--mac", GUEST_MAC], "netmask"),
        (["--host_ip", HOST_IP, "--netmask", NETMASK, "--mac", "01:00:00:00:00:01"], "multicast"),
        ([*tap_args(), "--vhost-net"], "vhost-net not available on this host"),
        (["--tap-fd", "999"], "--tap-fd 999: not an open file descriptor"),
    ],
)
def test_bad_network_options_fail_with_one_line(
    netns: Netns, args: list[str], message: str
) -> None:
    argv = netns.exec_argv(crosvm_net_argv(GuestConfig("hello"), args))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode in (1, 2)
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "vmtap0" not in netns.run("ip", "-o", "link")  # nothing left behind


def test_tap_fd_that_is_not_a_tap_is_refused(netns: Netns, tmp_path: Path) -> None:
    path = tmp_path / "not-a-tap"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        argv = crosvm_net_argv(GuestConfig("hello"), ["--tap-fd", str(fd)])
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL, pass_fds=(fd,))  # fmt: skip
    finally:
        os.close(fd)
    assert proc.returncode == 1
    assert f"fd {fd} is not a TUN/TAP device" in proc.stderr


# --- a Linux guest (the kit's tiny kernel, virtio_net driver) -------------------------------


@pytest.mark.linux
@pytest.mark.slow
def test_linux_guest_ping_and_tcp_download(netns: Netns, host_profile: HostProfile) -> None:
    """Linux's virtio_net (with checksum/TSO offloads and mergeable buffers) over our tap:
    ping both ways, then an HTTP download over TCP from the namespace's host address, checked
    by sha256 in the guest: 64 MiB on hardware KVM, 1 MiB where the guest kernel is emulated
    (its TCP stack moves ~0.1-0.2 MB/s there)."""
    from kit import GuestConsole, ensure_initramfs, ensure_tiny_kernel, kernel_cmdline

    guest_ip = "10.213.7.2"
    blob = random.Random(7).randbytes((1 if host_profile.emulating else 64) << 20)
    workdir = Path(tempfile.mkdtemp(prefix="pycrosvm-net-"))
    (workdir / "blob").write_bytes(blob)
    args = ["run", "--disable-sandbox", "-m", "192", "-p", kernel_cmdline(),
            "-i", str(ensure_initramfs()), *tap_args(), str(ensure_tiny_kernel())]  # fmt: skip
    server = subprocess.Popen(
        netns.exec_argv([sys.executable, "-m", "http.server", "-b", HOST_IP, "-d", str(workdir),
                         "8000"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    log = open(workdir / "console.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(netns.exec_argv([CROSVM, *args]), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    console = GuestConsole(proc.stdout, proc.stdin, log)
    t = host_profile.scale(60)

    def ok(command: str) -> tuple[str, ...]:
        r = console.run(command, t)
        assert r.rc == 0, f"{command!r} -> rc={r.rc} {r.lines}\n{console.transcript[-3000:]}"
        return r.lines

    try:
        console.wait_ready(host_profile.scale(120))
        ok(f"ip addr add {guest_ip}/24 dev eth0 && ip link set eth0 up")
        mac = ok("cat /sys/class/net/eth0/address")
        assert mac == (GUEST_MAC,)
        ok(f"ping -c 3 -W 10 {HOST_IP}")
        # the host has no iputils ping: busybox's (busybox-static is a test dependency)
        ping = subprocess.run(
            netns.exec_argv(["busybox", "ping", "-c", "3", "-W", "20", guest_ip]),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert ping.returncode == 0, ping.stdout + ping.stderr
        r = console.run(f"wget -q -O - http://{HOST_IP}:8000/blob | sha256sum", 4 * t)
        assert r.rc == 0 and r.lines, f"download failed: {r}\n{console.transcript[-3000:]}"
        assert r.lines[0].split()[0] == hashlib.sha256(blob).hexdigest()
        print(f"{len(blob) >> 20} MiB TCP download: {r.guest_seconds:.2f} s guest time")
        features = ok("cat /sys/class/net/eth0/device/features")[0]
        # guest_csum(1), guest_tso4(7), mrg_rxbuf(15) were negotiated
        assert features[1] == features[7] == features[15] == "1", features
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        console.close()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()
        log.close()
        server.kill()
        server.wait()
        shutil.rmtree(workdir, ignore_errors=True)
