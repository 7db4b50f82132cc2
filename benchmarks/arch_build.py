"""Time and memory of ``arch.x86_64.build_vm`` for a 256 MiB, 1-vCPU VM (part of boot time).

No peer: this is a number to watch. Three kernels are measured, each over several rounds
(median and min printed):

* ``tiny``: the 100-byte ``arch.testing.serial_hello_guest`` ELF -- the fixed cost (KVM VM,
  memory slots, irqchip/PIT, routing table, zero page, MP table, page tables, vCPU setup);
* ``vmlinux-17M``: a synthetic ELF with a 17 MB segment plus 8 MB bss (the size of the tiny
  Linux vmlinux) and a 2 MB initrd -- what image copying adds;
* ``run-tiny``: build plus running the tiny guest to its i8042 reset (first guest output).

RSS is measured in a fresh interpreter: after ``import arch.x86_64`` and after building the
``vmlinux-17M`` VM (guest pages the loader touched count; untouched RAM does not).

    python benchmarks/arch_build.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _make_files(tmp: Path) -> tuple[Path, Path]:
    from arch.testing import build_elf64

    text = os.urandom(17 * MIB)
    kernel = tmp / "vmlinux"
    kernel.write_bytes(build_elf64([(0x100_0000, text, len(text) + 8 * MIB)], 0x100_0000))
    initrd = tmp / "initrd"
    initrd.write_bytes(os.urandom(2 * MIB))
    return kernel, initrd


def _build(kernel: object, initrd: object | None) -> float:
    from arch.x86_64 import VmConfig, build_vm

    start = time.perf_counter()
    rvm = build_vm(
        VmConfig(memory_size=256 * MIB, kernel=kernel, initrd=initrd, cmdline="console=ttyS0")
    )
    elapsed = time.perf_counter() - start
    rvm.close()
    return elapsed


def _build_and_run() -> float:
    from arch.testing import serial_hello_guest
    from arch.x86_64 import VmConfig, build_vm
    from kvm import IoIn, IoOut

    start = time.perf_counter()
    with build_vm(VmConfig(memory_size=256 * MIB, kernel=serial_hello_guest())) as rvm:
        vcpu = rvm.vcpus[0]
        while not select.select([rvm.exit_evt], [], [], 0)[0]:
            exit_ = vcpu.run()
            if isinstance(exit_, IoOut):
                rvm.io_bus.write(exit_.port, exit_.data)
            elif isinstance(exit_, IoIn):
                vcpu.set_io_in_data(rvm.io_bus.read(exit_.port, exit_.size))
            else:
                raise RuntimeError(f"unexpected exit {exit_!r}")
        return time.perf_counter() - start


def _report(name: str, times: list[float]) -> None:
    print(
        f"{name:12} median {statistics.median(times) * 1e3:8.2f} ms   "
        f"min {min(times) * 1e3:8.2f} ms   ({len(times)} rounds)"
    )


def _rss_child(tmp: str) -> None:
    base = _rss_mib()
    import arch.x86_64  # noqa: F401

    imported = _rss_mib()
    kernel, initrd = Path(tmp) / "vmlinux", Path(tmp) / "initrd"
    from arch.x86_64 import VmConfig, build_vm

    rvm = build_vm(VmConfig(memory_size=256 * MIB, kernel=kernel, initrd=initrd))
    built = _rss_mib()
    rvm.close()
    print(
        f"RSS: interpreter {base:.1f} MiB, +{imported - base:.1f} MiB for import arch.x86_64, "
        f"+{built - imported:.1f} MiB after build_vm (25 MiB kernel+bss and 2 MiB initrd written)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        _rss_child(args.rss_child)
        return 0
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("skipped: needs /dev/kvm")
        return 0
    from arch.testing import serial_hello_guest

    tiny = serial_hello_guest()
    with tempfile.TemporaryDirectory() as tmp:
        kernel, initrd = _make_files(Path(tmp))
        _build(tiny, None)  # warm up imports and the page cache
        _build(kernel, initrd)
        _report("tiny", [_build(tiny, None) for _ in range(args.rounds)])
        _report("vmlinux-17M", [_build(kernel, initrd) for _ in range(args.rounds)])
        _report("run-tiny", [_build_and_run() for _ in range(args.rounds)])
        subprocess.run([sys.executable, __file__, "--rss-child", tmp], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
