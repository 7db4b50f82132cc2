"""PIO exit round trips through ``kvm.Vcpu.run()`` against a C floor, in the same run.

The guest is ``out %al,$0x10; jmp .-2``: every ``KVM_RUN`` returns a port write. The C program
(``benchmarks/c/kvm_pio_loop.c``, compiled here with gcc into a temp dir) does bare
``ioctl(KVM_RUN)`` and checks the exit in the mmapped ``kvm_run``; the Python side does the same
through ``Vcpu.run()`` and dispatches with ``match`` as a VMM would. Rounds alternate C and
Python on one pinned CPU; the figure is the ratio of per-exit times (target: <= 1.5).

Guests: ``real`` (real mode, the loop emulated by KVM on PVM hosts: the cheapest exit here) and
``user`` (64-bit CPL3 with IOPL 3: the jmp runs natively, the out traps).

Also measured: the RSS that ``import kvm`` plus a 1-vCPU VM add to a fresh interpreter
(target: < 15 MiB).

    python benchmarks/kvm_exits.py [--exits N] [--rounds R] [--guest real|user|both]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kvm
from kvm.testing import GuestRam, setup_long_mode, setup_real_mode

HERE = Path(__file__).resolve().parent
LOOP = bytes.fromhex("e610ebfc")  # out %al,$0x10; jmp .-2
CODE = 0x10000
RAM_SIZE = 0x200000
TARGET_RATIO = 1.5
TARGET_RSS_MIB = 15.0


def build_c(tmp: Path) -> Path:
    exe = tmp / "kvm_pio_loop"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(exe), str(HERE / "c" / "kvm_pio_loop.c")], check=True
    )
    return exe


def c_round(exe: Path, guest: str, exits: int) -> float:
    out = subprocess.run(
        [str(exe), guest, str(exits), "1"], check=True, capture_output=True, text=True
    ).stdout
    return float(out.split()[1])


class PyLoop:
    """One VM and vCPU kept across rounds, as the C side re-creates its own per round."""

    def __init__(self, guest: str) -> None:
        self.ram = GuestRam(RAM_SIZE)
        self.kvm = kvm.Kvm()
        self.vm = self.kvm.create_vm()
        self.vm.add_memory_region(0, RAM_SIZE, self.ram.host_address)
        self.ram.write(CODE, LOOP)
        self.vcpu = self.vm.create_vcpu(0)
        if guest == "real":
            setup_real_mode(self.vcpu, 0, cs=CODE >> 4)
        else:
            setup_long_mode(self.vcpu, self.ram, CODE, user=True)

    def typed(self, exits: int) -> float:
        """ns per exit through run() + match on the typed exit."""
        run = self.vcpu.run
        IoOut = kvm.IoOut  # a local alias, as a hot loop would have
        start = time.perf_counter_ns()
        for _ in range(exits):
            match run():
                case IoOut(port=0x10):
                    pass
                case other:
                    raise RuntimeError(f"unexpected exit {other}")
        return (time.perf_counter_ns() - start) / exits

    def raw(self, exits: int) -> float:
        """ns per exit through run_code() + an integer test (the floor of any Python VMM)."""
        run = self.vcpu.run_code
        start = time.perf_counter_ns()
        for _ in range(exits):
            code = run()
            if code & 0xFFFF00FF != 0x00100002:
                raise RuntimeError(f"unexpected exit code {code:#x}")
        return (time.perf_counter_ns() - start) / exits

    def uncached(self, exits: int) -> float:
        """ns per exit when every exit object is built anew (what interning saves)."""
        run, decode = self.vcpu.run_code, self.vcpu._decode
        start = time.perf_counter_ns()
        for _ in range(exits):
            exit_ = decode(run())
            if type(exit_) is not kvm.IoOut:
                raise RuntimeError(f"unexpected exit {exit_}")
        return (time.perf_counter_ns() - start) / exits

    def close(self) -> None:
        self.vcpu.close()
        self.vm.close()
        self.kvm.close()
        self.ram.close()


RSS_PROBE = r"""
import os
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
before = rss()
import kvm
k = kvm.Kvm()
vm = k.create_vm()
vm.create_irqchip()
vcpu = vm.create_vcpu(0)
after = rss()
print(after - before)
"""


def measure_rss() -> float:
    out = subprocess.run(
        [sys.executable, "-c", RSS_PROBE], check=True, capture_output=True, text=True
    ).stdout
    return int(out) / (1 << 20)


def bench_guest(exe: Path, guest: str, exits: int, rounds: int) -> float:
    py = PyLoop(guest)
    try:
        py.typed(exits // 10)  # warm-up: fills the exit cache, faults in the code paths
        py.raw(exits // 10)
        c_round(exe, guest, exits // 10)
        cs, typed, raw, fresh = [], [], [], []
        for _ in range(rounds):
            cs.append(c_round(exe, guest, exits))
            typed.append(py.typed(exits))
            raw.append(py.raw(exits))
            fresh.append(py.uncached(exits))
    finally:
        py.close()
    c_med, t_med, r_med, f_med = (statistics.median(x) for x in (cs, typed, raw, fresh))
    # Headline: the median of per-round ratios (C and Python measured back to back), which
    # cancels most of the host's minute-to-minute drift.
    ratio = statistics.median(t / c for t, c in zip(typed, cs, strict=True))
    print(f"[{guest}] C floor        : {c_med:8.0f} ns/exit (min {min(cs):.0f})")
    print(
        f"[{guest}] Vcpu.run()+match: {t_med:8.0f} ns/exit (min {min(typed):.0f})"
        f"  ratio {t_med / c_med:.3f} (min/min {min(typed) / min(cs):.3f})"
    )
    print(
        f"[{guest}] Vcpu.run_code() : {r_med:8.0f} ns/exit (min {min(raw):.0f})"
        f"  ratio {r_med / c_med:.3f}"
    )
    print(
        f"[{guest}] uncached exits  : {f_med:8.0f} ns/exit (min {min(fresh):.0f})"
        f"  ratio {f_med / c_med:.3f}  (new IoOut per exit, for comparison)"
    )
    print(f"[{guest}] exits/s: C {1e9 / c_med:,.0f}  Python {1e9 / t_med:,.0f}")
    print(f"[{guest}] median per-round ratio run()+match / C: {ratio:.3f}")
    return ratio


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exits", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--guest", choices=("real", "user", "both"), default="both")
    args = ap.parse_args()
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or not shutil.which("gcc"):
        print("kvm_exits: needs /dev/kvm and gcc; skipped")
        return 0
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[-1]})  # the C child inherits it
    print(f"CPU {cpus[-1]}; {args.rounds} rounds x {args.exits} exits, C and Python alternate")
    ok = True
    with tempfile.TemporaryDirectory(prefix="kvm-exits-") as tmp:
        exe = build_c(Path(tmp))
        guests = ("real", "user") if args.guest == "both" else (args.guest,)
        for guest in guests:
            ratio = bench_guest(exe, guest, args.exits, args.rounds)
            verdict = "OK" if ratio <= TARGET_RATIO else "OVER TARGET"
            print(f"[{guest}] ratio {ratio:.3f} vs target <= {TARGET_RATIO}: {verdict}")
            ok &= ratio <= TARGET_RATIO
    rss = measure_rss()
    verdict = "OK" if rss < TARGET_RSS_MIB else "OVER TARGET"
    print(f"RSS of import kvm + 1-vCPU VM: {rss:.1f} MiB (target < {TARGET_RSS_MIB}): {verdict}")
    ok &= rss < TARGET_RSS_MIB
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
