"""virtio-net throughput: the test guest's net-bench and net-echo under pycrosvm vs QEMU.

Both VMMs attach to the SAME persistent tap (``ip tuntap add ... vnet_hdr``) inside a private
network namespace made for this run (``pycrosvm-test-<random>``, deleted at the end), in the same
run, with the same guest: QEMU with ``-netdev tap,ifname=...,script=no,downscript=no,vhost=off
-device virtio-net-pci`` (user-space virtio-net, like ours; no vhost), pycrosvm with
``--tap-name``. Nothing leaves the namespace.

- **tx** (``net-bench``): the guest transmits ``--frames`` broadcast frames of ``--size`` bytes
  (and of 60 bytes) as fast as its queue allows and times it from the first send to the last
  completion (a completion means the VMM has written the frame into the tap). The host checks
  with the tap's kernel counters (rx_packets/rx_bytes) that every frame arrived.
- **echo** (``net-echo``): the host sends 0x88B5 frames through an AF_PACKET socket with up to
  ``--window`` frames in flight, the guest echoes each one; round trips/s, payload checked.

- **linux** (``--linux``, ~3 minutes): the kit's tiny Linux kernel (virtio_net with checksum
  and TSO offloads and mergeable buffers) boots under each VMM on the same tap; it downloads
  ``--mib`` MiB over HTTP/TCP from the namespace's host address (host -> guest, the rx path)
  and sends as much with busybox ``nc`` to a host listener (guest -> host, the tx path).
  Times are the guest's own clock for each command.

Ratios are pycrosvm/QEMU (higher is better for us). Needs root and /dev/kvm.

    python benchmarks/net.py [--frames 20000] [--size 1514] [--echo 4000] [--window 32]
                             [--linux] [--mib 4]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "e2e_tests"))

from fixture import GuestConfig, build_guest  # noqa: E402
from fixture._run import GuestVm  # noqa: E402
from fixture._vmm import crosvm_command, qemu_command  # noqa: E402
from test_crosvm_net import Netns, echo_round_trip  # noqa: E402

TAP = "pycbench0"
QEMU_MAC = "52:54:00:12:34:56"


def vmm_argv(vmm: str, cfg: GuestConfig) -> list[str]:
    kernel = build_guest()
    if vmm == "qemu":
        return [
            *qemu_command(kernel, cfg),
            "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
            "-device", f"virtio-net-pci,netdev=n0,disable-legacy=on,mac={QEMU_MAC}",
        ]  # fmt: skip
    crosvm = shutil.which("crosvm") or "crosvm"
    argv = crosvm_command(kernel, cfg, crosvm=crosvm)
    return [*argv[:-1], "--tap-name", TAP, argv[-1]]


def tap_counters(ns: Netns) -> tuple[int, int]:
    """(rx_packets, rx_bytes) of the tap: frames the VMM wrote into it."""
    info = json.loads(ns.run("ip", "-j", "-s", "link", "show", "dev", TAP))[0]
    rx = info["stats64"]["rx"]
    return int(rx["packets"]), int(rx["bytes"])


def bench_tx(ns: Netns, vmm: str, frames: int, size: int) -> dict[str, float]:
    cfg = GuestConfig("net-bench", params={"frames": frames, "size": size})
    p0, b0 = tap_counters(ns)
    with GuestVm(ns.exec_argv(vmm_argv(vmm, cfg))) as vm:
        result = vm.wait(600).check()
    p1, b1 = tap_counters(ns)
    guest = result.find("pps")
    if p1 - p0 != frames or b1 - b0 != frames * size:
        raise SystemExit(f"{vmm}: the tap got {p1 - p0} frames / {b1 - b0} bytes of {frames}")
    return {"pps": float(guest["pps"]), "mb_per_s": float(guest["mb_per_s"])}


def bench_echo(ns: Netns, vmm: str, count: int, window: int) -> dict[str, float]:
    cfg = GuestConfig("net-echo", params={"timeout_ms": 600000})
    with GuestVm(ns.exec_argv(vmm_argv(vmm, cfg))) as vm:
        m = vm.wait_for(r"READY net-echo mac=(\S+)", 120)
        mac = bytes.fromhex(m.group(1).replace(":", ""))
        with ns.packet_socket(TAP) as sock:
            echo_round_trip(sock, mac, 16, window)  # warm up
            t0 = time.monotonic()
            nbytes = echo_round_trip(sock, mac, count, window)
            seconds = time.monotonic() - t0
            sock.send(mac + bytes(6) + struct.pack(">H", 0x88B5) + b"END" + bytes(43))
            vm.wait(120).check()
    return {"rtt_per_s": count / seconds, "payload_mbps": nbytes / seconds / 1e6}


HOST_IP, GUEST_IP = "10.213.8.1", "10.213.8.2"
GUEST_MAC = "02:00:5e:10:00:01"


class _Sink:
    """A TCP listener in the namespace that reads ``nbytes`` per connection, then closes."""

    CHILD = r"""
