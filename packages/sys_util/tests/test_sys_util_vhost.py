"""sys_util's vhost binding: request numbers and layouts against <linux/vhost.h> (compiled C),
the bytes each call hands the kernel, errors, the fd protocol, and (only where the nodes
exist) real vhost-net / vhost-vsock devices."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import pickle
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sys_util import EventFd, GuestMemory, Vhost, VhostError, VhostNet, VhostVsock
from sys_util import _vhost as vh

HEADER = Path("/usr/include/linux/vhost.h")
HAVE_NET = os.path.exists(vh.VHOST_NET_PATH)
HAVE_VSOCK = os.path.exists(vh.VHOST_VSOCK_PATH)

IOCTLS = [
    "VHOST_GET_FEATURES",
    "VHOST_SET_FEATURES",
    "VHOST_SET_OWNER",
    "VHOST_RESET_OWNER",
    "VHOST_SET_MEM_TABLE",
    "VHOST_SET_VRING_NUM",
    "VHOST_SET_VRING_ADDR",
    "VHOST_SET_VRING_BASE",
    "VHOST_GET_VRING_BASE",
    "VHOST_SET_VRING_KICK",
    "VHOST_SET_VRING_CALL",
    "VHOST_SET_VRING_ERR",
    "VHOST_NET_SET_BACKEND",
    "VHOST_VSOCK_SET_GUEST_CID",
    "VHOST_VSOCK_SET_RUNNING",
]
FIELDS = {
    "vhost_vring_state": ["index", "num"],
    "vhost_vring_file": ["index", "fd"],
    "vhost_vring_addr": [
        "index", "flags", "desc_user_addr", "used_user_addr", "avail_user_addr", "log_guest_addr",
    ],
    "vhost_memory": ["nregions", "padding", "regions"],
    "vhost_memory_region": ["guest_phys_addr", "memory_size", "userspace_addr", "flags_padding"],
}  # fmt: skip
OURS = {
    "vhost_vring_state": vh.VRING_STATE,
    "vhost_vring_file": vh.VRING_FILE,
    "vhost_vring_addr": vh.VRING_ADDR,
    "vhost_memory": vh.MEMORY,
    "vhost_memory_region": vh.MEMORY_REGION,
}


def _offsets(fmt: str) -> list[int]:
    """Field offsets of a native-order, unpadded struct format like ``=IIQQ``."""
    sizes = {"I": 4, "i": 4, "Q": 8}
    out, pos = [], 0
    for code in fmt.lstrip("="):
        out.append(pos)
        pos += sizes[code]
    return out


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    gcc = shutil.which("gcc")
    if gcc is None or not HEADER.exists():
        pytest.skip("gcc or <linux/vhost.h> (linux-libc-dev) missing")
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <linux/vhost.h>",
             "int main(void) {"]  # fmt: skip
    for name in IOCTLS:
        lines.append(f'printf("{name} %lu\\n", (unsigned long){name});')
    for struct_name, fields in FIELDS.items():
        lines.append(f'printf("sizeof {struct_name} %zu\\n", sizeof(struct {struct_name}));')
        for f in fields:
            lines.append(
                f'printf("offsetof {struct_name}.{f} %zu\\n", offsetof(struct {struct_name}, {f}));'
            )
    lines += ["return 0; }"]
    tmp = tmp_path_factory.mktemp("vhost_c")
    src, exe = tmp / "v.c", tmp / "v"
    src.write_text("\n".join(lines))
    subprocess.run([gcc, "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.rsplit(" ", 1) for line in out.splitlines())}


@pytest.mark.parametrize("name", IOCTLS)
def test_request_numbers_match_the_kernel_header(c_values: dict[str, int], name: str) -> None:
    assert getattr(vh, name) == c_values[name], f"{name}: {getattr(vh, name):#x}"


@pytest.mark.parametrize("struct_name", sorted(FIELDS))
def test_struct_layouts_match_the_kernel_header(c_values: dict[str, int], struct_name: str) -> None:
    ours = OURS[struct_name]
    assert ours.size == c_values[f"sizeof {struct_name}"]
    offsets = _offsets(ours.format)
    for i, field in enumerate(FIELDS[struct_name]):
        c_off = c_values[f"offsetof {struct_name}.{field}"]
        if field == "regions":  # the flexible array starts right after the header
            assert c_off == ours.size
        else:
            assert offsets[i] == c_off, (struct_name, field)


def test_ioc_encoding_and_range() -> None:
    assert vh.ioc(0, 0xAF, 1, 0) == 0xAF01
    assert vh.ioc(2, 0xAF, 0, 8) == 0x8008AF00
    with pytest.raises(ValueError):
        vh.ioc(1, 0xAF, 256, 0)
    with pytest.raises(ValueError):
        vh.ioc(1, 0xAF, 0, 1 << 14)


# -- what each call hands the kernel (fcntl.ioctl intercepted) ---------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, Any]] = []
        self.reply: dict[int, bytes] = {}

    def __call__(self, fd: int, request: int, arg: Any = 0, *rest: Any) -> int:
        self.calls.append((fd, request, bytes(arg) if isinstance(arg, bytearray) else arg))
        if request in self.reply and isinstance(arg, bytearray):
            arg[:] = self.reply[request]
        return 0


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> tuple[_Recorder, VhostNet]:
    rec = _Recorder()
    monkeypatch.setattr(fcntl, "ioctl", rec)
    fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    dev = VhostNet.from_fd(fd)
    yield rec, dev
    dev.close()


def test_each_call_passes_the_kernel_struct(recorded: tuple[_Recorder, VhostNet]) -> None:
    rec, dev = recorded
    fd = dev.fileno()
    with EventFd() as evt:
        dev.set_owner()
        dev.set_features(1 << 32 | 1 << 29)
        dev.set_vring_num(1, 256)
        dev.set_vring_addr(1, 0x7F00_0000_1000, 0x7F00_0000_3000, 0x7F00_0000_2000)
        dev.set_vring_base(1, 7)
        dev.set_vring_kick(1, evt)
        dev.set_vring_call(0, evt.fileno())
        dev.set_vring_err(0, None)
        dev.set_backend(1, -1)
        dev.set_mem_table([(0, 0x10_0000, 0x7F00_0000_0000), (1 << 32, 0x1000, 0x7F10_0000_0000)])
        expect = [
            (fd, vh.VHOST_SET_OWNER, 0),
            (fd, vh.VHOST_SET_FEATURES, (1 << 32 | 1 << 29).to_bytes(8, "little")),
            (fd, vh.VHOST_SET_VRING_NUM, vh.VRING_STATE.pack(1, 256)),
            (fd, vh.VHOST_SET_VRING_ADDR, vh.VRING_ADDR.pack(
                1, 0, 0x7F00_0000_1000, 0x7F00_0000_3000, 0x7F00_0000_2000, 0)),
            (fd, vh.VHOST_SET_VRING_BASE, vh.VRING_STATE.pack(1, 7)),
            (fd, vh.VHOST_SET_VRING_KICK, vh.VRING_FILE.pack(1, evt.fileno())),
            (fd, vh.VHOST_SET_VRING_CALL, vh.VRING_FILE.pack(0, evt.fileno())),
            (fd, vh.VHOST_SET_VRING_ERR, vh.VRING_FILE.pack(0, -1)),
            (fd, vh.VHOST_NET_SET_BACKEND, vh.VRING_FILE.pack(1, -1)),
        ]  # fmt: skip
    assert rec.calls[:-1] == expect
    _, request, table = rec.calls[-1]
    assert request == vh.VHOST_SET_MEM_TABLE
    assert table[:8] == (2).to_bytes(4, "little") + bytes(4)
    assert table[8:40] == vh.MEMORY_REGION.pack(0, 0x10_0000, 0x7F00_0000_0000, 0)
    assert table[40:72] == vh.MEMORY_REGION.pack(1 << 32, 0x1000, 0x7F10_0000_0000, 0)
    assert len(table) == 72


def test_results_are_read_back(recorded: tuple[_Recorder, VhostNet]) -> None:
    rec, dev = recorded
    rec.reply[vh.VHOST_GET_FEATURES] = (0x1_3000_8000).to_bytes(8, "little")
    rec.reply[vh.VHOST_GET_VRING_BASE] = vh.VRING_STATE.pack(1, 1234)
    assert dev.get_features() == 0x1_3000_8000
    assert dev.get_vring_base(1) == 1234
    assert rec.calls[-1][2] == vh.VRING_STATE.pack(1, 0)  # the index goes in


def test_vsock_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _Recorder()
    monkeypatch.setattr(fcntl, "ioctl", rec)
    with VhostVsock.from_fd(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)) as dev:
        dev.set_guest_cid(42)
        dev.set_running(True)
        dev.set_running(False)
        fd = dev.fileno()
    assert rec.calls == [
        (fd, vh.VHOST_VSOCK_SET_GUEST_CID, (42).to_bytes(8, "little")),
        (fd, vh.VHOST_VSOCK_SET_RUNNING, (1).to_bytes(4, "little")),
        (fd, vh.VHOST_VSOCK_SET_RUNNING, (0).to_bytes(4, "little")),
    ]


def test_bad_arguments_never_reach_the_kernel(recorded: tuple[_Recorder, VhostNet]) -> None:
    rec, dev = recorded
    for call in (
        lambda: dev.set_vring_num(-1, 256),
        lambda: dev.set_vring_num(0, 1 << 32),
        lambda: dev.set_vring_addr(0, -1, 0, 0),
        lambda: dev.set_features(1 << 64),
        lambda: dev.set_mem_table([]),
        lambda: dev.set_mem_table([(0, 0, 0x1000)]),
        lambda: dev.set_mem_table([((1 << 64) - 0x1000, 0x2000, 0)]),
        lambda: dev.set_vring_kick(0, -5),
    ):
        with pytest.raises(VhostError):
            call()
    assert rec.calls == []


# -- real kernel calls on a file that is not a vhost device -------------------------------------


def test_errors_name_the_ioctl_and_errno() -> None:
    with VhostNet.from_fd(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)) as dev:
        calls = {
            "VHOST_SET_OWNER": dev.set_owner,
            "VHOST_RESET_OWNER": dev.reset_owner,
            "VHOST_GET_FEATURES": dev.get_features,
            "VHOST_SET_FEATURES": lambda: dev.set_features(0),
            "VHOST_SET_MEM_TABLE": lambda: dev.set_mem_table([(0, 4096, 0x10000)]),
            "VHOST_SET_VRING_NUM": lambda: dev.set_vring_num(0, 256),
            "VHOST_SET_VRING_ADDR": lambda: dev.set_vring_addr(0, 0, 0, 0),
            "VHOST_SET_VRING_BASE": lambda: dev.set_vring_base(0, 0),
            "VHOST_GET_VRING_BASE": lambda: dev.get_vring_base(0),
            "VHOST_SET_VRING_KICK": lambda: dev.set_vring_kick(0, None),
            "VHOST_SET_VRING_CALL": lambda: dev.set_vring_call(0, None),
            "VHOST_SET_VRING_ERR": lambda: dev.set_vring_err(0, None),
            "VHOST_NET_SET_BACKEND": lambda: dev.set_backend(0, None),
        }
        for name, call in calls.items():
            with pytest.raises(VhostError) as info:
                call()
            assert info.value.request == name
            assert info.value.errno == errno.ENOTTY
            assert name in str(info.value)
    with VhostVsock.from_fd(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)) as vs:
        for name, call in (
            ("VHOST_VSOCK_SET_GUEST_CID", lambda: vs.set_guest_cid(3)),
            ("VHOST_VSOCK_SET_RUNNING", lambda: vs.set_running(True)),
        ):
            with pytest.raises(VhostError, match=name):
                call()


def test_error_pickles() -> None:
    err = VhostError("VHOST_SET_OWNER", errno.EBUSY)
    back = pickle.loads(pickle.dumps(err))
    assert (back.request, back.errno, str(back)) == ("VHOST_SET_OWNER", errno.EBUSY, str(err))
    missing = VhostError("open", errno.ENOENT, "gone", path="/x")
    assert pickle.loads(pickle.dumps(missing)).path == "/x"


def test_missing_node_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "vhost-net"
    with pytest.raises(VhostError) as info:
        VhostNet.open(path)
    assert info.value.errno == errno.ENOENT
    assert str(info.value).endswith(f"vhost-net not available on this host ({path} missing)")
    with pytest.raises(VhostError, match="vhost-vsock not available"):
        VhostVsock.open(tmp_path / "vhost-vsock")
    with pytest.raises(VhostError, match=r"Permission denied|Is a directory"):
        VhostNet.open(tmp_path)


def test_fd_protocol() -> None:
    dev = Vhost.open("/dev/null")
    fd = dev.fileno()
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert not dev.closed
    with dev:
        pass
    assert dev.closed
    dev.close()  # idempotent
    for call in (dev.fileno, dev.set_owner, dev.get_features, lambda: dev.set_vring_num(0, 8)):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF


# -- GuestMemory.host_regions -------------------------------------------------------------------


def test_host_regions_point_at_guest_bytes() -> None:
    with GuestMemory([(0, 0x20000), (0x1_0000_0000, 0x10000)]) as mem:
        regions = mem.host_regions()
        assert [(g, s) for g, s, _ in regions] == [(0, 0x20000), (0x1_0000_0000, 0x10000)]
        mem.write(0x1234, b"low region")
        mem.write(0x1_0000_0042, b"high region")
        (g0, _, h0), (_, _, h1) = regions
        assert ctypes.string_at(h0 + 0x1234 - g0, 10) == b"low region"
        assert ctypes.string_at(h1 + 0x42, 11) == b"high region"
        assert regions[0][2] == mem.regions[0].host_address
    with pytest.raises(OSError) as info:
        mem.host_regions()
    assert info.value.errno == errno.EBADF


# -- a real kernel backend (skipped where the node is missing) ----------------------------------


@pytest.mark.skipif(not HAVE_NET, reason="no /dev/vhost-net on this host")
def test_vhost_net_ring_setup_against_the_kernel() -> None:
    with VhostNet.open() as dev, GuestMemory([(0, 0x100000)]) as mem, EventFd() as evt:
        features = dev.get_features()
        assert features >> 32 & 1  # VIRTIO_F_VERSION_1
        dev.set_owner()
        with pytest.raises(VhostError) as info:
            dev.set_owner()
        assert info.value.errno == errno.EBUSY
        dev.set_features(features & (1 << 32 | 1 << 29 | 1 << 28))
        dev.set_mem_table(mem.host_regions())
        host = mem.host_regions()[0][2]
        for i in (0, 1):
            dev.set_vring_num(i, 256)
            dev.set_vring_base(i, 5 + i)
            dev.set_vring_addr(i, host + 0x10000, host + 0x12000, host + 0x11000)
            dev.set_vring_kick(i, evt)
            dev.set_vring_call(i, evt)
            dev.set_vring_err(i, evt)
            assert dev.get_vring_base(i) == 5 + i
        dev.set_backend(0, None)
        with pytest.raises(VhostError):
            dev.set_vring_num(0, 3)  # not a power of two
        dev.reset_owner()


@pytest.mark.skipif(not HAVE_VSOCK, reason="no /dev/vhost-vsock on this host")
def test_vhost_vsock_cid_and_running_against_the_kernel() -> None:
    with VhostVsock.open() as dev:
        with pytest.raises(VhostError) as info:
            dev.set_guest_cid(2)  # the host's own CID is refused
        assert info.value.errno == errno.EINVAL
        dev.set_owner()
        dev.set_running(False)


def test_readme_vhost_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    import re

    readme = Path(__file__).resolve().parent.parent / "README.md"
    section = readme.read_text().split("### vhost", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    exec(compile(match.group(1), str(readme), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    if HAVE_NET:
        assert "ring 0 base: 0" in out
    else:
        assert out == "skipped: vhost-net not available on this host (/dev/vhost-net missing)\n"
