"""Command-line behaviour: every misuse is one line on stderr and exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from crosvm.config import parse_run_args
from crosvm.errors import ConfigError


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF" + bytes(60))
    return path


def crosvm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crosvm", *args], capture_output=True, text=True, timeout=60
    )


def test_defaults_follow_crosvm(kernel: Path) -> None:
    config = parse_run_args([str(kernel)])
    assert (config.mem_mib, config.cpus, config.sandbox) == (256, 1, True)
    assert config.params == [] and config.disks == [] and config.initrd is None


def test_disks_keep_command_line_order(kernel: Path, tmp_path: Path) -> None:
    images = []
    for name in ("a", "b", "c"):
        images.append(tmp_path / name)
        images[-1].write_bytes(bytes(512))
    config = parse_run_args(
        ["--rwdisk", str(images[0]), "-r", str(images[1]), "-d", str(images[2]), str(kernel)]
    )
    assert [d.path.name for d in config.disks] == ["a", "b", "c"]
    assert [d.read_only for d in config.disks] == [False, True, True]
    assert config.root_disk_index == 1


def test_repeated_params_and_options(kernel: Path) -> None:
    config = parse_run_args(["-p", "a=1", "-p", "b", "-m", "1024", "-c", "2", str(kernel)])
    assert config.params == ["a=1", "b"] and config.mem_mib == 1024 and config.cpus == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "lots"], "--mem must be a number"),
        (["-m", "0"], "--mem must be between"),
        (["-c", "0"], "--cpus must be between"),
        (["--mac", "zz:00:00:00:00:00", "--host_ip", "10.0.0.1", "--netmask", "255.0.0.0"], "MAC"),
        (["--netmask", "255.0.255.0", "--host_ip", "10.0.0.1", "--mac", "02:00:00:00:00:01"],
         "netmask"),
        (["--host_ip", "10.0.0.1"], "must be given together"),
        (["--bogus"], "unrecognized arguments"),
    ],
)  # fmt: skip
def test_bad_values_are_config_errors(kernel: Path, args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_run_args([*args, str(kernel)])


def test_two_roots_rejected(kernel: Path) -> None:
    with pytest.raises(ConfigError, match="only one root"):
        parse_run_args(["-r", str(kernel), "--rwroot", str(kernel), str(kernel)])


@pytest.mark.parametrize(
    "args",
    [
        ["run", "/nonexistent/vmlinux"],
        ["run", "-m", "x", "/nonexistent"],
        ["run"],
        ["frobnicate"],
        ["version", "extra"],
        ["create_qcow2", "only-a-path"],
    ],
)
def test_misuse_is_one_line_and_status_2(args: list[str]) -> None:
    result = crosvm(*args)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_missing_disk_is_one_line(kernel: Path) -> None:
    result = crosvm("run", "-d", "/nonexistent.img", str(kernel))
    assert result.returncode == 2
    assert "no such file" in result.stderr and len(result.stderr.splitlines()) == 1


def test_version_and_help() -> None:
    assert crosvm("version").stdout.startswith("crosvm 0.")
    help_text = crosvm("run", "--help")
    assert help_text.returncode == 0 and "--rwdisk" in help_text.stdout


def test_create_qcow2_makes_an_image_of_that_size(tmp_path: Path) -> None:
    from qcow import QcowFile, detect_image_type

    path = tmp_path / "disk.qcow2"
    result = crosvm("create_qcow2", str(path), "3M")
    assert result.returncode == 0, result.stderr
    assert detect_image_type(str(path)) == "qcow2"
    with QcowFile.open(str(path)) as image:
        assert image.virtual_size == 3 << 20
        assert image.read_at(0, 4096) == bytes(4096)


def test_create_qcow2_bad_size_is_status_2(tmp_path: Path) -> None:
    result = crosvm("create_qcow2", str(tmp_path / "x.qcow2"), "lots")
    assert result.returncode == 2 and "invalid size" in result.stderr


def test_mac_alone_goes_with_an_existing_tap(kernel: Path) -> None:
    config = parse_run_args(["--tap-name", "vmtap7", "--mac", "02:00:00:00:00:07", str(kernel)])
    assert [(n.tap_name, n.mac) for n in config.net] == [("vmtap7", "02:00:00:00:00:07")]
    with pytest.raises(ConfigError, match="together"):
        parse_run_args(["--mac", "02:00:00:00:00:07", str(kernel)])


def test_hugepages_is_off_unless_asked(kernel: Path) -> None:
    assert parse_run_args([str(kernel)]).hugepages is False
    assert parse_run_args(["--hugepages", str(kernel)]).hugepages is True
