"""Linux boot time and VMM memory: ``crosvm run`` vs QEMU on the same kernel, initrd and cmdline.

    python benchmarks/boot.py [--runs N] [--mem MIB] [--only quiet|verbose]
    python benchmarks/boot.py --sandbox [--runs N] [--mem MIB]

Boots the kit's tiny kernel (ELF vmlinux, PVH note) with the kit's initramfs in ``boot`` mode:
/init prints GUEST-INIT-READY and GUEST-DONE, then ``reboot -f``; with ``reboot=k`` that is an
i8042 reset and the VMM exits. Measured from launch: the init marker and the VMM's exit; the
VMM's peak RSS (``ru_maxrss`` from ``wait4``) and CPU time. Peers, in the same run:

* ``qemu-q35``: QEMU ``-M q35`` + qboot (enters the PVH vmlinux directly, no SeaBIOS);
* ``qemu-microvm``: QEMU ``-M microvm`` (qboot built in, no i8042: it cannot reset, so it is
  stopped at GUEST-DONE and its "exit" column is the GUEST-DONE time).

Both log modes: ``quiet`` (as the tests boot) and ``verbose`` (the kernel's whole boot log on
the serial console: ~20 KB, one port-I/O exit per byte for every VMM, each handled in Python by
crosvm). On emulating-KVM hosts the guest kernel runs at ~1M instructions/s, so most of a boot
is the guest itself and the ratios show the VMM overhead on top; on hardware KVM they show it
directly. Runs go one after another (never in parallel: they would measure each other).

``--sandbox``: what the device sandbox costs a boot (issue #9's target: sandboxed at most 10%
slower than ``--disable-sandbox``). crosvm only, both ways, with the same command line and the
same devices, every one of which the sandbox jails: a ``--rwdisk`` (a 64 MiB raw image that the
guest's virtio-blk driver probes through the jailed device), virtio-rng (read by the kernel's
hwrng) and virtio-balloon. Rounds are interleaved (sandboxed, then not, N times) so drifting
host load hits both alike; medians and their ratio are printed. At GUEST-INIT-READY the jailed
device processes are counted (each maps the guest memfd), so a run that silently fell back to
one process fails. Peak RSS is the main process's only. Block throughput sandboxed vs not is
``blk.py`` (``blk_results.md``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e_tests.kit import ensure_initramfs, ensure_tiny_kernel, kernel_cmdline
from e2e_tests.kit.qemu import QBOOT, QEMU_CPU

TIMEOUT = 600.0
SANDBOX_TARGET = 1.10  # sandboxed / --disable-sandbox boot time, at most


@dataclass
class Boot:
    vmm: str
    mode: str
    ready: float | None = None  # seconds from launch to GUEST-INIT-READY
    done: float | None = None  # ... to GUEST-DONE
    exit: float | None = None  # ... to the VMM's exit (None: killed)
    status: int | None = None
    maxrss_kib: int = 0
    cpu_s: float = 0.0
    console_bytes: int = 0
    jailed: int = 0  # device processes seen at GUEST-INIT-READY (``on_ready`` of crosvm runs)
    notes: list[str] = field(default_factory=list)


def crosvm_exe() -> str:
    venv = Path(sys.executable).with_name("crosvm")
    return str(venv) if venv.exists() else (shutil.which("crosvm") or "crosvm")


def crosvm_argv(kernel: Path, initrd: Path, cmdline: str, mem: int) -> list[str]:
    # no balloon/rng: the QEMU peers have no devices either (-nodefaults)
    return [crosvm_exe(), "run", "--disable-sandbox", "--no-balloon", "--no-rng", "-m", str(mem),
            "-c", "1", "-p", cmdline, "-i", str(initrd), str(kernel)]  # fmt: skip


def crosvm_device_argv(
    kernel: Path, initrd: Path, cmdline: str, mem: int, disk: Path, *, sandbox: bool
) -> list[str]:
    """crosvm with a disk, rng and balloon (all jailed when ``sandbox``)."""
    argv = [crosvm_exe(), "run", "-m", str(mem), "-c", "1", "--rwdisk", str(disk),
            "-p", cmdline, "-i", str(initrd), str(kernel)]  # fmt: skip
    if not sandbox:
        argv.insert(2, "--disable-sandbox")
    return argv


def device_processes(pid: int) -> int:
    """Processes under ``pid`` that hold a memfd: crosvm's jailed devices (guest memory)."""
    count, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            todo += kids
            for kid in kids:
                try:
                    links = [os.readlink(f) for f in Path(f"/proc/{kid}/fd").iterdir()]
                except OSError:
                    continue
                count += any(link.startswith("/memfd:") for link in links)
    return count


