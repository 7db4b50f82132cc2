"""Boot a kit kernel under QEMU: the reference peer for the e2e tests and benchmarks.

The defaults are the ones measured to work where guest kernel code is emulated (nested
"kvm_pvm" KVM): PC machine with qboot (enters the PVH ``vmlinux`` directly, no SeaBIOS),
``-cpu host`` minus what QEMU cannot set here (arch-capabilities) and minus the KVM PV
features whose hypercalls never return (PV IPI, sched-yield, TLB flush, async-PF-int).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from .console import GuestConsole, stop_guest_process
from .params import EMULATING_HOST_CMDLINE

__all__ = ["QEMU_CPU", "QemuGuest", "boot_qemu", "qemu_command"]

QEMU_CPU = (
    "host,-arch-capabilities,-cx16,-xsave,"
    "-kvm-pv-ipi,-kvm-pv-sched-yield,-kvm-pv-tlb-flush,-kvm-asyncpf-int"
)
QBOOT = Path("/usr/share/qemu/qboot.rom")


def qemu_command(
    kernel: Path,
    initrd: Path | None = None,
    *,
    cmdline: str = EMULATING_HOST_CMDLINE,
    mem_mib: int = 256,
    smp: int = 1,
    disks: Sequence[Path] = (),
    readonly_disks: bool = True,
    extra: Sequence[str] = (),
    accel: str = "kvm",
) -> list[str]:
    """The QEMU argv (serial console on stdio, exits when the guest resets: ``reboot=k``)."""
    qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    argv = [
        qemu,
        "-accel", accel,
        "-cpu", QEMU_CPU if accel == "kvm" else "max",
        "-m", str(mem_mib),
        "-smp", str(smp),
        "-nodefaults", "-no-user-config", "-no-reboot",
        "-display", "none",
        "-chardev", "stdio,id=con0,signal=off",
        "-serial", "chardev:con0",
        "-M", "pc", "-vga", "none",
    ]  # fmt: skip
    if QBOOT.exists():
        argv += ["-bios", str(QBOOT)]
    argv += ["-kernel", str(kernel), "-append", cmdline]
    if initrd is not None:
        argv += ["-initrd", str(initrd)]
    for i, disk in enumerate(disks):
        ro = ",readonly=on" if readonly_disks else ""
        argv += [
            "-drive", f"id=d{i},if=none,file={disk},format=raw,cache=none{ro}",
            "-device", f"virtio-blk-pci,drive=d{i}",
        ]  # fmt: skip
    return argv + list(extra)


class QemuGuest:
    """A running QEMU with its console. Close it (or use ``with``) to kill QEMU."""

    def __init__(self, argv: Sequence[str], log: IO[str] | None = None) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.console = GuestConsole(self.proc.stdout, self.proc.stdin, log)

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit (the guest rebooted or powered off); return its status."""
        return self.proc.wait(timeout)

    def close(self) -> None:
        stop_guest_process(self.proc, self.console)

    def __enter__(self) -> QemuGuest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def boot_qemu(
    kernel: Path, initrd: Path | None = None, *, log: IO[str] | None = None, **kwargs: object
) -> QemuGuest:
    """Start QEMU with :func:`qemu_command` (same keyword arguments)."""
    return QemuGuest(qemu_command(kernel, initrd, **kwargs), log)  # type: ignore[arg-type]
