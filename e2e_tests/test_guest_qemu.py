"""The native-speed test guest under QEMU + KVM: every non-hostile scenario, plus the hostile
ones as a check of the guest itself (QEMU is the reference behaviour, not the subject)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from fixture import (
    Disk,
    GuestConfig,
    GuestResult,
    GuestVm,
    HostProfile,
    build_guest,
    crosvm_command,
    launch,
    parse_results,
    qemu_command,
    run_guest,
)
from fixture.errors import GuestTimeout, Unsupported

F = TypeVar("F", bound=Callable[..., object])


def vm(test: F) -> F:
    """Marks a test that boots the guest under QEMU with KVM."""
    marked: F = pytest.mark.qemu(pytest.mark.kvm(test))
    return marked


def _run(cfg: GuestConfig, prof: HostProfile, timeout: float = 30.0) -> GuestResult:
    return run_guest(cfg, vmm="qemu", timeout=prof.scale(timeout))


def _image(path: Path, size: int, seed: int = 0) -> Path:
    """A raw image of pseudo-random content (deterministic per seed)."""
    data = bytearray()
    block = hashlib.sha256(f"seed{seed}".encode()).digest()
    while len(data) < size:
        block = hashlib.sha256(block).digest()
        data += block * 128
    path.write_bytes(bytes(data[:size]))
    return path


@vm
def test_hello(host_profile: HostProfile) -> None:
    res = _run(GuestConfig("hello"), host_profile)
    hello = res.find("hello")
    assert hello["cpl"] == "3"
    assert res.find("boot")["boot"] == "pvh"
    assert res.returncode == 0  # -no-reboot: the i8042 reset ends QEMU cleanly


@vm
def test_unknown_scenario_fails(host_profile: HostProfile) -> None:
    res = run_guest(GuestConfig("no-such-thing"), timeout=host_profile.scale(30), check=False)
    assert res.status == "fail"
    assert "unknown-scenario" in res.find("status")["reason"]


@vm
def test_cpuid(host_profile: HostProfile) -> None:
    c = _run(GuestConfig("cpuid"), host_profile).find("cpuid_vendor")
    assert c["cpuid_vendor"] in ("GenuineIntel", "AuthenticAMD")
    assert c["hypervisor"].startswith("KVMKVMKVM")
    assert int(c["leaf1_edx"], 16) & (1 << 4)  # TSC


@vm
def test_rtc_matches_host_clock(host_profile: HostProfile) -> None:
    before = time.time()
    rtc = int(_run(GuestConfig("rtc"), host_profile).find("rtc_epoch")["rtc_epoch"])
    after = time.time()
    assert before - 3 <= rtc <= after + 3


@vm
def test_speed_probe(host_profile: HostProfile) -> None:
    s = _run(GuestConfig("speed"), host_profile).find("speed")
    assert int(s["cpl3_ips"]) > int(s["cpl0_ips"]) > 0
    # the cached session profile and this run agree on the kind of host
    emulating = int(s["cpl0_ips"]) < 50_000_000
    assert emulating == host_profile.emulating


@vm
def test_serial_echo(host_profile: HostProfile) -> None:
    with launch(GuestConfig("serial-echo")) as vm:
        vm.wait_for("READY serial-echo", host_profile.scale(30))
        vm.send_serial(b"first line\nsecond\nEND\n")
        res = vm.wait(host_profile.scale(30)).check()
    assert "ECHO first line" in res.output and "ECHO second" in res.output
    assert res.find("serial_lines")["serial_lines"] == "2"


@vm
def test_pci_list(host_profile: HostProfile, tmp_path: Path) -> None:
    img = _image(tmp_path / "d.img", 1 << 20)
    res = _run(GuestConfig("pci-list", disks=(Disk(img),), rng=True), host_profile)
    devs = {(e["vendor"], e["device"]) for e in res.find_all("pci")}
    assert ("0x1af4", "0x1042") in devs  # virtio-blk (modern only)
    assert ("0x1af4", "0x1044") in devs  # virtio-rng
    assert ("0x8086", "0x29c0") in devs  # q35 host bridge
    blk = next(e for e in res.find_all("pci") if e["device"] == "0x1042")
    assert any(k.startswith("bar") for k in blk)


@vm
@pytest.mark.parametrize("irq", ["poll", "msix", "intx"])
def test_blk_read_sha256(host_profile: HostProfile, tmp_path: Path, irq: str) -> None:
    img = _image(tmp_path / "d.img", 3 * (1 << 20) + 4096, seed=7)
    cfg = GuestConfig("blk-read-sha256", {"irq": irq}, disks=(Disk(img, read_only=True),))
    res = _run(cfg, host_profile)
    r = res.find("sha256")
    assert r["sha256"] == hashlib.sha256(img.read_bytes()).hexdigest()
    assert int(r["bytes"]) == img.stat().st_size


@vm
@pytest.mark.parametrize("wait", ["spin", "hlt"])
@pytest.mark.parametrize("irq", ["msix", "intx"])
def test_interrupts_delivered(
    host_profile: HostProfile, tmp_path: Path, irq: str, wait: str
) -> None:
    """Real interrupts through the CPL0 handler; with irq_wait=hlt the driver sleeps in `hlt`
    between them, so every completion must have woken it (the LAPIC timer only bounds naps)."""
    img = _image(tmp_path / "d.img", 1 << 20)
    cfg = GuestConfig("irq", {"irq": irq, "irq_wait": wait, "count": 50}, disks=(Disk(img),))
    r = _run(cfg, host_profile).find("irq_mode")
    assert r["irq_mode"] == irq and r["hlt"] == ("1" if wait == "hlt" else "0")
    assert r["ok"] == r["requests"] == "50"
    # EVENT_IDX lets the device skip an interrupt for a completion the driver already saw, so a
    # spinning driver may see few; a driver sleeping in hlt must be woken by most completions.
    assert int(r["interrupts"]) >= (25 if irq == "msix" and wait == "hlt" else 1)


@vm
def test_blk_write_pattern(host_profile: HostProfile, tmp_path: Path) -> None:
    img = tmp_path / "w.img"
    img.write_bytes(b"\0" * (2 << 20))
    res = _run(GuestConfig("blk-write-pattern", {"seed": 5}, disks=(Disk(img),)), host_profile)
    r = res.find("written")
    assert r["readback"] == "1"
    assert int(r["written"]) == 2 << 20
    assert r["sha256"] == hashlib.sha256(img.read_bytes()).hexdigest()
    assert img.read_bytes() != b"\0" * (2 << 20)


@vm
def test_blk_read_only_disk_refuses_write(host_profile: HostProfile, tmp_path: Path) -> None:
    img = _image(tmp_path / "ro.img", 1 << 20)
    before = img.read_bytes()
    cfg = GuestConfig("blk-write-pattern", disks=(Disk(img, read_only=True),))
    res = run_guest(cfg, timeout=host_profile.scale(30), check=False)
    assert res.status == "fail"
    assert img.read_bytes() == before


@vm
def test_blk_bench_short(host_profile: HostProfile, tmp_path: Path) -> None:
    img = tmp_path / "b.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    cfg = GuestConfig("blk-bench", {"bench_ms": 100}, mem_mib=256, disks=(Disk(img),))
    res = _run(cfg, host_profile, timeout=60)
    rows = res.find_all("bench")
    assert {(r["bench"], r["qd"]) for r in rows} == {
        (name, qd)
        for name in ("seq-read", "seq-write", "rand-read", "rand-write")
        for qd in ("1", "32")
    }
    for r in rows:
        assert r["errors"] == "0" and int(r["ops"]) > 0


@vm
def test_rng_read(host_profile: HostProfile) -> None:
    r = _run(GuestConfig("rng-read", {"bytes": 32768}, rng=True), host_profile).find("rng_bytes")
    assert r["rng_bytes"] == "32768"
    assert int(r["distinct"]) == 256
    assert 450 <= int(r["ones_permille"]) <= 550


@vm
def test_console_echo(host_profile: HostProfile) -> None:
    cfg = GuestConfig("console-echo", console_socket=Path("con.sock"))
    message = b"".join(b"line %d of the virtio console test\n" % i for i in range(200)) + b"END\n"
    with launch(cfg) as vm:
        vm.wait_for("READY console-echo", host_profile.scale(30))
        assert vm.config is not None and vm.config.console_socket is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(host_profile.scale(20))
            s.connect(os.fspath(vm.config.console_socket))
            s.sendall(message)
            got = b""
            while len(got) < len(message):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        res = vm.wait(host_profile.scale(30)).check()
    assert got == message
    assert res.find("console_rx")["console_rx"] == str(len(message))


HOSTILE_CASES = [
    "desc-oob", "len-overflow", "chain-loop", "chain-10k", "wo-header", "ro-status", "bad-head",
    "avail-overrun", "nested-indirect", "indirect-odd-len", "queue-mmio",
]  # fmt: skip


@vm
@pytest.mark.parametrize("case", HOSTILE_CASES)
def test_hostile_cases_run(host_profile: HostProfile, tmp_path: Path, case: str) -> None:
    """The guest's hostile requests are well-formed enough that QEMU (the reference) flags or
    completes each one and still serves a valid request afterwards."""
    img = _image(tmp_path / "h.img", 1 << 20)
    res = _run(GuestConfig("hostile", {"case": case}, disks=(Disk(img),)), host_profile)
    r = res.find("hostile")
    assert r["hostile"] == case
    assert r["survived"] == "1"


@vm
def test_net_echo(host_profile: HostProfile) -> None:
    """virtio-net over QEMU's unix-datagram backend: frames never touch any network."""
    cfg = GuestConfig("net-echo", net_dgram=(Path("vmm.sock"), Path("test.sock")))
    me, guest = bytes.fromhex("020000000001"), bytes.fromhex("525400123456")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, launch(cfg) as vm:
        assert vm.config is not None and vm.config.net_dgram is not None
        vmm_sock, test_sock = vm.config.net_dgram
        s.bind(os.fspath(test_sock))
        s.settimeout(host_profile.scale(10))
        m = vm.wait_for(r"READY net-echo mac=(\S+)", host_profile.scale(30))
        assert m.group(1) == "52:54:00:12:34:56"
        echoed = 0
        for i in range(64):
            frame = guest + me + b"\x88\xb5" + b"frame %d " % i + bytes(i * 20)
            s.sendto(frame, os.fspath(vmm_sock))
            reply = s.recv(4096)
            assert reply[:6] == me and reply[6:12] == guest and reply[12:] == frame[12:]
            echoed += 1
        s.sendto(guest + me + b"\x88\xb5END" + bytes(50), os.fspath(vmm_sock))
        s.recv(4096)
        res = vm.wait(host_profile.scale(30)).check()
    r = res.find("net_rx")
    assert echoed == 64
    assert r["net_rx"] == "65" and r["net_tx"] == "65" and r["bad"] == "0"


