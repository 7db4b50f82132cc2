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

Ratios are pycrosvm/QEMU (higher is better for us). Needs root and /dev/kvm.

    python benchmarks/net.py [--frames 20000] [--size 1514] [--echo 4000] [--window 32]
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--size", type=int, default=1514)
    ap.add_argument("--echo", type=int, default=4000)
    ap.add_argument("--window", type=int, default=32)
    args = ap.parse_args()
    ns = Netns()
    try:
        ns.persistent_tap(TAP)
        rows: list[tuple[str, str, dict[str, float]]] = []
        for vmm in ("qemu", "crosvm"):
            rows.append(("tx", vmm, bench_tx(ns, vmm, args.frames, args.size)))
            rows.append((f"tx{60}", vmm, bench_tx(ns, vmm, args.frames, 60)))
            rows.append(("echo", vmm, bench_echo(ns, vmm, args.echo, args.window)))
    finally:
        ns.close()
    print(f"net-bench {args.frames} frames of {args.size} (and 60) bytes; "
          f"net-echo {args.echo} frames, window {args.window}")  # fmt: skip
    by = {(kind, vmm): r for kind, vmm, r in rows}
    for kind, vmm, r in rows:
        print(f"  {kind:5} {vmm:7} " + "  ".join(f"{k}={v:,.1f}" for k, v in r.items()))
    for kind in ("tx", "tx60", "echo"):
        ours, peer = by[(kind, "crosvm")], by[(kind, "qemu")]
        key = "rtt_per_s" if kind == "echo" else "pps"
        print(f"  ratio {kind:5} pycrosvm/QEMU {key}: {ours[key] / peer[key]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
