"""virtio-vsock stream throughput under pycrosvm, in both directions and as an echo.

pycrosvm runs ``--cid N`` (the Unix-socket backend) with the C test guest:

* ``echo``: the host connects to the device's socket with ``CONNECT 5000`` (``vsock-echo``),
  streams ``--mib`` MiB of random bytes while reading the echo back, and checks the sha256.
  MB/s counts payload one way (the bytes cross the device twice).
* ``host->guest``: the guest connects to host port 7000 (``vsock-connect bytes=0
  close=host hash=0``); the host listener writes ``--mib`` MiB and half-closes; the clock stops
  when the device closes the host socket, i.e. after the guest received every byte and shut down.
* ``guest->host``: the guest sends ``--mib`` MiB (``vsock-connect hash=0``) and half-closes;
  the host reads to EOF and checks the byte count.

Each runs with the guest's rx buffers at 64 KiB (``rx_buf``, the test guest's default) and at
4 KiB (what a Linux guest posts); guest->host does not depend on them.

There is no same-run VMM peer on these hosts: QEMU only offers vhost-vsock, which needs
``/dev/vhost-vsock`` (absent here). As a ceiling the same transfers run through plain host
Unix sockets with ``socat`` (an echo, and a one-way sink), and the ratios say how far the whole
path (device + guest) is from the host's own socket throughput. ``--device-only`` adds the
device alone with the mock virtqueue driver (no KVM), which isolates the Python per-packet cost.
crosvm runs in its default (sandboxed) mode; ``--disable-sandbox`` runs the device in-process
(what ``py-spy`` needs to see it). Sandboxed rows also give the device's own CPU time per MiB
moved (echo counts both directions; sampled every 5 ms, so slightly low): on a shared, loaded
host that is the steadier figure, because the guest's vCPU spins and takes a core whatever
the device does.

    python benchmarks/vsock.py [--mib 32] [--runs 3] [--only echo,h2g,g2h] [--device-only]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "e2e_tests"))

from fixture import GuestConfig, GuestVm, command  # noqa: E402

CROSVM = shutil.which("crosvm") or "crosvm"
TIMEOUT = 300.0
HOST_PORT = 7000


def _echo(sock: socket.socket, data: bytes) -> tuple[bytes, float]:
    got = bytearray()
    sender = threading.Thread(target=sock.sendall, args=(data,))
    t0 = time.perf_counter()
    sender.start()
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        got += chunk
        if len(got) >= len(data):
            break
    elapsed = time.perf_counter() - t0
    sender.join()
    return bytes(got), elapsed


def _vm(cfg: GuestConfig, sandbox: bool) -> GuestVm:
    argv = command(cfg, vmm="crosvm", crosvm=CROSVM)
    if not sandbox:
        argv.insert(argv.index("run") + 1, "--disable-sandbox")
    vm = GuestVm(argv)
    vm.config = cfg
    return vm


def _descendants(pid: int) -> list[int]:
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, todo = [], [pid]
    while todo:
        cur = todo.pop()
        kids = [child for child, ppid in parent.items() if ppid == cur]
        found += kids
        todo += kids
    return found


def _task_ns(pid: int) -> int | None:
    """CPU nanoseconds of every thread of ``pid`` (None once it is gone)."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total
    except (OSError, ValueError):
        return None