@vm
def test_balloon_self(host_profile: HostProfile) -> None:
    cfg = GuestConfig("balloon", {"pages": 512}, balloon=True)
    r = _run(cfg, host_profile).find("balloon_pages")
    assert r["actual_inflated"] == "512" and r["actual_after"] == "0"


def _qmp(sock: socket.socket, command: str, **arguments: object) -> dict[str, object]:
    msg: dict[str, object] = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    sock.sendall(json.dumps(msg).encode() + b"\n")
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("QMP closed")
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            reply = json.loads(line)
            if "return" in reply or "error" in reply:
                return dict(reply)


@vm
def test_balloon_host_target(host_profile: HostProfile) -> None:
    """The host sets a balloon target over QMP; the guest inflates to it and deflates after."""
    mem = 256
    cfg = GuestConfig(
        "balloon", {"mode": "host"}, mem_mib=mem, balloon=True, qmp_socket=Path("qmp.sock")
    )
    with launch(cfg) as vm:
        vm.wait_for("READY balloon", host_profile.scale(30))
        assert vm.config is not None and vm.config.qmp_socket is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as q:
            q.settimeout(host_profile.scale(10))
            q.connect(os.fspath(vm.config.qmp_socket))
            q.recv(65536)  # greeting
            assert "return" in _qmp(q, "qmp_capabilities")
            assert "return" in _qmp(q, "balloon", value=(mem - 8) << 20)  # take 8 MiB
            vm.wait_for("RESULT balloon_inflated=2048", host_profile.scale(10))
            deadline = time.monotonic() + host_profile.scale(10)
            actual = 0
            while time.monotonic() < deadline:
                ret = _qmp(q, "query-balloon")["return"]
                assert isinstance(ret, dict)
                actual = int(ret["actual"])
                if actual == (mem - 8) << 20:
                    break
                time.sleep(0.05)
            assert actual == (mem - 8) << 20
            assert "return" in _qmp(q, "balloon", value=mem << 20)
            res = vm.wait(host_profile.scale(30)).check()
    assert res.find("balloon_deflated")["balloon_deflated"] == "2048"


