"""TCP throughput over virtio-net with a Linux guest: iperf3 in the guest and on the host,
pycrosvm vs QEMU's user-space virtio-net, in the same run.

    python benchmarks/iperf.py [--seconds 10] [--rounds 2] [--mem 192] [--disable-sandbox]

Both VMMs boot the kit's tiny kernel with the iperf3 initramfs (``ensure_initramfs(iperf3=True)``:
Debian's iperf3 + its libraries), same command line, same memory, 1 vCPU, at the same time,
each on its own persistent tap (``ip tuntap add ... vnet_hdr``, identical settings) in one
private network namespace made for this run (deleted at the end; nothing leaves it):

* pycrosvm: ``crosvm run --tap-name pycipc0`` (devices sandboxed, the default, unless
  ``--disable-sandbox``);
* QEMU: ``-netdev tap,ifname=pycipq0,script=no,downscript=no,vhost=off -device virtio-net-pci``
  (QEMU's own user-space backend: no vhost-net, like ours).

Each round runs, per VMM (the order alternates between rounds, so neither always goes first):
guest -> host (``iperf3 -c``, the guest transmits: our tx path) and host -> guest (``iperf3 -c
-R``: our rx path), ``--seconds`` each, against a fresh ``iperf3 -s -1`` in the namespace. The
figure is the receiver's account from iperf3's JSON report (``end.sum_received``: bytes and
seconds); the summary divides total bytes by total seconds over the rounds. The VMM's CPU time
over each test (its whole process tree, jailed device processes included, and its vCPU thread,
which is where the guest itself runs) is reported per byte moved. Ratios are pycrosvm/QEMU:
>1 is better for us for throughput, <1 for CPU per byte.

Where guest kernel code is emulated (nested kvm_pvm: ~1M instructions/s) the guest's TCP stack
is the bottleneck for both VMMs, so the ratios mostly show what each VMM adds per packet on top.
Needs root, /dev/kvm, qemu-system-x86_64 and iperf3 on the host.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "e2e_tests"))

from kit import ensure_initramfs, ensure_tiny_kernel, kernel_cmdline  # noqa: E402
from kit.qemu import qemu_command  # noqa: E402
from test_crosvm_net import Netns  # noqa: E402
from test_linux_iperf import CROSVM, IperfServer, NetnsGuest, iperf3_client  # noqa: E402


@dataclass(frozen=True)
class Peer:
    vmm: str
    tap: str
    host_ip: str
    guest_ip: str
    mac: str
    port: int  # the iperf3 server's port for this VMM


PEERS = (
    Peer("crosvm", "pycipc0", "10.213.9.1", "10.213.9.2", "02:00:5e:10:09:02", 5301),
    Peer("qemu", "pycipq0", "10.213.10.1", "10.213.10.2", "02:00:5e:10:0a:02", 5302),
)
BOOT_TIMEOUT = 900.0


def vmm_argv(peer: Peer, mem: int, sandbox: bool) -> list[str]:
    kernel, initrd, cmdline = ensure_tiny_kernel(), ensure_initramfs(iperf3=True), kernel_cmdline()
    if peer.vmm == "qemu":
        net = [
            "-netdev", f"tap,id=n0,ifname={peer.tap},script=no,downscript=no,vhost=off",
            "-device", f"virtio-net-pci,netdev=n0,mac={peer.mac}",
        ]  # fmt: skip
        return qemu_command(kernel, initrd, cmdline=cmdline, mem_mib=mem, extra=net)
    argv = [CROSVM, "run", "-m", str(mem), "-c", "1", "-p", cmdline, "-i", str(initrd),
            "--tap-name", peer.tap, "--mac", peer.mac]  # fmt: skip
    if not sandbox:
        argv.append("--disable-sandbox")
    return [*argv, str(kernel)]


def tree_cpu_seconds(pid: int) -> float:
    """user+system CPU seconds of ``pid`` and all its live descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ppid, utime, stime = int(fields[1]), int(fields[11]), int(fields[12])
        children.setdefault(ppid, []).append(int(entry))
        stats[int(entry)] = (utime, stime)
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += sum(stats.get(p, (0, 0)))
        todo += children.get(p, [])
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    vmm: str
    direction: str  # "g2h" (iperf3 -c) or "h2g" (iperf3 -c -R)
    mbit_s: float
    nbytes: int
    seconds: float  # the receiver's measured duration
    retransmits: int
    vmm_cpu_s: float

    def line(self) -> str:
        return (
            f"  {self.vmm:6} {self.direction}: {self.mbit_s:8.2f} Mbit/s  {self.nbytes:>12,} B "
            f"in {self.seconds:5.1f} s  retransmits {self.retransmits:3}  "
            f"VMM CPU {self.vmm_cpu_s:5.1f} s"
        )