class _CpuWatch:
    """CPU time the processes below ``pid`` (the jailed devices) use during a transfer.

    In the sandboxed mode the vsock device is the only busy one, so this is the device's own
    cost, a figure the host's load changes far less than the throughput (the guest's vCPU
    spins and competes for the cores). Sampled every 5 ms, because the guest ends the VM (and
    the device process) right after the last byte: the cost after the last sample is lost.
    """

    def __init__(self, pid: int) -> None:
        self._first = {p: ns for p in _descendants(pid) if (ns := _task_ns(p)) is not None}
        self._last = dict(self._first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self._sample()

    def _sample(self) -> None:
        for p in self._last:
            ns = _task_ns(p)
            if ns is not None:
                self._last[p] = ns

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._sample()
        return sum(self._last[p] - self._first[p] for p in self._first) / 1e9


#: device CPU seconds per transfer, per row (sandboxed runs only)
CPU: dict[str, list[float]] = {}


def _cid() -> int:
    return 3 + (os.getpid() * 7919 + int.from_bytes(os.urandom(2), "little")) % 1_000_000


def _uds(cid: int) -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"crosvm-vsock-{cid}.sock"


def crosvm_echo(mib: int, rx_buf: int, sandbox: bool, row: str = "") -> float:
    cid = _cid()
    data = os.urandom(mib << 20) + b"END\n"
    params = {"timeout_ms": 300000, "rx_buf": rx_buf}
    with _vm(GuestConfig("vsock-echo", vsock_cid=cid, params=params), sandbox) as vm:
        vm.wait_for("READY vsock-echo", 120)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(_uds(cid)))
            sock.sendall(b"CONNECT 5000\n")
            line = b""
            while not line.endswith(b"\n"):
                line += sock.recv(1)
            if not line.startswith(b"OK "):
                raise RuntimeError(f"handshake failed: {line!r}")
            watch = _CpuWatch(vm.proc.pid)
            got, elapsed = _echo(sock, data)
            CPU.setdefault(row, []).append(watch.stop())
        vm.wait(TIMEOUT).check()
    if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
        raise RuntimeError(f"echo differs ({len(got)} of {len(data)} bytes)")
    return len(data) / elapsed / 1e6


def _guest_connect(
    params: dict[str, object], sandbox: bool, serve: Callable[[socket.socket], int], row: str
) -> float:
    """Run ``vsock-connect`` to the host; ``serve`` moves the data and returns the byte count."""
    cid = _cid()
    path = f"{_uds(cid)}_{HOST_PORT}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        try:
            listener.listen(1)
            listener.settimeout(120)
            full = {"port": HOST_PORT, "hash": 0, "timeout_ms": 300000, **params}
            with _vm(GuestConfig("vsock-connect", vsock_cid=cid, params=full), sandbox) as vm:
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(TIMEOUT)
                    watch = _CpuWatch(vm.proc.pid)
                    t0 = time.perf_counter()
                    n = serve(conn)
                    elapsed = time.perf_counter() - t0
                    CPU.setdefault(row, []).append(watch.stop())
                vm.wait(TIMEOUT).check()
        finally:
            os.unlink(path)
    return n / elapsed / 1e6


def crosvm_host_to_guest(mib: int, rx_buf: int, sandbox: bool, row: str = "") -> float:
    data = os.urandom(mib << 20)

    def serve(conn: socket.socket) -> int:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(1 << 16):  # EOF once the guest has everything and closed
            pass
        return len(data)

    params = {"bytes": 0, "close": "host", "rx_buf": rx_buf}
    return _guest_connect(params, sandbox, serve, row)


def crosvm_guest_to_host(mib: int, sandbox: bool, row: str = "") -> float:
    want = mib << 20

    def serve(conn: socket.socket) -> int:
        buf = bytearray(1 << 18)
        n = 0
        while got := conn.recv_into(buf):
            n += got
        conn.shutdown(socket.SHUT_WR)
        if n != want:
            raise RuntimeError(f"guest->host: {n} of {want} bytes")
        return n

    return _guest_connect({"bytes": want, "close": "guest"}, sandbox, serve, row)


def _socat(args: list[str], path: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["socat", *args])
    for _ in range(500):
        if os.path.exists(path):
            break
        time.sleep(0.01)
    return proc


def socat_echo(mib: int) -> float:
    data = os.urandom(mib << 20)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "echo.sock")
        proc = _socat([f"UNIX-LISTEN:{path}", "PIPE"], path)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(path)
                got, elapsed = _echo(sock, data)
        finally:
            proc.kill()
            proc.wait()
    if got != data:
        raise RuntimeError("socat echo differs")
    return len(data) / elapsed / 1e6