@vm
def test_hostile_all_cases_in_one_boot(host_profile: HostProfile, tmp_path: Path) -> None:
    img = _image(tmp_path / "h.img", 1 << 20)
    res = _run(GuestConfig("hostile", disks=(Disk(img),)), host_profile, timeout=60)
    rows = res.find_all("hostile")
    assert [r["hostile"] for r in rows] == HOSTILE_CASES
    assert all(r["survived"] == "1" for r in rows)


@vm
def test_net_bench_frames_arrive(host_profile: HostProfile) -> None:
    """Guest transmit path at speed; the test drains its socket while the guest sends (a unix
    datagram receiver that falls behind makes QEMU hold the tx queue, by design)."""
    cfg = GuestConfig(
        "net-bench", {"frames": 2000, "size": 1000}, net_dgram=(Path("v.sock"), Path("t.sock"))
    )
    seqs: set[int] = set()
    bad: list[bytes] = []
    stop = threading.Event()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)

        def drain() -> None:
            while not stop.is_set():
                try:
                    frame = s.recv(4096)
                except TimeoutError:
                    continue
                if len(frame) == 1000 and frame[12:14] == b"\x88\xb5":
                    seqs.add(int.from_bytes(frame[14:22], "little"))
                else:
                    bad.append(frame[:32])

        with launch(cfg) as vm:
            assert vm.config is not None and vm.config.net_dgram is not None
            s.bind(os.fspath(vm.config.net_dgram[1]))
            reader = threading.Thread(target=drain, daemon=True)
            reader.start()
            try:
                res = vm.wait(host_profile.scale(60)).check()
                deadline = time.monotonic() + 2
                while len(seqs) < 2000 and time.monotonic() < deadline:
                    time.sleep(0.05)
            finally:
                stop.set()
                reader.join()
    r = res.find("net_bench_frames")
    assert r["net_bench_frames"] == "2000" and int(r["pps"]) > 0
    assert not bad
    # frames sent before the test's socket was bound are lost; the rest arrive, once each
    assert len(seqs) > 1000 and seqs <= set(range(2000))


