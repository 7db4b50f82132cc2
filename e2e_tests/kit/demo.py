"""The README demo: boot Linux under pycrosvm's ``crosvm run`` with a shell on this terminal.

    python e2e_tests/kit/demo.py [--kernel auto|tiny|stock] [--rootfs] [-m MIB] [-c N]
                                 [-- EXTRA CROSVM RUN OPTIONS]
    nox -s demo                              # the same, through the workspace
    echo 'uname -a; reboot -f' | bash tools/demo.sh     # non-interactive

The kernel: on hosts where KVM runs guest kernel code in its instruction emulator (nested
``kvm_pvm``, like our development machines) only the kit's trimmed, patched kernel boots (the
stock one dies on its int3 self-test), so ``auto`` picks it there; on hardware KVM ``auto``
boots Debian's stock cloud kernel. Both come from the kit cache (built on first use).

With a terminal on stdin, crosvm itself is exec'd: it puts the terminal in raw mode and connects
it to the guest's serial console. Without one (a pipe or a file), input must not reach the guest
early: crosvm's 16550 keeps it in the receive FIFO until the guest reads, and Linux's 8250
driver clears that FIFO when it sets the port up, so a command piped straight into ``crosvm
run`` is lost (measured: the shell never sees it). This script then starts crosvm with pipes,
copies the console to stdout, and feeds stdin only once the shell is up (``GUEST-INIT-READY``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `e2e_tests.kit` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from e2e_tests.kit import (
    ensure_initramfs,
    ensure_rootfs,
    ensure_stock_kernel,
    ensure_tiny_kernel,
    kernel_cmdline,
)

READY_MARKER = b"GUEST-INIT-READY"


def emulating_host() -> bool:
    """True where guest CPL0 code is emulated (only the kit's tiny kernel boots there).

    The cheap check is the KVM module: ``kvm_pvm`` is the nested page-table-based KVM that
    emulates guest kernel code; ``kvm_intel``/``kvm_amd`` run it in hardware. On anything else
    the e2e fixture's measured host profile decides (one short QEMU run, cached per host boot).
    """
    modules = Path("/sys/module")
    if (modules / "kvm_pvm").exists():
        return True
    if (modules / "kvm_intel").exists() or (modules / "kvm_amd").exists():
        return False
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from fixture import host_profile

        return host_profile("qemu").emulating
    except Exception as err:  # no QEMU or gcc: the tiny kernel boots everywhere
        print(
            f"demo: host profile unavailable ({err}); assuming an emulating host", file=sys.stderr
        )
        return True


def crosvm_binary() -> str:
    venv = Path(sys.executable).with_name("crosvm")
    return str(venv) if venv.exists() else (shutil.which("crosvm") or "crosvm")


def build_argv(args: argparse.Namespace) -> tuple[list[str], str]:
    """The ``crosvm run`` argv and a one-line description of what it boots."""
    choice = args.kernel
    if choice == "auto":
        choice = "tiny" if emulating_host() else "stock"
    cmdline = kernel_cmdline(mode="shell")
    argv = [crosvm_binary(), "run", "-m", str(args.mem), "-c", str(args.cpus)]
    if choice == "stock":
        stock = ensure_stock_kernel()
        kernel, what = stock.bzimage, f"Debian's stock {stock.version} kernel"
        argv += ["-p", cmdline, "-i", str(stock.initramfs)]
    else:
        kernel, what = ensure_tiny_kernel(), "the kit's tiny Linux 6.1 (vmlinux)"
        if args.rootfs:
            argv += ["-p", cmdline, "-r", str(ensure_rootfs("shell"))]
            what += " with a read-only ext4 root on virtio-blk"
        else:
            argv += ["-p", cmdline, "-i", str(ensure_initramfs("shell"))]
            what += " with a busybox initramfs"
    argv += [*args.extra, str(kernel)]
    return argv, what


def run_piped(argv: list[str]) -> int:
    """crosvm with pipes: console -> stdout; stdin -> guest once its shell is ready."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    guest_in, guest_out = proc.stdin, proc.stdout

    def feed() -> None:
        try:
            while chunk := os.read(0, 65536):
                guest_in.write(chunk)
                guest_in.flush()
        except (BrokenPipeError, OSError):
            pass

    seen = b""
    feeding = False
    out = sys.stdout.buffer
    while chunk := os.read(guest_out.fileno(), 65536):
        out.write(chunk)
        out.flush()
        if not feeding:
            seen = (seen + chunk)[-4096:]
            if READY_MARKER in seen:
                feeding = True
                threading.Thread(target=feed, name="demo-stdin", daemon=True).start()
    return proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=("auto", "tiny", "stock"), default="auto")
    parser.add_argument("--rootfs", action="store_true", help="ext4 root instead of initramfs")
    parser.add_argument("-m", "--mem", type=int, default=256, metavar="MIB")
    parser.add_argument("-c", "--cpus", type=int, default=1)
    parser.add_argument("extra", nargs="*", help="more `crosvm run` options (after --)")
    args = parser.parse_args(argv)
    crosvm_argv, what = build_argv(args)
    print(
        f"demo: booting {what} under crosvm; the shell appears in ~40 s on emulating KVM "
        "(a few s on hardware KVM); type `reboot -f` to leave.",
        flush=True,
    )
    start = time.monotonic()
    if os.isatty(0):
        os.execv(crosvm_argv[0], crosvm_argv)  # crosvm puts the terminal in raw mode
    status = run_piped(crosvm_argv)
    print(f"demo: crosvm exited with status {status} after {time.monotonic() - start:.1f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