def qemu_argv(machine: str, kernel: Path, initrd: Path, cmdline: str, mem: int) -> list[str]:
    qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    argv = [qemu, "-accel", "kvm", "-cpu", QEMU_CPU, "-m", str(mem), "-smp", "1",
            "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
            "-chardev", "stdio,id=con0,signal=off", "-serial", "chardev:con0"]  # fmt: skip
    if machine == "microvm":
        argv += ["-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off,pic=on,pit=on"]
    else:
        argv += ["-M", machine, "-vga", "none", "-bios", str(QBOOT)]
    return [*argv, "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline]


def boot_once(
    vmm: str,
    mode: str,
    argv: list[str],
    kill_at_done: bool,
    log: Path | None = None,
    on_ready: Callable[[int], int] | None = None,
) -> Boot:
    result = Boot(vmm, mode)
    transcript: list[bytes] = []
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    stdout, stderr = proc.stdout, proc.stderr
    err_tail: list[bytes] = []

    def read_console() -> None:
        buf = b""
        while chunk := os.read(stdout.fileno(), 65536):
            now = time.monotonic() - start
            result.console_bytes += len(chunk)
            transcript.append(chunk)
            buf = (buf + chunk)[-8192:]
            if result.ready is None and b"GUEST-INIT-READY" in buf:
                result.ready = now
                if on_ready is not None:
                    result.jailed = on_ready(proc.pid)
            if result.done is None and b"GUEST-DONE" in buf:
                result.done = now
                if kill_at_done:
                    proc.send_signal(signal.SIGKILL)

    def read_stderr() -> None:
        while chunk := os.read(stderr.fileno(), 65536):
            err_tail.append(chunk)

    readers = [threading.Thread(target=f, daemon=True) for f in (read_console, read_stderr)]
    for t in readers:
        t.start()
    timer = threading.Timer(TIMEOUT, proc.kill)
    timer.start()
    try:
        _, wstatus, rusage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    end = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(wstatus)
    for t in readers:
        t.join(5)
    stdout.close()
    stderr.close()
    result.status = proc.returncode
    if log is not None:
        log.write_bytes(b"".join(transcript))
    result.maxrss_kib = rusage.ru_maxrss
    result.cpu_s = rusage.ru_utime + rusage.ru_stime
    if not (kill_at_done and result.done is not None):
        result.exit = end
    if result.ready is None or (result.exit is not None and result.status != 0):
        tail = b"".join(err_tail)[-500:].decode(errors="replace").strip()
        result.notes.append(f"status {result.status}: {tail}")
    return result


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:6.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:4.2f}x"