def measure(ns: Netns, peer: Peer, guest: NetnsGuest, direction: str, seconds: int) -> Sample:
    server = IperfServer(ns, peer.host_ip, peer.port)
    try:
        cpu0 = tree_cpu_seconds(guest.proc.pid)
        report: dict[str, Any] = iperf3_client(
            guest, peer.host_ip, seconds, direction == "h2g", 300 + 3 * seconds, peer.port
        )
        cpu1 = tree_cpu_seconds(guest.proc.pid)
        server.report(60)
    finally:
        server.close()
    received, sent = report["end"]["sum_received"], report["end"]["sum_sent"]
    return Sample(
        peer.vmm, direction, received["bits_per_second"] / 1e6, int(received["bytes"]),
        float(received["seconds"]), int(sent.get("retransmits", 0)), cpu1 - cpu0,
    )  # fmt: skip


def boot(ns: Netns, peer: Peer, mem: int, sandbox: bool, workdir: Path) -> NetnsGuest:
    guest = NetnsGuest(ns.exec_argv(vmm_argv(peer, mem, sandbox)), workdir, peer.vmm)
    try:
        seconds = guest.wait_ready(BOOT_TIMEOUT)
        print(f"  {peer.vmm}: GUEST-INIT-READY after {seconds:.1f} s", flush=True)
        guest.ok(f"ip addr add {peer.guest_ip}/24 dev eth0 && ip link set eth0 up", 300)
        guest.ok(f"ping -c 1 -W 30 {peer.host_ip}", 300)  # ARP both ways, off the clock
    except BaseException:
        guest.close()
        raise
    return guest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=10, help="iperf3 -t per direction")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mem", type=int, default=192, help="guest MiB")
    ap.add_argument("--disable-sandbox", action="store_true", help="crosvm without jails")
    args = ap.parse_args()
    missing = [t for t in ("iperf3", "qemu-system-x86_64") if shutil.which(t) is None]
    if missing or not os.access("/dev/kvm", os.R_OK | os.W_OK) or os.geteuid() != 0:
        print(f"iperf: needs root, /dev/kvm and {', '.join(missing) or 'iperf3, qemu'}; skipped")
        return 0
    load = os.getloadavg()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}  load {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}  iperf3 -t {args.seconds}, {args.rounds} round(s), guest "
          f"{args.mem} MiB, 1 vCPU, crosvm {'un' if args.disable_sandbox else ''}sandboxed",
          flush=True)  # fmt: skip
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"pycrosvm-iperf-{os.getpid()}"
    workdir.mkdir()
    ns = Netns()
    guests: dict[str, NetnsGuest] = {}
    samples: list[Sample] = []
    try:
        for peer in PEERS:
            ns.persistent_tap(peer.tap)
            ns.run("ip", "addr", "add", f"{peer.host_ip}/24", "dev", peer.tap)
        # boot both at once (each boot is minutes of emulated guest kernel here)
        errors: list[BaseException] = []

        def start(peer: Peer) -> None:
            try:
                guests[peer.vmm] = boot(ns, peer, args.mem, not args.disable_sandbox, workdir)
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=start, args=(p,)) for p in PEERS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        for rnd in range(args.rounds):
            order = PEERS if rnd % 2 == 0 else PEERS[::-1]
            print(f"round {rnd + 1}:", flush=True)
            for direction in ("g2h", "h2g"):
                for peer in order:
                    s = measure(ns, peer, guests[peer.vmm], direction, args.seconds)
                    samples.append(s)
                    print(s.line(), flush=True)
    finally:
        for g in guests.values():
            g.close()
        ns.close()
        shutil.rmtree(workdir, ignore_errors=True)

    def total(vmm: str, direction: str, attr: str) -> float:
        return sum(
            float(getattr(s, attr)) for s in samples if (s.vmm, s.direction) == (vmm, direction)
        )

    def rate(vmm: str, direction: str) -> float:
        """Mbit/s over all rounds: total bytes / total receiver seconds (a round whose end
        report came late weighs by its length, not as one outlier rate)."""
        return total(vmm, direction, "nbytes") * 8 / total(vmm, direction, "seconds") / 1e6

    print("over all rounds (bytes / seconds) and ratios pycrosvm/QEMU:")
    for direction, what in (("g2h", "guest->host (tx)"), ("h2g", "host->guest (rx)")):
        ours, theirs = rate("crosvm", direction), rate("qemu", direction)
        # VMM CPU (vCPU thread included: it runs the guest) per byte moved
        cpu_ours = total("crosvm", direction, "vmm_cpu_s") / total("crosvm", direction, "nbytes")
        cpu_theirs = total("qemu", direction, "vmm_cpu_s") / total("qemu", direction, "nbytes")
        print(
            f"  {what:17} crosvm {ours:8.2f} Mbit/s  qemu {theirs:8.2f} Mbit/s  "
            f"throughput {ours / theirs:.2f}x  VMM CPU per byte {cpu_ours / cpu_theirs:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
