"""``--block PATH[,ro][,root][,direct=true][,id=SERIAL]``: crosvm's modern disk syntax, one
ordered list with the ``-r/--rwroot/-d/--rwdisk`` aliases."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from crosvm.config import DiskOption, parse_run_args
from crosvm.device_setup import block
from crosvm.errors import ConfigError


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF" + bytes(60))
    return path


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    out = []
    for name in "abcd":
        path = tmp_path / f"{name}.img"
        path.write_bytes(bytes(1 << 16))
        out.append(path)
    return out


def test_block_options_and_aliases_share_one_ordered_list(kernel: Path, images: list[Path]) -> None:
    a, b, c, d = (str(p) for p in images)
    config = parse_run_args([
        "--block", a, "-d", b, "--block", f"{c},ro,root,direct=true,id=disk-c",
        "--rwdisk", d, str(kernel),
    ])  # fmt: skip
    assert config.disks == [
        DiskOption(images[0], read_only=False),
        DiskOption(images[1], read_only=True),
        DiskOption(images[2], read_only=True, root=True, direct=True, serial="disk-c"),
        DiskOption(images[3], read_only=False),
    ]
    assert config.root_disk_index == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{p},ro=false,root=true", {"read_only": False, "root": True}),
        ("path={p},ro=true,direct=false", {"read_only": True}),
        ("{p},direct,id=12345678901234567890", {"direct": True, "serial": "12345678901234567890"}),
        ("{p},cold-reads=cached", {"cold_reads_direct": False}),
        ("{p},cold-reads=direct", {"cold_reads_direct": True}),
    ],
)  # fmt: skip
def test_block_key_value_forms(
    kernel: Path, images: list[Path], text: str, expected: dict[str, Any]
) -> None:
    config = parse_run_args(["--block", text.format(p=images[0]), str(kernel)])
    assert config.disks == [DiskOption(images[0], **{"read_only": False, **expected})]


@pytest.mark.parametrize(
    ("suffix", "message"),
    [
        (",sparse=true", "unknown option 'sparse=true'"),
        (",ro=maybe", "ro='maybe' is not true or false"),
        (",id=" + "x" * 21, "id must be 1 to 20 bytes"),
        (",id=", "id must be 1 to 20 bytes"),
        (",direct=2", "direct='2' is not true or false"),
        (",cold-reads=yes", "cold-reads='yes' is not direct or cached"),
    ],
)
def test_bad_block_options_are_config_errors(
    kernel: Path, images: list[Path], suffix: str, message: str
) -> None:
    with pytest.raises(ConfigError, match="--block: ") as info:
        parse_run_args(["--block", f"{images[0]}{suffix}", str(kernel)])
    assert message in str(info.value)


def test_block_without_a_path_and_two_roots(kernel: Path, images: list[Path]) -> None:
    for text in (",ro,root", "ro=true,id=x"):
        with pytest.raises(ConfigError, match="no image path"):
            parse_run_args(["--block", text, str(kernel)])
    with pytest.raises(ConfigError, match="only one root"):
        parse_run_args(["--block", f"{images[0]},root", "-r", str(images[1]), str(kernel)])
    with pytest.raises(ConfigError, match=r"disk .*no such file"):
        parse_run_args(["--block", "/nonexistent.img,ro", str(kernel)])


def test_block_misuse_on_the_command_line_is_one_line_and_status_2(kernel: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "crosvm", "run", "--block", f"{kernel},bogus", str(kernel)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "bogus" in result.stderr


def test_direct_and_serial_reach_the_block_device(
    kernel: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Path, dict[str, Any]]] = []

    class Recorded:
        def close(self) -> None:
            pass

    def fake_open(path: Path, **kwargs: Any) -> Recorded:
        calls.append((path, kwargs))
        return Recorded()

    monkeypatch.setattr(block.Block, "open", staticmethod(fake_open))
    config = parse_run_args(
        ["--block", f"{images[0]},direct=true,id=serial-1", "-d", str(images[1]),
         "--block", f"{images[1]},ro,cold-reads=cached", str(kernel)]
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        assert len(block.create(config, [], stack)) == 3
    common = {"cold_reads_direct": True}
    assert calls == [
        (images[0], {"read_only": False, "direct": True, "serial": "serial-1", **common}),
        (images[1], {"read_only": True, "direct": False, "serial": None, **common}),
        (images[1], {"read_only": True, "direct": False, "serial": None,
                     "cold_reads_direct": False}),
    ]  # fmt: skip
