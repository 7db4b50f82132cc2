"""The kit's trimmed kernel boots under QEMU + KVM and its /init obeys the delegate protocol.

This checks the kit itself (QEMU is the known-good VMM here); crosvm's own Linux-boot tests
use the same artefacts. On emulating-KVM hosts one boot takes ~30-50 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fixture import HostProfile
from kit import (
    boot_qemu,
    ensure_initramfs,
    ensure_rootfs,
    ensure_tiny_kernel,
    kernel_cmdline,
)

pytestmark = [pytest.mark.qemu, pytest.mark.kvm, pytest.mark.linux, pytest.mark.slow]


def _boot_timeout(prof: HostProfile) -> float:
    # measured here: 33 s idle, ~50 s beside other work, 213 s at load average 7 (every
    # instruction of the guest kernel is emulated on the shared cores) -> scale(120) = 480 s
    return prof.scale(120)


def test_tiny_kernel_initramfs_runs_delegated_commands(
    host_profile: HostProfile, tmp_path: Path
) -> None:
    vmlinux, initrd = ensure_tiny_kernel(), ensure_initramfs("delegate")
    with (
        open(tmp_path / "console.log", "w") as log,
        boot_qemu(vmlinux, initrd, cmdline=kernel_cmdline(), log=log) as guest,
    ):
        con = guest.console
        con.wait_for("GUEST-EARLY", _boot_timeout(host_profile))
        assert con.wait_ready(host_profile.scale(30)) == "delegate"
        r = con.run("echo 42", host_profile.scale(30))
        assert (r.rc, r.lines) == (0, ("42",)), con.transcript
        r = con.run("printf no-newline; exit 3", host_profile.scale(30))
        assert (r.rc, r.lines) == (3, ("no-newline",))
        r = con.run("uname -r; grep -c ^processor /proc/cpuinfo", host_profile.scale(30))
        assert r.rc == 0 and r.lines[0].endswith("-tinyguest") and r.lines[1] == "1"
        # leaving: reboot=k + -no-reboot makes QEMU exit cleanly
        con.write(b"bye reboot -f\n")
        assert guest.wait_exit(host_profile.scale(30)) == 0


def test_tiny_kernel_boots_from_ext4_root(host_profile: HostProfile, tmp_path: Path) -> None:
    """The `crosvm run -r rootfs.ext4 vmlinux` shape: no initramfs, root on virtio-blk."""
    vmlinux, rootfs = ensure_tiny_kernel(), ensure_rootfs("delegate")
    cmdline = kernel_cmdline(extra="root=/dev/vda ro")
    with (
        open(tmp_path / "console.log", "w") as log,
        boot_qemu(vmlinux, None, cmdline=cmdline, disks=[rootfs], log=log) as guest,
    ):
        con = guest.console
        assert con.wait_ready(_boot_timeout(host_profile)) == "delegate"
        r = con.run("grep ' / ' /proc/mounts", host_profile.scale(30))
        assert r.rc == 0 and r.lines[0].startswith("/dev/root / ext4 ro"), r.lines
        con.write(b"bye reboot -f\n")
        assert guest.wait_exit(host_profile.scale(30)) == 0