@vm
def test_vsock_echo(host_profile: HostProfile) -> None:
    if not os.path.exists("/dev/vhost-vsock"):
        pytest.skip("QEMU's virtio-vsock is vhost-vsock only and this host has no /dev/vhost-vsock")
    cid = 3 + os.getpid() % 100000  # unique per worker
    message = b"vsock " * 1000 + b"END\n"
    with launch(GuestConfig("vsock-echo", {"port": 5000}, vsock_cid=cid)) as vm:
        vm.wait_for("READY vsock-echo", host_profile.scale(30))
        with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as s:
            s.settimeout(host_profile.scale(10))
            s.connect((cid, 5000))
            s.sendall(message)
            got = b""
            while len(got) < len(message):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        res = vm.wait(host_profile.scale(30)).check()
    assert got == message
    assert res.find("vsock_rx")["vsock_rx"] == str(len(message))


@vm
@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_smp_all_vcpus_report(host_profile: HostProfile, cpus: int) -> None:
    res = _run(GuestConfig("smp", {"cpus": cpus}, cpus=cpus), host_profile)
    assert res.find("cpus_online")["cpus_online"] == str(cpus)
    rows = res.find_all("cpu")
    assert sorted(int(r["cpu"]) for r in rows) == list(range(cpus))
    assert len({r["apic_id"] for r in rows}) == cpus
    assert all(r["cpl"] == "3" for r in rows)


