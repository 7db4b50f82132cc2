"""virtio-block throughput: the test guest's blk-bench under pycrosvm vs QEMU, same image, same run.

The guest (``e2e_tests/guest/blk_bench.c``) drives virtio-blk from CPL3 (native speed even on the
emulating-KVM hosts), polls the used ring, and times itself: sequential 1 MiB and random 4 KiB,
reads and writes, at queue depth 1 and ``qd`` (32). Three VMMs run it on ONE fully allocated raw
image (random data) in a fresh temp dir:

* ``qemu``       - ``-drive ...,format=raw,cache=none,aio=threads -device virtio-blk-pci`` (q35,
  qboot), exactly the fixture's ``qemu_command`` (O_DIRECT + a thread pool);
* ``crosvm``     - ``crosvm run --rwdisk IMG`` (default: the block device sandboxed in a forked,
  jailed child process);
* ``crosvm-nosb`` - the same with ``--disable-sandbox`` (device in the main process), to show
  what the sandbox costs.

The host disk varies 2-3x minute to minute, so the VMMs are interleaved in every round (the order
rotates: A B C, B C A, C A B ...) and the medians over rounds are compared. Before each VM the
image's page cache is dropped (``posix_fadvise(DONTNEED)`` on this file only): QEMU reads with
O_DIRECT, pycrosvm through the page cache, and neither should start with the image cached.
Each round also measures the host's own O_DIRECT reads of the file (1 MiB sequential and 4 KiB
random at QD1, ``os.preadv`` on an aligned buffer): the physical limit.

Targets (from the PCI/virtio issue): sequential >= 0.9x QEMU, 4 KiB random read >= 0.6x QEMU,
sandboxed at most 10% slower than ``--disable-sandbox``. A missed target is reported, not an
error (exit 0); a VM that fails or reports I/O errors exits 1.

    python benchmarks/blk.py [--rounds 3] [--size-mib 1024] [--bench-ms 2000] [--qd 32]
                             [--profile DIR] [--json PATH]

``--profile DIR`` additionally runs sandboxed crosvm once more on the 4 KiB random-read test
and records the block device's process with ``py-spy`` (``DIR/blk-device.svg`` flame graph and
``DIR/blk-device.txt``, a ``py-spy dump`` sample).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "e2e_tests"))

from fixture import Disk, GuestConfig, build_guest  # noqa: E402
from fixture._run import GuestVm  # noqa: E402
from fixture._vmm import crosvm_command, qemu_command  # noqa: E402
from fixture.errors import Error as FixtureError  # noqa: E402

VMMS = ("qemu", "crosvm", "crosvm-nosb")
TESTS = ("seq-read", "seq-write", "rand-read", "rand-write")
MIB = 1 << 20
#: (test, minimum pycrosvm/QEMU ratio) from the issue; rand-write has no target (shown only)
TARGETS = {"seq-read": 0.9, "seq-write": 0.9, "rand-read": 0.6}
SANDBOX_MAX_COST = 0.10


def crosvm_exe() -> str:
    beside = Path(sys.executable).parent / "crosvm"
    if beside.exists():
        return str(beside)
    found = shutil.which("crosvm")
    if not found:
        raise SystemExit("crosvm console script not found (pip install -e packages/crosvm)")
    return found


def vmm_argv(vmm: str, cfg: GuestConfig, crosvm: str) -> list[str]:
    kernel = build_guest()
    if vmm == "qemu":
        return qemu_command(kernel, cfg)
    argv = crosvm_command(kernel, cfg, crosvm=crosvm)
    if vmm == "crosvm-nosb":
        argv.insert(2, "--disable-sandbox")  # after "crosvm run"
    return argv


def make_image(path: Path, size: int) -> None:
    """A fully allocated image of random data (every block a real extent), flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        chunk = os.urandom(4 * MIB)
        done = 0
        while done < size:
            n = min(len(chunk), size - done)
            # vary each chunk cheaply so no two 4 MiB regions are identical (no dedup anywhere)
            head = done.to_bytes(8, "little")
            os.pwritev(fd, [head, memoryview(chunk)[8:n]], done)
            done += n
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def host_direct(path: Path, seconds: float) -> dict[str, float]:
    """The host's own O_DIRECT reads of the image: 1 MiB sequential MB/s, 4 KiB random IOPS."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    buf = mmap.mmap(-1, MIB)  # page aligned, as O_DIRECT needs
    try:
        size = os.fstat(fd).st_size
        view = memoryview(buf)
        off, nbytes = 0, 0
        t0 = time.monotonic()
        end = t0 + seconds
        while time.monotonic() < end:
            nbytes += os.preadv(fd, [view], off)
            off = (off + MIB) % (size - size % MIB)
        seq = nbytes / (time.monotonic() - t0) / 1e6
        small = view[:4096]
        blocks = size // 4096
        rng = int.from_bytes(os.urandom(8), "little") | 1
        ops = 0
        t0 = time.monotonic()
        end = t0 + seconds / 2
        while time.monotonic() < end:
            rng ^= (rng << 13) & 0xFFFFFFFFFFFFFFFF
            rng ^= rng >> 7
            rng ^= (rng << 17) & 0xFFFFFFFFFFFFFFFF
            os.preadv(fd, [small], (rng % blocks) * 4096)
            ops += 1
        iops = ops / (time.monotonic() - t0)
        view.release()
        small.release()
    finally:
        buf.close()
        os.close(fd)
    return {"seq_mb_per_s": seq, "rand4k_iops": iops}


def run_vm(vmm: str, image: Path, args: argparse.Namespace, crosvm: str) -> dict[str, dict]:
    """One guest run -> {"seq-read/1": {"mb_per_s":..., "iops":...}, ...}; SystemExit on failure."""
    cfg = GuestConfig(
        "blk-bench",
        params={"bench_ms": args.bench_ms, "qd": args.qd},
        mem_mib=512,
        disks=(Disk(image),),
    )
    argv = vmm_argv(vmm, cfg, crosvm)
    timeout = 8 * args.bench_ms / 1000 * 3 + 120
    try:
        with GuestVm(argv) as vm:
            result = vm.wait(timeout).check()
    except FixtureError as err:
        out = getattr(err, "output", "") or ""
        print(f"\n{vmm} FAILED: {err}\n{out[-2000:]}", file=sys.stderr)
        raise SystemExit(1) from None
    out: dict[str, dict] = {}
    for entry in result.find_all("bench"):
        if int(entry["errors"]):
            print(f"\n{vmm}: {entry['bench']} qd={entry['qd']} had {entry['errors']} I/O errors",
                  file=sys.stderr)  # fmt: skip
            raise SystemExit(1)
        out[f"{entry['bench']}/{entry['qd']}"] = {
            "mb_per_s": float(entry["mb_per_s"]),
            "iops": float(entry["iops"]),
            "notifies": int(entry["notifies"]),
        }
    if len(out) != 2 * len(TESTS):
        print(f"\n{vmm}: expected {2 * len(TESTS)} results, got {sorted(out)}", file=sys.stderr)
        raise SystemExit(1)
    out["_seconds"] = {"wall": result.seconds}
    return out


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def profile_device(image: Path, args: argparse.Namespace, crosvm: str, outdir: Path) -> None:
    """Sandboxed crosvm on 4 KiB random reads; py-spy the block device's (forked) process."""
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        print("py-spy not found next to the interpreter: no profile", file=sys.stderr)
        return
    outdir.mkdir(parents=True, exist_ok=True)
    ms = 12000
    cfg = GuestConfig(
        "blk-bench",
        params={"bench_ms": ms, "qd": args.qd, "bench": "rand-read"},
        mem_mib=512,
        disks=(Disk(image),),
    )
    with GuestVm(vmm_argv("crosvm", cfg, crosvm)) as vm:
        vm.wait_for(r"RESULT blk=", 60)
        main_pid = vm.proc.pid
        kids = _descendants(main_pid)
        print(f"profile: crosvm pid {main_pid}, descendants {kids}")
        target = kids[-1] if kids else main_pid
        for pid, name in ((main_pid, "vmm-main"), (target, "blk-device")):
            if pid == main_pid and name == "blk-device":
                continue
            with open(outdir / f"{name}.txt", "w") as f:
                subprocess.run([str(py_spy), "dump", "--pid", str(pid)], stdout=f,
                               stderr=subprocess.STDOUT, check=False, timeout=30)  # fmt: skip
        rec = subprocess.run(
            [str(py_spy), "record", "--pid", str(target), "--duration", "8", "--rate", "200",
             "--format", "raw", "-o", str(outdir / "blk-device.folded"), "--nonblocking"],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        print(rec.stderr[-500:])
        subprocess.run(
            [str(py_spy), "record", "--pid", str(main_pid), "--duration", "3", "--rate", "200",
             "--format", "raw", "-o", str(outdir / "vmm-main.folded"), "--nonblocking"],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        vm.wait(ms / 1000 * 2 + 60)
    for name in ("blk-device", "vmm-main"):
        folded = outdir / f"{name}.folded"
        if folded.exists():
            print(f"\n{name}: top self-time frames")
            for line in top_frames(folded, 12):
                print("  " + line)


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in kids:
            out.append(int(k))
            todo.append(int(k))
    return out


def top_frames(folded: Path, n: int) -> list[str]:
    """Self time per leaf frame from py-spy's raw (folded stack) output."""
    leaf: dict[str, int] = {}
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        total += c
        frame = stack.split(";")[-1]
        leaf[frame] = leaf.get(frame, 0) + c
    ranked = sorted(leaf.items(), key=lambda kv: -kv[1])[:n]
    return [f"{100 * c / max(total, 1):5.1f}%  {f}" for f, c in ranked]


def fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--bench-ms", type=int, default=2000, help="guest time per test (8 tests)")
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--profile", type=Path, help="py-spy the sandboxed block device into DIR")
    ap.add_argument("--json", type=Path, help="write every raw figure here")
    args = ap.parse_args()

    crosvm = crosvm_exe()
    build_guest()
    started = time.monotonic()
    print(f"load average at start: {loadavg()}  (2 host CPUs; other jobs share them)")
    raw: dict[str, list[dict]] = {v: [] for v in VMMS}
    host: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="pycrosvm-blkbench-") as tmp:
        image = Path(tmp) / "disk.img"
        t = time.monotonic()
        make_image(image, args.size_mib * MIB)
        print(f"image: {image} {args.size_mib} MiB random, written in {time.monotonic() - t:.1f} s")
        for rnd in range(args.rounds):
            order = VMMS[rnd % 3 :] + VMMS[: rnd % 3]
            drop_cache(image)
            h = host_direct(image, 2.0)
            host.append(h)
            print(f"round {rnd + 1}: host O_DIRECT {h['seq_mb_per_s']:.0f} MB/s seq 1M, "
                  f"{h['rand4k_iops']:.0f} IOPS rand 4K QD1; load {loadavg()}", flush=True)  # fmt: skip
            for vmm in order:
                drop_cache(image)
                r = run_vm(vmm, image, args, crosvm)
                raw[vmm].append(r)
                print(f"  {vmm:12s} {r['_seconds']['wall']:5.1f} s  "
                      + "  ".join(f"{k}={fmt(v['mb_per_s'] if k.startswith('seq') else v['iops'])}"
                                  for k, v in r.items() if not k.startswith("_")),
                      flush=True)  # fmt: skip
        if args.profile:
            drop_cache(image)
            profile_device(image, args, crosvm, args.profile)
    print(f"\nload average at end: {loadavg()}; total {time.monotonic() - started:.0f} s")

    # --- table ------------------------------------------------------------------------------
    keys = [f"{t}/{q}" for t in TESTS for q in (1, args.qd)]
    print(f"\nmedians of {args.rounds} rounds (seq: MB/s, rand: IOPS); ratios = crosvm / QEMU\n")
    hdr = (f"{'test':11s} {'qd':>3s} {'unit':>5s} {'qemu':>8s} {'crosvm':>8s} {'nosb':>8s} "
           f"{'crosvm/q':>8s} {'nosb/q':>7s} {'sb cost':>7s}  target")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    summary = []
    for key in keys:
        test, qd = key.split("/")
        unit = "mb_per_s" if test.startswith("seq") else "iops"
        med = {v: statistics.median(r[key][unit] for r in raw[v]) for v in VMMS}
        ratio = med["crosvm"] / med["qemu"] if med["qemu"] else 0.0
        ratio_nosb = med["crosvm-nosb"] / med["qemu"] if med["qemu"] else 0.0
        cost = 1 - med["crosvm"] / med["crosvm-nosb"] if med["crosvm-nosb"] else 0.0
        target = TARGETS.get(test)
        verdict = "-" if target is None else (
            f">={target}x {'ok' if ratio >= target else 'MISSED'}")  # fmt: skip
        sb = "ok" if cost <= SANDBOX_MAX_COST else "MISSED"
        print(f"{test:11s} {qd:>3s} {'MB/s' if unit == 'mb_per_s' else 'IOPS':>5s} "
              f"{fmt(med['qemu']):>8s} {fmt(med['crosvm']):>8s} {fmt(med['crosvm-nosb']):>8s} "
              f"{ratio:7.2f}x {ratio_nosb:6.2f}x {100 * cost:+6.0f}%  {verdict}; sandbox<=10% {sb}")  # fmt: skip
        summary.append({"test": test, "qd": int(qd), "unit": unit, **med, "ratio": ratio,
                        "ratio_nosb": ratio_nosb, "sandbox_cost": cost})  # fmt: skip
    hs = statistics.median(h["seq_mb_per_s"] for h in host)
    hr = statistics.median(h["rand4k_iops"] for h in host)
    print(f"\nhost O_DIRECT limit (median): {hs:.0f} MB/s sequential 1 MiB QD1, "
          f"{hr:.0f} IOPS 4 KiB random QD1")
    print("sb cost = how much slower sandboxed crosvm is than --disable-sandbox (negative: faster)")
    if args.json:
        args.json.write_text(json.dumps({"raw": raw, "host": host, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