def sandbox_compare(runs: int, mem: int) -> int:
    """``--sandbox``: interleaved sandboxed / ``--disable-sandbox`` boots, medians, ratios."""
    kernel, initrd = ensure_tiny_kernel(), ensure_initramfs("delegate")
    cmdline = kernel_cmdline(mode="boot")
    print(f"kernel {kernel}\ninitrd {initrd}\nguest: {mem} MiB, 1 vCPU, --rwdisk + rng + "
          f"balloon\nload average {os.getloadavg()}")  # fmt: skip
    results: list[Boot] = []
    with tempfile.TemporaryDirectory(prefix="crosvm-boot-sandbox-") as tmp:
        disk = Path(tmp) / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
        print("argv: " + " ".join(crosvm_device_argv(kernel, initrd, cmdline, mem, disk,
                                                     sandbox=True)))  # fmt: skip
        for run in range(runs):
            for sandbox in (True, False):
                name = "sandboxed" if sandbox else "disable-sandbox"
                argv = crosvm_device_argv(kernel, initrd, cmdline, mem, disk, sandbox=sandbox)
                b = boot_once(name, "quiet", argv, kill_at_done=False, on_ready=device_processes)
                results.append(b)
                print(
                    f"  round {run} {name:15s} ready {fmt(b.ready)} s  exit {fmt(b.exit)} s  "
                    f"rss {b.maxrss_kib / 1024:6.1f} MiB  cpu {b.cpu_s:6.1f} s  "
                    f"jailed devices {b.jailed}  {'; '.join(b.notes)}",
                    flush=True,
                )
    print(f"\nmedians over {runs} interleaved rounds (load average now {os.getloadavg()}):")
    status = 0
    for attr, unit in (("ready", "s"), ("exit", "s"), ("cpu_s", "s"), ("maxrss_kib", "KiB")):
        vals = {
            name: [getattr(b, attr) for b in results if b.vmm == name and getattr(b, attr)]
            for name in ("sandboxed", "disable-sandbox")
        }
        med = {k: statistics.median(v) if v else None for k, v in vals.items()}
        sb, nosb = med["sandboxed"], med["disable-sandbox"]
        target = ""
        if attr in ("ready", "exit") and sb is not None and nosb:
            met = sb / nosb <= SANDBOX_TARGET
            target = f"  (target <= {SANDBOX_TARGET:.2f}x: {'met' if met else 'MISSED'})"
        print(f"  {attr:10s} sandboxed {sb} {unit}  --disable-sandbox {nosb} {unit}  "
              f"ratio {ratio(sb, nosb)}{target}")  # fmt: skip
    # Each round's pair ran back to back: their ratio is less exposed to slow load drifts.
    pairs = [
        (s.exit / n.exit)
        for s, n in zip(results[0::2], results[1::2], strict=True)
        if s.exit and n.exit and s.ready is not None and n.ready is not None
    ]
    if pairs:
        shown = " ".join(f"{p:4.2f}x" for p in pairs)
        print(f"  exit, per round (sandboxed / --disable-sandbox): {shown}; "
              f"median {statistics.median(pairs):4.2f}x")  # fmt: skip
    if any(b.vmm == "sandboxed" and b.jailed < 3 for b in results):
        print("  a sandboxed run did not jail disk, rng and balloon")
        status = 1
    if any(b.vmm == "disable-sandbox" and b.jailed for b in results):
        print("  a --disable-sandbox run forked device processes")
        status = 1
    if any(b.ready is None or b.status != 0 for b in results):
        status = 1
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="boots per VMM and mode")
    parser.add_argument("--mem", type=int, default=256, help="guest MiB (default 256)")
    parser.add_argument("--only", choices=("quiet", "verbose"))
    parser.add_argument("--vmm", action="append", choices=("crosvm", "qemu-q35", "qemu-microvm"))
    parser.add_argument("--log-dir", type=Path, help="save each boot's console here")
    parser.add_argument(
        "--sandbox", action="store_true", help="crosvm sandboxed vs --disable-sandbox only"
    )
    args = parser.parse_args()
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("boot: no usable /dev/kvm; skipped")
        return 0
    if args.sandbox:
        return sandbox_compare(args.runs, args.mem)
    kernel, initrd = ensure_tiny_kernel(), ensure_initramfs("delegate")
    have_qemu = shutil.which("qemu-system-x86_64") is not None and QBOOT.exists()
    vmms = args.vmm or ["crosvm", "qemu-q35", "qemu-microvm"]
    if not have_qemu:
        print("boot: qemu-system-x86_64 or qboot.rom missing: crosvm only, no ratios")
        vmms = [v for v in vmms if v == "crosvm"]
    modes = [args.only] if args.only else ["quiet", "verbose"]
    print(f"kernel {kernel}\ninitrd {initrd}\nguest: {args.mem} MiB, 1 vCPU, no devices")
    results: list[Boot] = []
    for mode in modes:
        cmdline = kernel_cmdline(mode="boot")
        if mode == "verbose":
            cmdline = " ".join(w for w in cmdline.split() if w != "quiet")
        print(f"\n[{mode}] cmdline: {cmdline}")
        for run in range(args.runs):
            for vmm in vmms:
                if vmm == "crosvm":
                    argv = crosvm_argv(kernel, initrd, cmdline, args.mem)
                else:
                    argv = qemu_argv(vmm.split("-")[1], kernel, initrd, cmdline, args.mem)
                log = None
                if args.log_dir is not None:
                    args.log_dir.mkdir(parents=True, exist_ok=True)
                    log = args.log_dir / f"{vmm}-{mode}-{run}.log"
                b = boot_once(vmm, mode, argv, kill_at_done=vmm == "qemu-microvm", log=log)
                results.append(b)
                print(
                    f"  {vmm:13s} ready {fmt(b.ready)} s  done {fmt(b.done)} s  exit "
                    f"{fmt(b.exit)} s  rss {b.maxrss_kib / 1024:6.1f} MiB  cpu {b.cpu_s:6.1f} s  "
                    f"console {b.console_bytes} B  {'; '.join(b.notes)}",
                    flush=True,
                )
    print("\nmeans and ratios (crosvm / peer):")
    for mode in modes:

        def mean(vmm: str, attr: str, m: str = mode) -> float | None:
            vals = [getattr(b, attr) for b in results if b.vmm == vmm and b.mode == m]
            vals = [v for v in vals if v is not None]
            return sum(vals) / len(vals) if vals else None

        for peer in (v for v in vmms if v != "crosvm"):
            cross_exit = mean("crosvm", "exit")
            peer_exit = mean(peer, "exit") if peer != "qemu-microvm" else mean(peer, "done")
            ready = ratio(mean("crosvm", "ready"), mean(peer, "ready"))
            print(
                f"  [{mode}] vs {peer:13s} ready {ready}"
                f"  exit{'(done)' if peer == 'qemu-microvm' else ''} {ratio(cross_exit, peer_exit)}"
                f"  peak RSS {ratio(mean('crosvm', 'maxrss_kib'), mean(peer, 'maxrss_kib'))}"
                f"  cpu {ratio(mean('crosvm', 'cpu_s'), mean(peer, 'cpu_s'))}"
            )
    failed = [b for b in results if b.ready is None]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