@pytest.mark.kvm
def test_linux64_entry_with_pycrosvm_arch(guest_elf: Path) -> None:
    """The other entry point: the Linux 64-bit boot protocol (long mode, rsi = zero page), as
    crosvm uses it. QEMU cannot enter an ELF that way, so pycrosvm's own ``arch.build_vm``
    (zero page, e820, GDT, page tables) with a minimal run loop plays the VMM here."""
    select = pytest.importorskip("select")
    build = pytest.importorskip("arch.x86_64.build")
    serial_mod = pytest.importorskip("devices.serial")
    kvm = pytest.importorskip("kvm")
    sys_util = pytest.importorskip("sys_util")

    out = bytearray()

    class Sink:
        def write(self, data: bytes, /) -> int:
            out.extend(data)
            return len(data)

    evt = sys_util.EventFd()
    port = serial_mod.ComPort(
        1, 0x3F8, 4, serial_mod.SerialParameters(serial_mod.SerialType.SINK),
        serial_mod.Serial(evt, Sink(), label="COM1"), evt, None, [evt],
    )  # fmt: skip
    try:
        cfg = build.VmConfig(
            memory_size=64 << 20,
            kernel=guest_elf.read_bytes(),
            cmdline="console=ttyS0 reboot=k scenario=rtc",
            com_ports=[port],
        )
        with build.build_vm(cfg) as rvm:
            vcpu = rvm.vcpus[0]
            for _ in range(100_000):
                e = vcpu.run()
                if isinstance(e, kvm.IoOut):
                    rvm.io_bus.write(e.port, e.data)
                elif isinstance(e, kvm.IoIn):
                    vcpu.set_io_in_data(rvm.io_bus.read(e.port, e.size))
                elif isinstance(e, kvm.MmioWrite):
                    rvm.mmio_bus.write(e.addr, e.data)
                elif isinstance(e, kvm.MmioRead):
                    vcpu.set_mmio_read_data(rvm.mmio_bus.read(e.addr, e.size))
                else:
                    raise AssertionError(f"unexpected exit {e!r}: {out.decode(errors='replace')}")
                if select.select([rvm.exit_evt], [], [], 0)[0]:
                    break
        port.serial.flush()
    finally:
        port.close()
    res = GuestResult(argv=[], output=out.decode(errors="replace"), stderr="", returncode=0,
                      seconds=0.0).check()  # fmt: skip
    assert res.find("boot")["boot"] == "linux64"
    assert 60 <= int(res.find("boot")["mem_mib"]) <= 64  # from the e820 map in the zero page
    assert abs(int(res.find("rtc_epoch")["rtc_epoch"]) - time.time()) < 5


# ---- the fixture itself (no VM needed) ------------------------------------------------------


