"""QcowFile throughput against qemu-io on the same 1 GiB qcow2 files, in the same run.

Both sides do the same requests one at a time (queue depth 1): ``qemu-io`` gets one ``-c`` per
request (``read -q``/``write -q``), with ``--aio=threads`` and the default writeback cache, i.e.
the host page cache, as QcowFile uses (it has no O_DIRECT mode). qemu-io's process start-up and
image open are measured separately (a one-request run) and subtracted. Each figure is the best
of ``--repeat`` runs; ratios are ours/qemu-io (higher is better for us).

    python benchmarks/qcow_bench.py [--size-mib 1024] [--random-ops 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages" / "qcow" / "src"))

from qcow import QcowFile

MiB = 1 << 20


def _qemu_io(path: Path, cmds: list[str]) -> float:
    args = ["qemu-io", "-f", "qcow2", "--aio=threads", "--cache=writeback"]
    for c in cmds:
        args += ["-c", c]
    args.append(str(path))
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or "error" in (proc.stdout + proc.stderr).lower():
        raise SystemExit(f"qemu-io failed: {proc.stdout[-500:]} {proc.stderr[-500:]}")
    return elapsed


def _qemu_io_net(path: Path, cmds: list[str], baseline: float) -> float:
    return max(1e-6, _qemu_io(path, cmds) - baseline)


def _best(repeat: int, fn: Callable[[], float]) -> float:
    return min(fn() for _ in range(repeat))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--random-ops", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to put the images (default: a temp dir)")
    a = ap.parse_args()
    if not shutil.which("qemu-io"):
        print("qemu-io not found (apt-get install qemu-utils)", file=sys.stderr)
        return 1
    size = a.size_mib * MiB
    tmp = Path(tempfile.mkdtemp(prefix="qcow-bench-", dir=a.dir))
    ours_img = tmp / "ours.qcow2"
    peer_img = tmp / "peer.qcow2"
    rng = random.Random(7)
    rand_offsets = [rng.randrange(size // 4096) * 4096 for _ in range(a.random_ops)]
    chunk = bytes([0xAB]) * MiB
    small = bytes([0xCD]) * 4096
    results: list[tuple[str, float, float, str]] = []
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(peer_img), "1M"], check=True)
        baseline = _best(a.repeat, lambda: _qemu_io(peer_img, ["read -q 0 4k"]))
        peer_img.unlink()

        # -- sequential write into fresh images (allocating), 1 MiB requests, then flush
        def ours_seq_write() -> float:
            if ours_img.exists():
                ours_img.unlink()
            start = time.perf_counter()
            with QcowFile.create(ours_img, size) as q:
                for off in range(0, size, MiB):
                    q.write_at(chunk, off)
                q.flush()
            return time.perf_counter() - start

        def peer_seq_write() -> float:
            if peer_img.exists():
                peer_img.unlink()
            start = time.perf_counter()
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(peer_img), str(size)], check=True
            )
            create = time.perf_counter() - start
            cmds = [f"write -q -P 0xab {off} 1M" for off in range(0, size, MiB)] + ["flush"]
            return create + _qemu_io_net(peer_img, cmds, baseline)

        t_ours = _best(a.repeat, ours_seq_write)
        t_peer = _best(a.repeat, peer_seq_write)
        results.append(("sequential write 1M", size / MiB / t_ours, size / MiB / t_peer, "MiB/s"))

        # -- sequential read of the whole image, 1 MiB requests (page cache warm for both)
        buf = bytearray(MiB)
        view = memoryview(buf)

        def ours_seq_read() -> float:
            with QcowFile.open(ours_img) as q:
                start = time.perf_counter()
                for off in range(0, size, MiB):
                    q.readinto_at(view, off)
                return time.perf_counter() - start

        def peer_seq_read() -> float:
            cmds = [f"read -q {off} 1M" for off in range(0, size, MiB)]
            return _qemu_io_net(peer_img, cmds, baseline)

        t_ours = _best(a.repeat, ours_seq_read)
        t_peer = _best(a.repeat, peer_seq_read)
        results.append(("sequential read 1M", size / MiB / t_ours, size / MiB / t_peer, "MiB/s"))

        # -- random 4 KiB reads
        small_view = memoryview(bytearray(4096))

        def ours_rand_read() -> float:
            with QcowFile.open(ours_img) as q:
                start = time.perf_counter()
                for off in rand_offsets:
                    q.readinto_at(small_view, off)
                return time.perf_counter() - start

        def peer_rand_read() -> float:
            return _qemu_io_net(peer_img, [f"read -q {o} 4k" for o in rand_offsets], baseline)

        t_ours = _best(a.repeat, ours_rand_read)
        t_peer = _best(a.repeat, peer_rand_read)
        n = len(rand_offsets)
        results.append(("random read 4k", n / t_ours, n / t_peer, "IOPS"))

        # -- random 4 KiB overwrites of allocated clusters, then flush
        def ours_rand_write() -> float:
            with QcowFile.open(ours_img, writable=True) as q:
                start = time.perf_counter()
                for off in rand_offsets:
                    q.write_at(small, off)
                q.flush()
                return time.perf_counter() - start

        def peer_rand_write() -> float:
            cmds = [f"write -q -P 0xcd {o} 4k" for o in rand_offsets] + ["flush"]
            return _qemu_io_net(peer_img, cmds, baseline)

        t_ours = _best(a.repeat, ours_rand_write)
        t_peer = _best(a.repeat, peer_rand_write)
        results.append(("random write 4k", n / t_ours, n / t_peer, "IOPS"))

        # -- random 4 KiB writes into a fresh image (cluster allocation + COW of the rest)
        alloc_offsets = rand_offsets[: max(1, n // 4)]

        def ours_rand_alloc() -> float:
            p = tmp / "ours-alloc.qcow2"
            with QcowFile.create(p, size) as q:
                start = time.perf_counter()
                for off in alloc_offsets:
                    q.write_at(small, off)
                q.flush()
                elapsed = time.perf_counter() - start
            p.unlink()
            return elapsed

        def peer_rand_alloc() -> float:
            p = tmp / "peer-alloc.qcow2"
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(p), str(size)], check=True
            )
            cmds = [f"write -q -P 0xcd {o} 4k" for o in alloc_offsets] + ["flush"]
            elapsed = _qemu_io_net(p, cmds, baseline)
            p.unlink()
            return elapsed

        t_ours = _best(a.repeat, ours_rand_alloc)
        t_peer = _best(a.repeat, peer_rand_alloc)
        m = len(alloc_offsets)
        results.append(("random write 4k, allocating", m / t_ours, m / t_peer, "IOPS"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"qcow vs qemu-io ({a.size_mib} MiB image, 64 KiB clusters, queue depth 1)")
    print(f"{'workload':32} {'QcowFile':>12} {'qemu-io':>12} {'ratio':>7}")
    for name, ours, peer, unit in results:
        print(f"{name:32} {ours:10.0f} {unit[:5]:<1} {peer:8.0f} {unit[:5]:<1} {ours / peer:6.2f}x")
    seq = [r for r in results if r[0].startswith("sequential")]
    worst = min(r[1] / r[2] for r in seq)
    print(
        f"sequential target >= 0.70x qemu-io: {'met' if worst >= 0.7 else 'NOT met'} ({worst:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
