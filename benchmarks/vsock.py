"""virtio-vsock stream throughput: host -> guest -> host through the test guest's vsock-echo.

pycrosvm runs ``--cid N`` (the Unix-socket backend); the host connects to the device's socket
with ``CONNECT 5000``, streams ``--mib`` MiB of random bytes while reading the echo back, and
checks the sha256. MB/s counts payload one way (the bytes cross the device twice).

There is no same-run VMM peer on these hosts: QEMU only offers vhost-vsock, which needs
``/dev/vhost-vsock`` (absent here). As a ceiling the same transfer runs through a plain host
Unix-socket echo (``socat``), and the ratio says how far the whole path (device + guest) is from
the host's own socket throughput. ``--device-only`` adds the device alone with the mock
virtqueue driver (no KVM), which isolates the Python per-packet cost.

    python benchmarks/vsock.py [--mib 8] [--runs 3] [--device-only]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "e2e_tests"))

from fixture import GuestConfig, launch  # noqa: E402


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


def crosvm_vsock(mib: int) -> float:
    cid = 3 + os.getpid() % 100_000
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"crosvm-vsock-{cid}.sock"
    crosvm = shutil.which("crosvm") or "crosvm"
    data = os.urandom(mib << 20) + b"END\n"
    cfg = GuestConfig("vsock-echo", vsock_cid=cid, params={"timeout_ms": 300000})
    with launch(cfg, vmm="crosvm", crosvm=crosvm) as vm:
        vm.wait_for("READY vsock-echo", 120)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(120)
            sock.connect(str(path))
            sock.sendall(b"CONNECT 5000\n")
            line = b""
            while not line.endswith(b"\n"):
                line += sock.recv(1)
            if not line.startswith(b"OK "):
                raise RuntimeError(f"handshake failed: {line!r}")
            got, elapsed = _echo(sock, data)
        vm.wait(120).check()
    if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
        raise RuntimeError(f"echo differs ({len(got)} of {len(data)} bytes)")
    return len(data) / elapsed / 1e6


def socat_echo(mib: int) -> float:
    data = os.urandom(mib << 20)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "echo.sock")
        proc = subprocess.Popen(["socat", f"UNIX-LISTEN:{path}", "PIPE"])
        try:
            for _ in range(500):
                if os.path.exists(path):
                    break
                time.sleep(0.01)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(path)
                got, elapsed = _echo(sock, data)
        finally:
            proc.kill()
            proc.wait()
    if got != data:
        raise RuntimeError("socat echo differs")
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device-only", action="store_true")
    args = ap.parse_args()
    ours = [crosvm_vsock(args.mib) for _ in range(args.runs)]
    peer = [socat_echo(args.mib) for _ in range(args.runs)]
    o, p = statistics.median(ours), statistics.median(peer)
    print(
        f"vsock echo {args.mib} MiB   pycrosvm {o:8.1f} MB/s   (runs: "
        f"{', '.join(f'{x:.1f}' for x in ours)})"
    )
    print(f"host unix echo (socat)   {p:8.1f} MB/s   ratio pycrosvm/host = {o / p:.3f}")
    if args.device_only:
        dev = [device_only(args.mib) for _ in range(args.runs)]
        print(f"device only (mock guest) {statistics.median(dev):8.1f} MB/s")


if __name__ == "__main__":
    main()
