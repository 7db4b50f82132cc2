"""The Linux guest kit: kernels, initramfs and disk images for pycrosvm's end-to-end tests.

Everything is built from Debian packages on first use and cached under
``~/.cache/pycrosvm/kit/`` (``$PYCROSVM_KIT_CACHE`` overrides), keyed by a hash of the
inputs. Safe to call from several pytest-xdist workers at once (one builds, the others wait).

    from e2e_tests.kit import ensure_tiny_kernel, ensure_initramfs, kernel_cmdline
    # (the e2e tests put e2e_tests/ on sys.path and say `from kit import ...`)
    vmlinux = ensure_tiny_kernel()             # ELF with a PVH note, ~17 MB
    initrd = ensure_initramfs("delegate")     # uncompressed cpio, ~2.7 MB (with vsockcat)
    net = ensure_initramfs(iperf3=True)        # + Debian's iperf3 and its libraries

``python -m e2e_tests.kit build`` builds everything ahead of time. See README.md.
"""

from ._build import (
    MODES,
    StockKernel,
    busybox_tree,
    ensure_initramfs,
    ensure_rootfs,
    ensure_stock_kernel,
    ensure_tiny_bzimage,
    ensure_tiny_kernel,
    ensure_vsockcat,
    iperf3_closure,
    make_ext4,
)
from ._cache import cache_dir
from .bzimage import BzImageError, extract_vmlinux
from .console import CommandResult, ConsoleTimeout, GuestConsole, stop_guest_process
from .params import BASE_CMDLINE, CLEARCPUID, EMULATING_HOST_CMDLINE, kernel_cmdline
from .qemu import QemuGuest, boot_qemu, qemu_command

__all__ = [
    "BASE_CMDLINE",
    "CLEARCPUID",
    "EMULATING_HOST_CMDLINE",
    "MODES",
    "BzImageError",
    "CommandResult",
    "ConsoleTimeout",
    "GuestConsole",
    "QemuGuest",
    "StockKernel",
    "boot_qemu",
    "busybox_tree",
    "cache_dir",
    "ensure_initramfs",
    "ensure_rootfs",
    "ensure_stock_kernel",
    "ensure_tiny_bzimage",
    "ensure_tiny_kernel",
    "ensure_vsockcat",
    "extract_vmlinux",
    "iperf3_closure",
    "kernel_cmdline",
    "make_ext4",
    "qemu_command",
    "stop_guest_process",
]