import socket, sys
srv = socket.create_server((sys.argv[1], 9000))
print("listening", flush=True)
while True:
    c, _ = srv.accept()
    left = int(sys.argv[2])
    while left > 0:
        b = c.recv(min(left, 1 << 20))
        if not b:
            break
        left -= len(b)
    c.close()
"""

    def __init__(self, ns: Netns, nbytes: int) -> None:
        self.proc = subprocess.Popen(
            ns.exec_argv([sys.executable, "-c", self.CHILD, HOST_IP, str(nbytes)]),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.proc.stdout.readline()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def linux_argv(vmm: str) -> list[str]:
    from kit import ensure_initramfs, ensure_tiny_kernel, kernel_cmdline
    from kit.qemu import qemu_command as kit_qemu_command

    kernel, initrd = ensure_tiny_kernel(), ensure_initramfs()
    if vmm == "qemu":
        return kit_qemu_command(
            kernel, initrd, cmdline=kernel_cmdline(), mem_mib=192,
            extra=["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
                   "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC}"],
        )  # fmt: skip
    crosvm = shutil.which("crosvm") or "crosvm"
    return [crosvm, "run", "--disable-sandbox", "-m", "192", "-p", kernel_cmdline(),
            "-i", str(initrd), "--tap-name", TAP, str(kernel)]  # fmt: skip


def bench_linux(ns: Netns, vmm: str, mib: int) -> dict[str, float]:
    from kit import GuestConsole

    nbytes = mib << 20
    sink = _Sink(ns, nbytes)
    proc = subprocess.Popen(ns.exec_argv(linux_argv(vmm)), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    console = GuestConsole(proc.stdout, proc.stdin)
    try:
        console.wait_ready(900)

        def run(command: str) -> float:
            r = console.run(command, 600)
            if r.rc != 0:
                raise SystemExit(f"{vmm}: {command!r} -> rc={r.rc}: {r.output[-500:]}")
            return r.guest_seconds

        run(f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up")
        run(f"ping -c 1 -W 20 {HOST_IP}")  # ARP both ways, off the clock
        down = run(f"wget -q -O /dev/null http://{HOST_IP}:8000/blob")
        up = run(f"dd if=/dev/zero bs=65536 count={nbytes >> 16} 2>/dev/null | nc {HOST_IP} 9000")
    finally:
        proc.kill()
        proc.wait()
        console.close()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()
        sink.close()
    return {"download_mbps": nbytes / down / 1e6, "upload_mbps": nbytes / up / 1e6}


def run_linux(ns: Netns, mib: int) -> list[tuple[str, str, dict[str, float]]]:
    webroot = Path(tempfile.mkdtemp(prefix="pycrosvm-netbench-"))
    (webroot / "blob").write_bytes(random.Random(1).randbytes(mib << 20))
    ns.run("ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP)
    server = subprocess.Popen(
        ns.exec_argv([sys.executable, "-m", "http.server", "-b", HOST_IP, "-d", str(webroot),
                      "8000"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(1)
        return [("linux", vmm, bench_linux(ns, vmm, mib)) for vmm in ("qemu", "crosvm")]
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(webroot, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--size", type=int, default=1514)
    ap.add_argument("--echo", type=int, default=4000)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--linux", action="store_true", help="also TCP with a Linux guest")
    ap.add_argument("--mib", type=int, default=4)
    args = ap.parse_args()
    ns = Netns()
    try:
        ns.persistent_tap(TAP)
        rows: list[tuple[str, str, dict[str, float]]] = []
        for vmm in ("qemu", "crosvm"):
            rows.append(("tx", vmm, bench_tx(ns, vmm, args.frames, args.size)))
            rows.append((f"tx{60}", vmm, bench_tx(ns, vmm, args.frames, 60)))
            rows.append(("echo", vmm, bench_echo(ns, vmm, args.echo, args.window)))
        if args.linux:
            rows += run_linux(ns, args.mib)
    finally:
        ns.close()
    print(f"net-bench {args.frames} frames of {args.size} (and 60) bytes; "
          f"net-echo {args.echo} frames, window {args.window}")  # fmt: skip
    by = {(kind, vmm): r for kind, vmm, r in rows}
    for kind, vmm, r in rows:
        print(f"  {kind:5} {vmm:7} " + "  ".join(f"{k}={v:,.4g}" for k, v in r.items()))
    keys = {"tx": ["pps"], "tx60": ["pps"], "echo": ["rtt_per_s"]}
    if args.linux:
        keys["linux"] = ["download_mbps", "upload_mbps"]
    for kind, names in keys.items():
        ours, peer = by[(kind, "crosvm")], by[(kind, "qemu")]
        for key in names:
            print(f"  ratio {kind:5} pycrosvm/QEMU {key}: {ours[key] / peer[key]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
