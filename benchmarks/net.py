"""virtio-net throughput, both directions: the test guest's net-bench and net-echo, vs QEMU.

Both VMMs attach to the SAME persistent tap (``ip tuntap add ... vnet_hdr``) inside a private
network namespace made for this run (``pycrosvm-test-<random>``, deleted at the end), in the same
run, with the same guest: QEMU with ``-netdev tap,ifname=...,script=no,downscript=no,vhost=off
-device virtio-net-pci`` (user-space virtio-net, like ours; no vhost), pycrosvm with
``--tap-name`` (its default, sandboxed mode, and with ``--crosvm-modes`` also
``--disable-sandbox``). Nothing leaves the namespace. Every measurement is repeated
``--rounds`` times, the VMMs interleaved (the order flips each round), and the medians are
compared: this host is shared, and a single run can be off by 2x either way.

- **tx** (``net-bench dir=tx``, guest -> host): the guest transmits ``--frames`` broadcast
  frames of ``--size`` bytes (and of 60 bytes) as fast as its ring allows and times it from
  the first send to the last completion (a completion means the VMM wrote the frame into the
  tap). The host checks with the tap's kernel counters that every frame arrived.
- **rx** (``net-bench dir=rx``, host -> guest): a small C sender (built here with gcc)
  pushes frames of ``--size`` (and 60) bytes into the tap through an AF_PACKET socket with
  ``sendmmsg`` for ``--rx-seconds``, as fast as it can; the tap's queue drops what the VMM
  does not take in time. The guest counts the frames it receives from the first to the last
  (frames/s delivered); the loss is reported too.
- **echo** (``net-echo``): the host sends 0x88B5 frames through an AF_PACKET socket with up to
  ``--window`` frames in flight, the guest echoes each one; round trips/s, payload checked.

- **linux** (``--linux``, ~3 minutes): the kit's tiny Linux kernel (virtio_net with checksum
  and TSO offloads and mergeable buffers) boots under each VMM on the same tap; it downloads
  ``--mib`` MiB over HTTP/TCP from the namespace's host address (host -> guest, the rx path)
  and sends as much with busybox ``nc`` to a host listener (guest -> host, the tx path).
  Times are the guest's own clock for each command.

Ratios are pycrosvm/QEMU (higher is better for us); ``cpu_us_per_frame`` is the CPU time the
VMM's non-vCPU threads used per frame (its ratio is QEMU/ours, so higher is better there too):
it is the figure that stays put when other jobs load the host. Needs root, /dev/kvm and gcc.
The load average is printed before and after: the guest busy-polls one CPU, so on a 2-CPU host
any other load lands on the VMM's device thread.

    python benchmarks/net.py [--rounds 3] [--frames 200000] [--size 1514] [--rx-seconds 1]
                             [--echo 4000] [--window 32] [--crosvm-modes default,nosandbox]
                             [--only tx,rx,echo] [--linux] [--mib 4]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "e2e_tests"))

from fixture import GuestConfig, build_guest  # noqa: E402
from fixture._run import GuestVm  # noqa: E402
from fixture._vmm import crosvm_command, qemu_command  # noqa: E402
from test_crosvm_net import Netns, echo_round_trip  # noqa: E402

TAP = "pycbench0"
QEMU_MAC = "52:54:00:12:34:56"
ETH_TEST = 0x88B5

#: vmm label -> crosvm run options ("qemu" is the peer).
CROSVM_MODES = {"default": [], "nosandbox": ["--disable-sandbox"]}


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
    mode = CROSVM_MODES[vmm.removeprefix("crosvm-")] if vmm != "crosvm" else []
    return [*argv[:2], *mode, *argv[2:-1], "--tap-name", TAP, argv[-1]]


_CLK_TCK = os.sysconf("SC_CLK_TCK")


class CpuWatch:
    """CPU time of a VMM's process tree, split into vCPU threads and everything else.

    The guest busy-polls, so a vCPU thread burns its CPU whatever the VMM does; the rest (the
    device threads, QEMU's main loop) is what a frame costs the host. A vCPU thread is one
    with guest time (``/proc/<tid>/stat`` field 43). Unlike frames/s, CPU per frame barely
    moves when other jobs load the host.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def _tids(self) -> list[tuple[int, int]]:
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
            for tid in tids:
                out.append((pid, tid))
                with contextlib.suppress(OSError):
                    children = Path(f"/proc/{pid}/task/{tid}/children").read_text()
                    todo += [int(c) for c in children.split()]
        return out

    def sample(self) -> dict[int, tuple[float, int]]:
        """tid -> (CPU seconds used so far, guest ticks) for each live thread of the tree."""
        out: dict[int, tuple[float, int]] = {}
        for pid, tid in self._tids():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                f = stat.rsplit(")", 1)[1].split()  # f[0] is field 3 (state)
                out[tid] = ((int(f[11]) + int(f[12])) / _CLK_TCK, int(f[40]))
        return out

    @staticmethod
    def other_seconds(
        before: dict[int, tuple[float, int]], after: dict[int, tuple[float, int]]
    ) -> float:
        """CPU used between two samples by the threads that are not vCPUs."""
        return sum(
            cpu - before.get(tid, (0.0, 0))[0] for tid, (cpu, guest) in after.items() if not guest
        )


@contextlib.contextmanager
def cpu_watch(vm: GuestVm) -> Iterator[CpuWatch]:
    yield CpuWatch(vm.proc.pid)


def tap_counters(ns: Netns) -> dict[str, int]:
    """The tap's kernel counters (rx: frames the VMM wrote; tx: frames handed to the VMM)."""
    info = json.loads(ns.run("ip", "-j", "-s", "link", "show", "dev", TAP))[0]
    s = info["stats64"]
    return {
        "rx_packets": int(s["rx"]["packets"]),
        "rx_bytes": int(s["rx"]["bytes"]),
        "tx_packets": int(s["tx"]["packets"]),
        "tx_dropped": int(s["tx"]["dropped"]),
    }


def bench_tx(ns: Netns, vmm: str, frames: int, size: int) -> dict[str, float]:
    cfg = GuestConfig(
        "net-bench", params={"dir": "tx", "frames": frames, "size": size, "linger_ms": 300}
    )
    c0 = tap_counters(ns)
    with GuestVm(ns.exec_argv(vmm_argv(vmm, cfg))) as vm, cpu_watch(vm) as watch:
        vm.wait_for("READY net-bench", 120)
        cpu0 = watch.sample()
        vm.wait_for("RESULT net_bench_frames", 600)
        cpu1 = watch.sample()
        result = vm.wait(600).check()
    c1 = tap_counters(ns)
    guest = result.find("net_bench_frames")
    got, nbytes = c1["rx_packets"] - c0["rx_packets"], c1["rx_bytes"] - c0["rx_bytes"]
    if got != frames or nbytes != frames * size:
        raise SystemExit(f"{vmm}: the tap got {got} frames / {nbytes} bytes of {frames}")
    return {
        "frames_per_s": float(guest["pps"]),
        "mb_per_s": frames * size / float(guest["us"]),
        "cpu_us_per_frame": watch.other_seconds(cpu0, cpu1) / frames * 1e6,
        "kicks": float(guest["kicks"]),
    }


SENDER_C = r"""
/* Push 0x88B5 frames into a tap through AF_PACKET as fast as sendmmsg allows, for a time. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#define B 64
static unsigned char buf[B][2048];
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
int main(int argc, char **argv) {
    if (argc != 5) return 2;
    unsigned size = atoi(argv[3]);
    double seconds = atof(argv[4]);
    if (size < 60 || size > 1514) return 2;
    int s = socket(AF_PACKET, SOCK_RAW, 0);
    struct sockaddr_ll a = {.sll_family = AF_PACKET, .sll_protocol = htons(0x88B5)};
    a.sll_ifindex = if_nametoindex(argv[1]);
    if (s < 0 || !a.sll_ifindex || bind(s, (struct sockaddr *)&a, sizeof a)) {
        perror("sender socket");
        return 1;
    }
    struct mmsghdr m[B];
    struct iovec iov[B];
    memset(m, 0, sizeof m);
    for (int k = 0; k < B; k++) {
        unsigned char *f = buf[k];
        for (int i = 0; i < 6; i++) sscanf(argv[2] + 2 * i, "%2hhx", &f[i]);
        memcpy(f + 6, "\x02\x00\x5e\x10\x00\x02", 6);
        f[12] = 0x88, f[13] = 0xB5;
        for (unsigned i = 14; i < size; i++) f[i] = (unsigned char)i;
        iov[k].iov_base = f;
        iov[k].iov_len = size;
        m[k].msg_hdr.msg_iov = &iov[k];
        m[k].msg_hdr.msg_iovlen = 1;
    }
    unsigned long long seq = 0, sent = 0, nobufs = 0;
    double t0 = now(), t;
    while ((t = now()) - t0 < seconds) {
        for (int k = 0; k < B; k++) {
            unsigned long long q = seq + k;
            memcpy(buf[k] + 14, &q, 8);
        }
        int r = sendmmsg(s, m, B, 0);
        if (r < 0) {
            if (errno != ENOBUFS && errno != EAGAIN) {
                perror("sendmmsg");
                return 1;
            }
            nobufs++, seq++;  /* that frame was dropped before the tap */
            continue;
        }
        seq += r, sent += r;
    }
    printf("sent=%llu nobufs=%llu seconds=%.4f\n", sent, nobufs, now() - t0);
    return 0;
}
"""


def build_sender() -> Path:
    """Compile the frame sender once per source version (cached next to the test guest)."""
    key = hashlib.sha256(SENDER_C.encode()).hexdigest()[:16]
    out = Path.home() / ".cache" / "pycrosvm" / "net-sender" / key / "sender"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        src = out.parent / "sender.c"
        src.write_text(SENDER_C)
        tmp = out.parent / f".sender-{os.getpid()}"
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(tmp), str(src)], check=True)
        os.rename(tmp, out)
    return out