def socat_one_way(mib: int) -> float:
    """Host -> socat -> /dev/null; the clock stops when socat has read it all and closed."""
    data = os.urandom(mib << 20)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sink.sock")
        proc = _socat(["-u", f"UNIX-LISTEN:{path}", "OPEN:/dev/null"], path)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(path)
                t0 = time.perf_counter()
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                proc.wait(TIMEOUT)
                elapsed = time.perf_counter() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return len(data) / elapsed / 1e6


def device_only(mib: int) -> float:
    """Host -> device -> mock guest (which consumes and returns credit), no KVM."""
    sys.path.insert(0, str(ROOT / "packages" / "devices" / "tests"))
    from test_devices_virtio_vsock import GUEST_PORT, Guest, host_connect

    from devices.virtio.vsock import Op, Vsock

    data = os.urandom(mib << 20)
    with tempfile.TemporaryDirectory() as tmp:
        uds = os.path.join(tmp, "v.sock")
        guest = Guest(Vsock(3, uds), buf_alloc=256 * 1024, rx_buffers=128)
        try:
            sock, local = host_connect(guest, uds)
            sender = threading.Thread(target=sock.sendall, args=(data,))
            t0 = time.perf_counter()
            sender.start()
            h = hashlib.sha256()
            received = 0
            while received < len(data):
                hdr, payload = guest.recv()
                if hdr.op != Op.RW:
                    continue
                h.update(payload)
                received += len(payload)
                if received - guest.fwd_cnt >= 64 * 1024:
                    guest.fwd_cnt = received
                    guest.send(Op.CREDIT_UPDATE, GUEST_PORT, local)
            elapsed = time.perf_counter() - t0
            sender.join()
            sock.close()
        finally:
            guest.close()
    if h.digest() != hashlib.sha256(data).digest():
        raise RuntimeError("device-only transfer differs")
    return len(data) / elapsed / 1e6


def _row(name: str, runs: list[float], peer: float | None = None, mib: int = 0) -> None:
    med = statistics.median(runs)
    ratio = f"   {med / peer:6.3f}x host" if peer else ""
    cpu = CPU.get(name)
    per_mib = (
        f"   device {statistics.median(cpu) * 1e6 / mib:6.0f} us CPU/MiB" if cpu and mib else ""
    )
    listed = ", ".join(f"{x:.1f}" for x in runs)
    print(f"{name:<30} {med:8.1f} MB/s{ratio}{per_mib}   (runs: {listed})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="echo,h2g,g2h", help="comma list of echo, h2g, g2h")
    ap.add_argument("--disable-sandbox", action="store_true")
    ap.add_argument("--device-only", action="store_true")
    args = ap.parse_args()
    sandbox = not args.disable_sandbox
    only = set(args.only.split(","))
    n, mib = args.runs, args.mib
    echo_peer = statistics.median([socat_echo(mib) for _ in range(n)])
    one_way_peer = statistics.median([socat_one_way(mib) for _ in range(n)])
    mode = "sandboxed" if sandbox else "--disable-sandbox"
    print(f"vsock, {mib} MiB per run, median of {n}, crosvm {mode}")
    print(f"{'host unix echo (socat PIPE)':<30} {echo_peer:8.1f} MB/s")
    print(f"{'host unix one-way (socat -u)':<30} {one_way_peer:8.1f} MB/s")
    for rx_buf in (65536, 4096):
        tag = f"rx_buf {rx_buf // 1024} KiB"
        if "echo" in only:
            row = f"echo, {tag}"
            runs = [crosvm_echo(mib, rx_buf, sandbox, row) for _ in range(n)]
            _row(row, runs, echo_peer, 2 * mib if sandbox else 0)
        if "h2g" in only:
            row = f"host->guest, {tag}"
            runs = [crosvm_host_to_guest(mib, rx_buf, sandbox, row) for _ in range(n)]
            _row(row, runs, one_way_peer, mib if sandbox else 0)
    if "g2h" in only:
        row = "guest->host, 64 KiB packets"
        runs = [crosvm_guest_to_host(mib, sandbox, row) for _ in range(n)]
        _row(row, runs, one_way_peer, mib if sandbox else 0)
    if args.device_only:
        _row("device only (mock guest) h->g", [device_only(mib) for _ in range(n)])


if __name__ == "__main__":
    main()
