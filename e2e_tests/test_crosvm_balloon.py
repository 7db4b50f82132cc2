"""virtio-balloon end to end: the C test guest under our crosvm, driven by ``crosvm balloon``.

The guest's ``balloon`` scenario (e2e_tests/guest/balloon.c) either balloons pages on its own
(mode=self: it fills them, inflates, deflates, and counts the pages that came back zeroed, i.e.
that the host really discarded) or follows the device's target (mode=host). In host mode its
page pool is zero-filled at allocation, so those pages are resident in crosvm's shared guest
memory before the host asks for them; the test then watches crosvm's RSS and the guest memfd's
allocated blocks fall when the guest inflates.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from fixture import GuestConfig, GuestVm, build_guest, crosvm_command, run_guest

pytestmark = [pytest.mark.kvm]

CROSVM = shutil.which("crosvm") or "crosvm"
TIMEOUT = 120.0
MIB = 1 << 20


def control(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CROSVM, *args], capture_output=True, text=True, timeout=30)


def vm_with_socket(cfg: GuestConfig, sock: Path) -> GuestVm:
    argv = crosvm_command(build_guest(), cfg, crosvm=CROSVM)
    argv[2:2] = ["--disable-sandbox", "-s", str(sock)]  # after "crosvm run"
    return GuestVm(argv)


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` (guest RAM is a shared memfd mapping, so it counts as RssShmem)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def guest_memfd_bytes(pid: int) -> int:
    """Bytes allocated to the guest-memory memfd (the largest memfd crosvm holds open)."""
    best = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd).startswith("/memfd:"):
                st = os.stat(fd)
                if st.st_size >= best:
                    best, blocks = st.st_size, st.st_blocks
        except OSError:  # an fd closed meanwhile
            continue
    assert best, "no memfd in crosvm"
    return blocks * 512


def test_self_mode_pages_come_back_zeroed() -> None:
    cfg = GuestConfig("balloon", {"pages": 1024}, balloon=True)
    result = run_guest(cfg, vmm="crosvm", crosvm=CROSVM, timeout=TIMEOUT)
    entry = result.find("balloon_pages")
    assert entry["actual_inflated"] == "1024" and entry["actual_after"] == "0"
    # The guest filled every page with 0xA5 before inflating: all came back zeroed, so the
    # host discarded each one (MADV_REMOVE), not just acknowledged the PFNs.
    assert entry["zeroed"] == "1024"
    assert result.returncode == 0


def test_host_target_inflates_and_gives_memory_back(tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    pages = 16384  # 64 MiB: the guest's pool (zero-filled, so resident on the host)
    cfg = GuestConfig(
        "balloon", {"mode": "host", "max_pages": pages, "timeout_ms": 300000},
        mem_mib=512, balloon=True,
    )  # fmt: skip
    with vm_with_socket(cfg, sock) as vm:
        vm.wait_for("READY balloon", TIMEOUT)
        pid = vm.proc.pid
        rss_before, memfd_before = rss_bytes(pid), guest_memfd_bytes(pid)

        assert control("balloon", "64M", str(sock)).returncode == 0
        vm.wait_for(r"RESULT balloon_inflated=", TIMEOUT)
        rss_after, memfd_after = rss_bytes(pid), guest_memfd_bytes(pid)
        print(f"RSS {rss_before / MIB:.1f} -> {rss_after / MIB:.1f} MiB, guest memfd "
              f"{memfd_before / MIB:.1f} -> {memfd_after / MIB:.1f} MiB")  # fmt: skip
        assert memfd_before - memfd_after >= 60 * MIB
        assert rss_before - rss_after >= 60 * MIB

        # The C guest does not negotiate the stats queue: crosvm still reports the size.
        stats = control("balloon_stats", str(sock))
        assert stats.returncode == 0, stats.stderr
        reply = json.loads(stats.stdout)
        assert reply["balloon_actual"] == 64 * MIB
        assert reply["free_memory"] is None and reply["total_memory"] is None

        assert control("balloon", "0", str(sock)).returncode == 0
        result = vm.wait(TIMEOUT)
    assert result.status == "ok", result.output
    assert result.find("balloon_inflated")["balloon_inflated"] == str(pages)
    assert result.find("balloon_deflated")["actual"] == "0"
    assert result.returncode == 0


def test_balloon_commands_without_a_balloon(tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    with vm_with_socket(GuestConfig("serial-echo"), sock) as vm:  # --no-balloon
        vm.wait_for("READY serial-echo", TIMEOUT)
        for args in (["balloon", "1M"], ["balloon_stats"]):
            result = control(*args, str(sock))
            assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
            assert "Traceback" not in result.stderr
        assert control("stop", str(sock)).returncode == 0
        assert vm.wait(30).returncode == 0
