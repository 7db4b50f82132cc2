"""`crosvm run` end to end with the native-speed test guest: boot, devices, failures, control.

Each test boots the C test guest (e2e_tests/guest) under our crosvm and checks what the guest
reports on COM1 (``RESULT key=value`` lines) against what the host knows: the disk's sha256, the
wall clock, the file the guest wrote. Every VM is a separate process that the fixture always
kills and cleans up.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fixture import Disk, GuestConfig, launch, run_guest

import sys_util
from arch.testing import build_elf64

pytestmark = [pytest.mark.kvm]

CROSVM = shutil.which("crosvm") or "crosvm"
TIMEOUT = 120.0


def crosvm_guest(cfg: GuestConfig, *, check: bool = True) -> object:
    return run_guest(cfg, vmm="crosvm", crosvm=CROSVM, timeout=TIMEOUT, check=check)


def sha256(path: Path, length: int | None = None) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read() if length is None else f.read(length)).hexdigest()


def make_disk(path: Path, size: int, seed: int = 0) -> Path:
    block = hashlib.sha256(str(seed).encode()).digest() * (1 << 15)  # 1 MiB of varied bytes
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
            block = block[1:] + block[:1]
    return path


def run_crosvm(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CROSVM, "run", "--disable-sandbox", *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


# --- boot and platform ------------------------------------------------------------------


def test_boots_via_elf_and_reset_exits_zero() -> None:
    result = crosvm_guest(GuestConfig("hello"))
    assert result.returncode == 0  # type: ignore[attr-defined]
    assert result.find("hello")["cpl"] == "3"  # type: ignore[attr-defined]


def test_command_line_reaches_the_guest() -> None:
    # The scenario itself travels in -p; an unknown scenario name comes back in the failure.
    result = crosvm_guest(GuestConfig("no-such-scenario"), check=False)
    assert "no-such-scenario" in result.output  # type: ignore[attr-defined]


def test_two_vcpus_report_in() -> None:
    result = crosvm_guest(GuestConfig("smp", cpus=2))
    cpus = {entry["cpu"] for entry in result.find_all("apic_id")}  # type: ignore[attr-defined]
    assert cpus == {"0", "1"}
    assert result.find("cpus_online")["cpus_online"] == "2"  # type: ignore[attr-defined]


@pytest.mark.parametrize("mem_mib", [256, 1024])
def test_e820_shows_the_memory(mem_mib: int) -> None:
    result = crosvm_guest(GuestConfig("hello", mem_mib=mem_mib))
    seen = int(result.find("mem_mib")["mem_mib"])  # type: ignore[attr-defined]
    assert mem_mib - 4 <= seen <= mem_mib  # minus the low 1 MiB holes


def test_rtc_follows_the_host_clock() -> None:
    result = crosvm_guest(GuestConfig("rtc"))
    guest = int(result.find("rtc_epoch")["rtc_epoch"])  # type: ignore[attr-defined]
    assert abs(guest - time.time()) < 10


def test_serial_input_reaches_the_guest() -> None:
    cfg = GuestConfig("serial-echo")
    with launch(cfg, vmm="crosvm", crosvm=CROSVM) as vm:
        vm.wait_for("READY serial-echo", TIMEOUT)
        vm.send_serial(b"ping 123\r\nEND\r\n")
        vm.wait_for("ECHO ping 123", 30)
        result = vm.wait(TIMEOUT)
    assert result.returncode == 0 and result.status == "ok"


def test_cpuid_hides_what_this_host_cannot_run() -> None:
    result = crosvm_guest(GuestConfig("cpuid"))
    assert result.find("hypervisor")["hypervisor"].startswith("KVMKVMKVM")  # type: ignore[attr-defined]


# --- failures end the run with a status and a message ------------------------------------


def test_triple_fault_is_an_error(tmp_path: Path) -> None:
    kernel = tmp_path / "ud2.elf"  # #UD with an empty IDT: #GP, #DF, then a triple fault
    kernel.write_bytes(build_elf64([(0x200000, b"\x0f\x0b", 0x1000)], 0x200000))
    result = run_crosvm(str(kernel))
    assert result.returncode == 1
    assert "triple-faulted" in result.stderr and "Traceback" not in result.stderr


def test_halted_forever_is_an_error(tmp_path: Path) -> None:
    kernel = tmp_path / "halt.elf"  # cli; hlt; jmp .-2
    kernel.write_bytes(build_elf64([(0x200000, b"\xfa\xf4\xeb\xfc", 0x1000)], 0x200000))
    start = time.monotonic()
    result = run_crosvm(str(kernel))
    assert result.returncode == 1 and "halted" in result.stderr
    assert time.monotonic() - start < 60


@pytest.mark.parametrize(
    "content", [b"", os.urandom(4096), b"\x7fELF\x01" + bytes(100), b"\x7fELF\x02\x01" + bytes(10)]
)
def test_bad_kernels_are_one_line_status_2(tmp_path: Path, content: bytes) -> None:
    kernel = tmp_path / "bad"
    kernel.write_bytes(content)
    result = run_crosvm(str(kernel), timeout=60)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_sigterm_stops_cleanly() -> None:
    with launch(GuestConfig("serial-echo"), vmm="crosvm", crosvm=CROSVM) as vm:
        vm.wait_for("READY serial-echo", TIMEOUT)
        vm.proc.send_signal(signal.SIGTERM)
        result = vm.wait(30)
    assert result.returncode == 0 and "terminating on signal" in result.stderr


# --- virtio devices -----------------------------------------------------------------------


def test_block_read_matches_host_sha256(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.img", 16 << 20, seed=1)
    result = crosvm_guest(GuestConfig("blk-read-sha256", disks=(Disk(disk, read_only=True),)))
    assert result.find("sha256")["sha256"] == sha256(disk)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("options", "bypass"), [("", True), ("cold-reads=cached", False)])
def test_cold_large_reads_bypass_the_host_page_cache(
    tmp_path: Path, options: str, bypass: bool
) -> None:
    """The guest reads its disk in 1 MiB requests; none is in the host page cache. By default
    they go through O_DIRECT in the jailed device (the cache stays empty), with
    ``cold-reads=cached`` through the cache (it ends up holding the whole image)."""
    size = 16 << 20
    disk = make_disk(tmp_path / "cold.img", size, seed=5)
    digest = sha256(disk)
    fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            if sys_util.cachestat(fd, 0, size).cached:
                pytest.skip("clean pages stay cached after POSIX_FADV_DONTNEED here")
        except OSError as err:
            pytest.skip(f"no cachestat here ({err}): cold reads keep the page cache")
        cfg = GuestConfig(
            "blk-read-sha256", disks=(Disk(disk, read_only=True, block_options=options),)
        )
        assert crosvm_guest(cfg).find("sha256")["sha256"] == digest  # type: ignore[attr-defined]
        cached = sys_util.cachestat(fd, 0, size).cached * sys_util.pagesize()
    finally:
        os.close(fd)
    if bypass:
        assert cached <= size // 8, f"{cached} bytes of the image went through the page cache"
    else:
        assert cached == size


def test_block_write_lands_in_the_host_file(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "w.img", 8 << 20)
    cfg = GuestConfig("blk-write-pattern", {"seed": 7, "bytes": 1 << 20}, disks=(Disk(disk),))
    entry = crosvm_guest(cfg).find("written")  # type: ignore[attr-defined]
    assert int(entry["written"]) == 1 << 20
    assert entry["sha256"] == sha256(disk, 1 << 20)


def test_read_only_disk_refuses_writes_and_is_unchanged(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "ro.img", 4 << 20, seed=3)
    before = sha256(disk)
    cfg = GuestConfig("blk-write-pattern", {"bytes": 65536}, disks=(Disk(disk, read_only=True),))
    result = crosvm_guest(cfg, check=False)
    assert result.status == "fail"  # type: ignore[attr-defined]
    assert sha256(disk) == before


def test_disk_order_follows_the_command_line(tmp_path: Path) -> None:
    first = make_disk(tmp_path / "a.img", 2 << 20, seed=10)
    second = make_disk(tmp_path / "b.img", 2 << 20, seed=11)
    disks = (Disk(first, read_only=True), Disk(second, read_only=True))
    for index, image in enumerate((first, second)):
        cfg = GuestConfig("blk-read-sha256", {"disk": index}, disks=disks)
        assert crosvm_guest(cfg).find("sha256")["sha256"] == sha256(image)  # type: ignore[attr-defined]


@pytest.mark.parametrize("irq", ["msix", "intx"])
def test_interrupt_modes(irq: str, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "i.img", 2 << 20)
    # The driver sleeps in hlt until an interrupt: every completion must wake it, never the
    # LAPIC timer that only bounds the naps (timer_irqs counts those rescues).
    cfg = GuestConfig("irq", {"irq": irq, "irq_wait": "hlt", "count": 50}, disks=(Disk(disk),))
    entry = crosvm_guest(cfg).find("irq_mode")  # type: ignore[attr-defined]
    assert entry["irq_mode"] == irq and entry["hlt"] == "1" and entry["ok"] == "50"
    assert int(entry["interrupts"]) > 0 and entry["timer_irqs"] == "0"


def test_rng_yields_bytes() -> None:
    entry = crosvm_guest(GuestConfig("rng-read", rng=True)).find("rng_bytes")  # type: ignore[attr-defined]
    assert int(entry["rng_bytes"]) == 65536 and int(entry["distinct"]) == 256


def test_hostile_requests_leave_crosvm_serving(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "h.img", 4 << 20, seed=5)
    result = crosvm_guest(GuestConfig("hostile", disks=(Disk(disk),)))
    cases = result.find_all("hostile")  # type: ignore[attr-defined]
    assert len(cases) >= 6
    assert all(case["survived"] == "1" for case in cases), cases
    assert result.returncode == 0  # type: ignore[attr-defined]


def test_virtio_console_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "hvc0.out"
    argv = [
        CROSVM, "run", "--disable-sandbox", "--no-rng",
        "--serial", "type=stdout,num=1,console",
        "--serial", f"type=file,path={out},num=2,hardware=virtio-console,stdin",
        "-p", "scenario=console-echo",
    ]  # fmt: skip
    from fixture import build_guest

    proc = subprocess.run(
        [*argv, str(build_guest())], input=b"hello over hvc0\nEND\n", capture_output=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert b"hello over hvc0" in out.read_bytes()


# --- the control socket -------------------------------------------------------------------


def _control(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CROSVM, *args], capture_output=True, text=True, timeout=30)


def test_stop_ends_the_vm_and_removes_the_socket(tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    argv = [CROSVM, "run", "--disable-sandbox", "-s", str(sock), "-p", "scenario=serial-echo"]
    from fixture import GuestVm, build_guest

    with GuestVm([*argv, str(build_guest())]) as vm:
        vm.wait_for("READY serial-echo", TIMEOUT)
        start = time.monotonic()
        assert _control("stop", str(sock)).returncode == 0
        result = vm.wait(10)
        assert time.monotonic() - start < 1.0
    assert result.returncode == 0 and not sock.exists()


def test_suspend_freezes_the_guest_and_resume_continues(tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    argv = [CROSVM, "run", "--disable-sandbox", "-s", str(sock), "-p", "scenario=serial-echo"]
    from fixture import GuestVm, build_guest
    from fixture.errors import GuestTimeout

    with GuestVm([*argv, str(build_guest())]) as vm:
        vm.wait_for("READY serial-echo", TIMEOUT)
        assert _control("suspend", str(sock)).returncode == 0
        vm.send_serial(b"while suspended\r\n")
        with pytest.raises(GuestTimeout):
            vm.wait_for("ECHO while suspended", 2)
        assert _control("resume", str(sock)).returncode == 0
        vm.wait_for("ECHO while suspended", 30)
        vm.send_serial(b"END\r\n")
        assert vm.wait(TIMEOUT).returncode == 0


def test_two_vms_in_one_directory_get_distinct_sockets(tmp_path: Path) -> None:
    from fixture import GuestVm, build_guest

    argv = [CROSVM, "run", "--disable-sandbox", "-s", str(tmp_path), "-p", "scenario=serial-echo",
            str(build_guest())]  # fmt: skip
    with GuestVm(argv) as first, GuestVm(argv) as second:
        first.wait_for("READY", TIMEOUT)
        second.wait_for("READY", TIMEOUT)
        names = {p.name for p in tmp_path.glob("crosvm-*.sock")}
        assert names == {f"crosvm-{first.proc.pid}.sock", f"crosvm-{second.proc.pid}.sock"}
        for name in names:
            assert _control("stop", str(tmp_path / name)).returncode == 0
        assert first.wait(10).returncode == 0 and second.wait(10).returncode == 0


def test_control_commands_against_a_missing_socket_fail_cleanly(tmp_path: Path) -> None:
    for cmd in (["stop"], ["suspend"], ["balloon", "1M"], ["disk", "resize", "0", "1M"]):
        result = _control(*cmd, str(tmp_path / "gone.sock"))
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1


def test_block_bench_with_direct_descriptors(tmp_path: Path) -> None:
    """Under load with direct descriptors the guest used to read used->idx as 0: struct.pack_into
    zeroes its target before writing, and the guest polls the ring from another CPU."""
    disk = make_disk(tmp_path / "bench.img", 64 << 20)
    params = {"bench_ms": 300, "bench": "seq-read", "no_features": 28}
    crosvm_guest(GuestConfig("blk-bench", params, disks=(Disk(disk),)))


# --- the sandbox (the default) ------------------------------------------------------------


def _jailed_device_pids(vmm_pid: int) -> list[int]:
    """Descendants of the VMM that run under a seccomp filter: the jailed device processes."""
    found, frontier = [], [vmm_pid]
    while frontier:
        parent = frontier.pop()
        for child in subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True
        ).stdout.split():
            pid = int(child)
            frontier.append(pid)
            status = Path(f"/proc/{pid}/status").read_text()
            if "Seccomp:\t2" in status:
                found.append(pid)
    return found


def test_devices_run_jailed_and_a_dead_device_ends_the_vm(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "j.img", 2 << 20)
    argv = [CROSVM, "run", "--no-rng", "--no-balloon", "-d", str(disk),
            "-p", "scenario=serial-echo"]  # fmt: skip
    from fixture import GuestVm, build_guest

    with GuestVm([*argv, str(build_guest())]) as vm:
        vm.wait_for("READY serial-echo", TIMEOUT)
        jailed = _jailed_device_pids(vm.proc.pid)
        assert len(jailed) == 1, jailed  # the block device
        status = Path(f"/proc/{jailed[0]}/status").read_text()
        assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status
        assert not Path(f"/proc/{jailed[0]}/root/etc/passwd").exists()  # empty root
        os.kill(jailed[0], signal.SIGKILL)
        result = vm.wait(30)
    assert result.returncode == 1
    assert "died" in result.stderr and "SIGKILL" in result.stderr and "block" in result.stderr


def test_disk_resize_reaches_a_jailed_block_device(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "r.img", 2 << 20)
    sock = tmp_path / "vm.sock"
    argv = [CROSVM, "run", "--no-rng", "-s", str(sock), "--rwdisk", str(disk),
            "-p", "scenario=serial-echo"]  # fmt: skip
    from fixture import GuestVm, build_guest

    with GuestVm([*argv, str(build_guest())]) as vm:
        vm.wait_for("READY serial-echo", TIMEOUT)
        assert _jailed_device_pids(vm.proc.pid)
        assert _control("disk", "resize", "0", "4M", str(sock)).returncode == 0
        assert disk.stat().st_size == 4 << 20
        assert _control("disk", "resize", "5", "4M", str(sock)).returncode == 1  # no such disk
        assert _control("stop", str(sock)).returncode == 0
        assert vm.wait(10).returncode == 0


def test_hugepages_guest_reads_its_disk_sandboxed(tmp_path: Path) -> None:
    """``--hugepages`` (MADV_HUGEPAGE on guest memory, inherited by the jailed block device):
    the guest still reads its disk intact; a host that gives shmem no THP gets a warning."""
    from sys_util import shmem_hugepages_enabled

    disk = make_disk(tmp_path / "h.img", 4 << 20, seed=3)
    result = subprocess.run(
        [CROSVM, "run", "--hugepages", "--no-rng", "--no-balloon", "-d", str(disk),
         "-p", "scenario=blk-read-sha256", str(__import__("fixture").build_guest())],
        capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"sha256={sha256(disk)}" in result.stdout
    assert ("4 KiB pages" in result.stderr) is not shmem_hugepages_enabled(), result.stderr


def test_block_read_without_the_sandbox(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "n.img", 4 << 20, seed=2)
    result = run_crosvm("--no-rng", "-d", str(disk), "-p", "scenario=blk-read-sha256",
                        str(__import__("fixture").build_guest()))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"sha256={sha256(disk)}" in result.stdout


@pytest.mark.qemu
def test_qcow2_disk_is_detected_and_reads_like_its_raw_source(tmp_path: Path) -> None:
    raw = make_disk(tmp_path / "src.img", 8 << 20, seed=9)
    image = tmp_path / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True
    )
    result = crosvm_guest(GuestConfig("blk-read-sha256", disks=(Disk(image, read_only=True),)))
    entry = result.find("sha256")  # type: ignore[attr-defined]
    assert entry["sha256"] == sha256(raw) and int(entry["bytes"]) == 8 << 20


@pytest.mark.qemu
def test_guest_writes_to_a_qcow2_disk_pass_qemu_img_check(tmp_path: Path) -> None:
    image = tmp_path / "w.qcow2"
    assert run_crosvm_cmd("create_qcow2", str(image), "8M").returncode == 0
    cfg = GuestConfig("blk-write-pattern", {"seed": 3, "bytes": 2 << 20}, disks=(Disk(image),))
    entry = crosvm_guest(cfg).find("written")  # type: ignore[attr-defined]
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    raw = tmp_path / "w.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    assert entry["sha256"] == sha256(raw, 2 << 20)


def run_crosvm_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CROSVM, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("irq", ["msix", "intx"])
def test_disk_resize_reaches_the_guest_with_a_config_interrupt(tmp_path: Path, irq: str) -> None:
    disk = make_disk(tmp_path / "g.img", 2 << 20)
    sock = tmp_path / "vm.sock"
    argv = [CROSVM, "run", "--no-rng", "-s", str(sock), "--rwdisk", str(disk),
            "-p", f"scenario=blk-resize irq={irq}"]  # fmt: skip
    from fixture import GuestVm, build_guest

    with GuestVm([*argv, str(build_guest())]) as vm:
        vm.wait_for("READY blk-resize capacity=4096", TIMEOUT)
        assert _control("disk", "resize", "0", "4M", str(sock)).returncode == 0
        result = vm.wait(TIMEOUT)
    assert result.returncode == 0 and result.status == "ok", result.stderr
    entry = result.find("resized")
    assert (entry["old"], entry["new"], entry["read_last"]) == ("4096", "8192", "0")
    assert int(entry["config_irqs"]) >= 1