def bench_rx(ns: Netns, vmm: str, size: int, seconds: float) -> dict[str, float]:
    cfg = GuestConfig("net-bench", params={"dir": "rx", "idle_ms": 3000, "linger_ms": 300})
    sender = build_sender()
    c0 = tap_counters(ns)
    with GuestVm(ns.exec_argv(vmm_argv(vmm, cfg))) as vm, cpu_watch(vm) as watch:
        mac = vm.wait_for(r"READY net-bench dir=rx mac=(\S+)", 120).group(1).replace(":", "")
        cpu0 = watch.sample()
        out = ns.run(str(sender), TAP, mac, str(size), str(seconds))
        cpu1 = watch.sample()  # the frames are in (but for the tap's last <= 500)
        sent = {k: float(v) for k, v in (kv.split("=") for kv in out.split())}
        end = bytes.fromhex(mac) + bytes(6) + struct.pack(">H", ETH_TEST) + b"END" + bytes(43)
        with ns.packet_socket(TAP) as sock:
            deadline = time.monotonic() + 60
            while vm.proc.poll() is None and time.monotonic() < deadline:
                if "RESULT net_rx_frames" in vm.output:
                    break
                sock.send(end)  # the tap's queue may be full: repeat until the guest stops
                time.sleep(0.05)
        result = vm.wait(60).check()
    c1 = tap_counters(ns)
    guest = result.find("net_rx_frames")
    frames = float(guest["net_rx_frames"])
    return {
        "frames_per_s": float(guest["pps"]),
        "mb_per_s": float(guest["bytes"]) / float(guest["us"]) if float(guest["us"]) else 0.0,
        "offered_per_s": sent["sent"] / sent["seconds"],
        "cpu_us_per_frame": watch.other_seconds(cpu0, cpu1) / frames * 1e6 if frames else 0.0,
        "loss": 1 - frames / sent["sent"] if sent["sent"] else 0.0,
        "tap_dropped": float(c1["tx_dropped"] - c0["tx_dropped"]),
        "kicks": float(guest["kicks"]),
    }


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
            sock.send(mac + bytes(6) + struct.pack(">H", ETH_TEST) + b"END" + bytes(43))
            vm.wait(120).check()
    return {"rtt_per_s": count / seconds, "payload_mb_per_s": nbytes / seconds / 1e6}


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


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--frames", type=int, default=200000, help="tx frames per run")
    ap.add_argument("--size", type=int, default=1514)
    ap.add_argument("--rx-seconds", type=float, default=1.0)
    ap.add_argument("--echo", type=int, default=4000)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--crosvm-modes", default="default",
                    help="comma list of: " + ", ".join(CROSVM_MODES))  # fmt: skip
    ap.add_argument("--only", default="tx,rx,echo", help="comma list of: tx, rx, echo")
    ap.add_argument("--linux", action="store_true", help="also TCP with a Linux guest")
    ap.add_argument("--mib", type=int, default=4)
    args = ap.parse_args()
    modes = [m.strip() for m in args.crosvm_modes.split(",") if m.strip()]
    if any(m not in CROSVM_MODES for m in modes):
        ap.error(f"--crosvm-modes: one of {', '.join(CROSVM_MODES)}")
    ours = ["crosvm" if m == "default" else f"crosvm-{m}" for m in modes]
    only = set(args.only.split(","))
    size = args.size
    cases: list[tuple[str, object]] = []
    if "tx" in only:
        cases += [(f"tx{size}", lambda ns, v: bench_tx(ns, v, args.frames, size)),
                  ("tx60", lambda ns, v: bench_tx(ns, v, args.frames, 60))]  # fmt: skip
    if "rx" in only:
        cases += [(f"rx{size}", lambda ns, v: bench_rx(ns, v, size, args.rx_seconds)),
                  ("rx60", lambda ns, v: bench_rx(ns, v, 60, args.rx_seconds))]  # fmt: skip
    if "echo" in only:
        cases.append(("echo", lambda ns, v: bench_echo(ns, v, args.echo, args.window)))
    load_before = load()
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    ns = Netns()
    try:
        ns.persistent_tap(TAP)
        build_guest()
        if "rx" in only:
            build_sender()
        for rnd in range(args.rounds):
            order = ["qemu", *ours] if rnd % 2 == 0 else [*ours, "qemu"]
            for kind, fn in cases:
                for vmm in order:
                    r = fn(ns, vmm)  # type: ignore[operator]
                    rows.setdefault((kind, vmm), []).append(r)
                    line = "  ".join(f"{k}={v:,.4g}" for k, v in r.items())
                    print(f"  round {rnd + 1} {kind:7} {vmm:17} {line}", flush=True)
        linux_rows = run_linux(ns, args.mib) if args.linux else []
    finally:
        ns.close()
    print(f"\nvirtio-net, pycrosvm vs QEMU (vhost=off), {args.rounds} interleaved rounds, medians; "
          f"tx {args.frames} frames/run, rx {args.rx_seconds:g} s of offered load/run, "
          f"echo {args.echo} frames window {args.window}")  # fmt: skip
    print(f"load average before: {load_before}  after: {load()}  (cpus: {os.cpu_count()})")
    keys = {"tx": ["frames_per_s", "mb_per_s", "cpu_us_per_frame"],
            "rx": ["frames_per_s", "mb_per_s", "cpu_us_per_frame"],
            "ec": ["rtt_per_s", "payload_mb_per_s"]}  # fmt: skip
    for kind, _ in cases:
        for vmm in ["qemu", *ours]:
            runs = rows[(kind, vmm)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"  {kind:7} {vmm:17} " + "  ".join(f"{k}={v:,.4g}" for k, v in med.items()))
    for kind, _ in cases:
        peer = rows[(kind, "qemu")]
        for vmm in ours:
            mine = rows[(kind, vmm)]
            parts = []
            for key in keys[kind[:2]]:
                # cpu per frame: QEMU's over ours, so that here too higher is better for us
                a_runs, b_runs = (peer, mine) if key.startswith("cpu") else (mine, peer)
                num = statistics.median(r[key] for r in a_runs)
                den = statistics.median(r[key] for r in b_runs)
                ratio = num / den if den else float("nan")
                pairs = zip(a_runs, b_runs, strict=True)
                per_round = ", ".join(f"{a[key] / b[key]:.2f}" if b[key] else "-" for a, b in pairs)
                label = "cpu_per_frame(QEMU/ours)" if key.startswith("cpu") else key
                parts.append(f"{label} {ratio:.2f} (rounds: {per_round})")
            print(f"  ratio {kind:7} {vmm}/QEMU: " + "; ".join(parts))
    for kind, vmm, r in linux_rows:
        print(f"  {kind:7} {vmm:17} " + "  ".join(f"{k}={v:,.4g}" for k, v in r.items()))
    if linux_rows:
        by = {vmm: r for _, vmm, r in linux_rows}
        for key in ("download_mbps", "upload_mbps"):
            print(f"  ratio linux pycrosvm/QEMU {key}: {by['crosvm'][key] / by['qemu'][key]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