def test_parse_results_lines_and_values() -> None:
    text = "noise\r\nRESULT a=1 b=x=y flag\nGUEST x=1\n  RESULT not-at-start=1\nRESULT status=ok\n"
    assert parse_results(text) == [{"a": "1", "b": "x=y", "flag": ""}, {"status": "ok"}]
    res = GuestResult(argv=[], output=text, stderr="", returncode=0, seconds=0.0)
    assert res.status == "ok" and res.find("a")["b"] == "x=y"
    with pytest.raises(KeyError):
        res.find("missing")


def test_guest_result_check_raises_on_fail() -> None:
    res = GuestResult([], "RESULT status=fail reason=boom\n", "", 0, 0.0)
    with pytest.raises(Exception, match="boom"):
        res.check()
    with pytest.raises(Exception, match="status=None"):
        GuestResult([], "no result lines", "", 1, 0.0).check()


def test_cmdline_words_validated() -> None:
    assert GuestConfig("x", {"a": 1, "b": "c"}).cmdline() == "scenario=x a=1 b=c"
    for bad in ({"a b": 1}, {"a": "b c"}, {"": 1}, {"a=b": 1}):
        with pytest.raises(ValueError):
            GuestConfig("x", bad).cmdline()


def test_vmm_command_lines_match(tmp_path: Path) -> None:
    kernel = tmp_path / "guest.elf"
    cfg = GuestConfig(
        "blk-read-sha256", {"irq": "msix"}, mem_mib=512, cpus=2, rng=True,
        disks=(Disk(tmp_path / "a.img", read_only=True), Disk(tmp_path / "b.img")),
    )  # fmt: skip
    q = qemu_command(kernel, cfg, qemu="qemu-system-x86_64")
    assert q[q.index("-append") + 1] == "scenario=blk-read-sha256 irq=msix"
    assert q[q.index("-m") + 1] == "512" and q[q.index("-smp") + 1] == "2"
    assert "-no-reboot" in q and q[q.index("-serial") + 1] == "stdio"
    drives = [q[i + 1] for i, a in enumerate(q) if a == "-drive"]
    assert drives[0].endswith(",readonly=on") and "cache=none,aio=threads" in drives[1]
    assert "virtio-rng-pci,disable-legacy=on" in q
    c = crosvm_command(kernel, cfg)
    assert c[:2] == ["crosvm", "run"] and c[-1] == str(kernel)
    assert c[c.index("-p") + 1] == "scenario=blk-read-sha256 irq=msix"
    assert c[c.index("-m") + 1] == "512" and c[c.index("-c") + 1] == "2"
    assert c[c.index("-d") + 1] == str(tmp_path / "a.img")
    assert c[c.index("--rwdisk") + 1] == str(tmp_path / "b.img")
    assert "--no-balloon" in c and "--no-rng" not in c
    with pytest.raises(Unsupported):
        crosvm_command(kernel, GuestConfig("x", console_socket=tmp_path / "c"))


def test_build_is_cached_by_source_hash(tmp_path: Path) -> None:
    if not shutil.which("gcc") or not shutil.which("ld"):
        pytest.skip("needs gcc and ld")
    first = build_guest(cache_dir=tmp_path)
    mtime = first.stat().st_mtime_ns
    assert build_guest(cache_dir=tmp_path) == first and first.stat().st_mtime_ns == mtime
    data = first.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # ELF64
    assert b"Xen\0" in data  # the PVH note
    assert [p.name for p in (tmp_path / "guest").iterdir() if not p.name.startswith(".")] == [
        first.parent.name
    ]


def test_guest_vm_kills_and_cleans_up_on_timeout() -> None:
    with GuestVm(["sleep", "60"]) as proc:
        workdir = proc.workdir
        with pytest.raises(GuestTimeout):
            proc.wait(0.2)
        with pytest.raises(GuestTimeout):
            proc.wait_for("never", 0.1)
    assert proc.closed and proc.proc.returncode is not None
    assert not workdir.exists()
    proc.close()  # idempotent
