"""virtio-balloon end to end: the C test guest under our crosvm, driven by ``crosvm balloon``.

The guest's ``balloon`` scenario (e2e_tests/guest/balloon.c) either balloons pages on its own
(mode=self: it fills them, inflates, deflates, and counts the pages that came back zeroed, i.e.
that the host really discarded) or follows the device's target (mode=host). In host mode its
page pool is zero-filled at allocation, so those pages are resident in crosvm's shared guest
memory before the host asks for them; the test then watches crosvm's RSS and the guest memfd's
allocated blocks fall when the guest inflates.

crosvm runs sandboxed by default: the balloon is then a jailed device process that discards
pages with MADV_REMOVE on the shared guest memfd, and the control socket's commands reach it
through the proxy's control socket. The tests run that way unless they say otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from fixture import GuestConfig, GuestVm, build_guest, crosvm_command, run_guest

from crosvm import control, vm
from devices.testing import VirtQueueDriver, make_guest_memory
from devices.virtio import Interrupt, VirtioPciDevice
from devices.virtio.balloon import Balloon, BalloonStat
from sys_util import EventFd

CROSVM = shutil.which("crosvm") or "crosvm"
TIMEOUT = 120.0
MIB = 1 << 20


def crosvm_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CROSVM, *args], capture_output=True, text=True, timeout=30)


def vm_with_socket(cfg: GuestConfig, sock: Path, *, sandbox: bool = True) -> GuestVm:
    argv = crosvm_command(build_guest(), cfg, crosvm=CROSVM)
    argv[2:2] = ["-s", str(sock)] + ([] if sandbox else ["--disable-sandbox"])  # after "run"
    return GuestVm(argv)


def descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren, ... (crosvm's device processes and their inits)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").iterdir():
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:  # the task exited meanwhile
                continue
            out += kids
            todo += kids
    return out


def memfd_holders(pid: int) -> list[int]:
    """crosvm (``pid``) and every process of its VM that holds the guest-memory memfd."""
    holders = [pid]
    for p in descendants(pid):
        try:
            if any(os.readlink(fd).startswith("/memfd:") for fd in Path(f"/proc/{p}/fd").iterdir()):
                holders.append(p)
        except OSError:
            continue
    return holders


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


@pytest.mark.kvm
@pytest.mark.parametrize("irq", ["poll", "msix", "intx"])
def test_self_mode_pages_come_back_zeroed(irq: str) -> None:
    cfg = GuestConfig("balloon", {"pages": 1024, "irq": irq}, balloon=True)
    result = run_guest(cfg, vmm="crosvm", crosvm=CROSVM, timeout=TIMEOUT)
    entry = result.find("balloon_pages")
    assert entry["actual_inflated"] == "1024" and entry["actual_after"] == "0"
    # The guest filled every page with 0xA5 before inflating: all came back zeroed, so the
    # host discarded each one (MADV_REMOVE), not just acknowledged the PFNs.
    assert entry["zeroed"] == "1024"
    assert result.returncode == 0


@pytest.mark.kvm
@pytest.mark.parametrize("sandbox", [True, False], ids=["sandboxed", "disable-sandbox"])
def test_host_target_inflates_and_gives_memory_back(tmp_path: Path, sandbox: bool) -> None:
    sock = tmp_path / "vm.sock"
    pages = 16384  # 64 MiB: the guest's pool (zero-filled, so resident on the host)
    cfg = GuestConfig(
        "balloon", {"mode": "host", "max_pages": pages, "timeout_ms": 300000},
        mem_mib=512, balloon=True,
    )  # fmt: skip
    with vm_with_socket(cfg, sock, sandbox=sandbox) as vm:
        vm.wait_for("READY balloon", TIMEOUT)
        pid = vm.proc.pid
        holders = memfd_holders(pid)
        # Sandboxed, the jailed balloon (and every other device process) maps guest RAM too.
        assert (len(holders) > 1) == sandbox, holders
        rss_before = [rss_bytes(p) for p in holders]
        memfd_before = guest_memfd_bytes(pid)

        assert crosvm_cmd("balloon", "64M", str(sock)).returncode == 0
        vm.wait_for(r"RESULT balloon_inflated=", TIMEOUT)
        rss_after = [rss_bytes(p) for p in holders]
        memfd_after = guest_memfd_bytes(pid)
        print(f"RSS (MiB) {[round(r / MIB, 1) for r in rss_before]} -> "
              f"{[round(r / MIB, 1) for r in rss_after]}, guest memfd "
              f"{memfd_before / MIB:.1f} -> {memfd_after / MIB:.1f} MiB")  # fmt: skip
        # The pages left the shared memfd itself (the whole VM's guest RAM), so the VMM's RSS
        # fell although the (sandboxed) balloon process discarded them, and no device process
        # grew by mapping them.
        assert memfd_before - memfd_after >= 60 * MIB
        assert rss_before[0] - rss_after[0] >= 60 * MIB
        assert all(a <= b + 4 * MIB for a, b in zip(rss_after[1:], rss_before[1:], strict=True))

        # The C guest does not negotiate the stats queue: crosvm still reports the size.
        stats = crosvm_cmd("balloon_stats", str(sock))
        assert stats.returncode == 0, stats.stderr
        reply = json.loads(stats.stdout)
        assert reply["balloon_actual"] == 64 * MIB
        assert reply["free_memory"] is None and reply["total_memory"] is None

        assert crosvm_cmd("balloon", "0", str(sock)).returncode == 0
        result = vm.wait(TIMEOUT)
    assert result.status == "ok", result.output
    assert result.find("balloon_inflated")["balloon_inflated"] == str(pages)
    assert result.find("balloon_deflated")["actual"] == "0"
    assert result.returncode == 0


@pytest.mark.kvm
def test_balloon_commands_without_a_balloon(tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    with vm_with_socket(GuestConfig("serial-echo"), sock) as vm:  # --no-balloon
        vm.wait_for("READY serial-echo", TIMEOUT)
        for args in (["balloon", "1M"], ["balloon_stats"]):
            result = crosvm_cmd(*args, str(sock))
            assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
            assert "Traceback" not in result.stderr
        assert crosvm_cmd("stop", str(sock)).returncode == 0
        assert vm.wait(30).returncode == 0


# --- the control path with a stats-capable driver (the mock driver; no VM) ------------------


def test_controller_adjust_and_stats_with_a_stats_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """crosvm's control handler against a balloon whose driver uses the stats queue.

    The C guest does not negotiate VIRTIO_BALLOON_F_STATS_VQ, so this drives the same handler
    with the mock virtqueue driver playing a Linux-like guest.
    """
    with make_guest_memory(4 << 20) as mem:
        balloon = Balloon()
        pci = VirtioPciDevice(balloon, mem)
        try:
            balloon.ack_features(balloon.features())
            feat = balloon.acked_features
            drivers = [VirtQueueDriver(mem, 0x10000 * (i + 1), 16, data_base=0x100000 * (i + 1),
                                       data_size=0x40000) for i in range(3)]  # fmt: skip
            evts = [EventFd(), EventFd(), EventFd()]
            first = struct.pack("<HQ", BalloonStat.MEMFREE, 1)
            drivers[2].add_request([first])
            queues = [d.make_queue(features=feat) for d in drivers]
            balloon.activate(mem, Interrupt(), queues, evts)
            handler = vm._Controller(None, balloons=[vm.LocalBalloon(balloon)])  # type: ignore[arg-type]

            assert handler.handle(control.BalloonCommand(control.Adjust(8 << 20))) == control.Ok()
            assert balloon.num_pages == 2048
            balloon.write_config(4, struct.pack("<I", 512))  # the driver reports 512 pages

            fresh = {BalloonStat.MEMFREE: 100 << 20, BalloonStat.MEMTOT: 256 << 20,
                     BalloonStat.MAJFLT: 7, BalloonStat.CACHES: 3 << 20}  # fmt: skip

            def answer() -> None:
                drivers[2].wait_used(1)
                drivers[2].add_request(
                    [b"".join(struct.pack("<HQ", t, v) for t, v in fresh.items())]
                )
                drivers[2].kick(evts[2])

            t = threading.Thread(target=answer, daemon=True)
            t.start()
            reply = handler.handle(control.BalloonCommand(control.Stats()))
            t.join()
            assert reply == control.BalloonStats(
                balloon_actual=512 * 4096, swap_in=None, swap_out=None, major_faults=7,
                minor_faults=None, free_memory=100 << 20, total_memory=256 << 20,
                available_memory=None, disk_caches=3 << 20,
            )  # fmt: skip

            # A driver that never answers: an error within the (shortened) timeout.
            monkeypatch.setattr(vm, "BALLOON_STATS_TIMEOUT", 0.2)
            reply = handler.handle(control.BalloonCommand(control.Stats()))
            assert reply == control.Err(errno.ETIMEDOUT)
            for e in evts:
                e.close()
        finally:
            pci.close()


# --- a Linux guest: its virtio_balloon driver uses the stats queue -----------------------------


def _meminfo_kib(console: Any, field: str, timeout: float) -> int:
    result = console.run(f"grep ^{field}: /proc/meminfo", timeout)
    assert result.rc == 0, result
    return int(result.lines[0].split()[1])


def _stats(sock: Path) -> dict[str, Any]:
    result = crosvm_cmd("balloon_stats", str(sock))
    assert result.returncode == 0, result.stderr
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


@pytest.mark.kvm
@pytest.mark.linux
@pytest.mark.slow
def test_linux_guest_stats_and_inflate(host_profile: Any, tmp_path: Path) -> None:
    """The kit's tiny Linux under crosvm (sandboxed: the balloon is a jailed process reached
    through the proxy): balloon_stats returns the guest's own numbers, and ``crosvm balloon
    32M`` makes its driver inflate (actual follows, MemFree falls)."""
    from kit import GuestConsole, ensure_initramfs, ensure_tiny_kernel, kernel_cmdline

    sock = tmp_path / "vm.sock"
    kernel, initrd = ensure_tiny_kernel(), ensure_initramfs()
    argv = [CROSVM, "run", "-s", str(sock), "-m", "160",
            "-p", kernel_cmdline(), "-i", str(initrd), str(kernel)]  # fmt: skip
    boot, cmd = host_profile.scale(120), host_profile.scale(30)
    with open(tmp_path / "crosvm.stderr", "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    assert proc.stdin is not None and proc.stdout is not None
    console = GuestConsole(proc.stdout, proc.stdin)
    try:
        console.wait_ready(boot)
        drivers = console.run("ls /sys/bus/virtio/drivers/virtio_balloon", cmd)
        assert any(word.startswith("virtio") for word in drivers.output.split()), drivers

        stats = _stats(sock)
        total = _meminfo_kib(console, "MemTotal", cmd) * 1024
        print(f"linux balloon_stats: {stats}")
        assert stats["total_memory"] == total  # the guest's own MemTotal, in bytes
        assert 0 < stats["free_memory"] <= stats["total_memory"]
        assert stats["available_memory"] is not None and stats["balloon_actual"] == 0

        free_before = _meminfo_kib(console, "MemFree", cmd)
        assert crosvm_cmd("balloon", "32M", str(sock)).returncode == 0
        deadline = cmd
        for _ in range(int(deadline * 2)):
            if _stats(sock)["balloon_actual"] == 32 * MIB:
                break
            console.run("sleep 0.5", cmd)
        else:
            pytest.fail(f"the guest never reported a 32 MiB balloon: {_stats(sock)}")
        free_after = _meminfo_kib(console, "MemFree", cmd)
        print(f"guest MemFree {free_before} -> {free_after} KiB")
        assert free_before - free_after >= 28 * 1024  # 32 MiB, minus the guest's own churn

        assert crosvm_cmd("balloon", "0", str(sock)).returncode == 0
        for _ in range(int(deadline * 2)):
            if _stats(sock)["balloon_actual"] == 0:
                break
            console.run("sleep 0.5", cmd)
        else:
            pytest.fail("the guest never deflated")
        console.write(b"bye reboot -f\n")
        assert proc.wait(cmd) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        console.close()
        proc.stdin.close()
        proc.stdout.close()


# --- a jailed balloon that dies ------------------------------------------------------------------


@pytest.mark.kvm
def test_a_jailed_balloon_killed_by_seccomp_ends_the_vm_naming_it(tmp_path: Path) -> None:
    """The balloon's policy, minus madvise: the first inflate kills the device process, and
    crosvm exits (status 1) with a message naming the device and the signal (and, in the
    seccomp log mode, the syscall)."""
    from devices.proxy import policy_dir

    policies = tmp_path / "policies"
    shutil.copytree(policy_dir(), policies)
    common = policies / "common_device.policy"
    text = common.read_text()
    assert "\nmadvise:" in text
    lines = text.replace("\\\n", "").splitlines()
    common.write_text("\n".join(line for line in lines if not line.startswith("madvise:")) + "\n")
    cfg = GuestConfig("balloon", {"pages": 64}, balloon=True)
    argv = crosvm_command(build_guest(), cfg, crosvm=CROSVM)
    argv[2:2] = ["--seccomp-policy-dir", str(policies), "--seccomp-log-failures"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("crosvm: a device process died (device pci-virtio-balloon"), last
    assert "killed by SIGSYS (seccomp refused syscall madvise)" in last, last
