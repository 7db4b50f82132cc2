from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sys_util import number_of_online_cpus, online_cpus, parse_cpu_list, read_online_cpus
from sys_util.errors import SysfsError
from sys_util.testing import make_cpu_sysfs


def _tree(root: Path, online: str | None, cpus: dict[int, str | None]) -> Path:
    make_cpu_sysfs(root, online=online, cpus=cpus)
    cpu_dir = root / "devices" / "system" / "cpu"
    (cpu_dir / "cpufreq").mkdir()  # not a cpuN directory
    (cpu_dir / "possible").write_text("0-63\n")
    return root


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0\n", (0,)), ("0-3,5\n", (0, 1, 2, 3, 5)), ("7-8,0", (0, 7, 8)), ("2,2-3", (2, 3))],
)
def test_parse_cpu_list(text: str, expected: tuple[int, ...]) -> None:
    assert parse_cpu_list(text) == expected


@pytest.mark.parametrize("text", ["", "\n", "a", "3-1", "1-", "-1", "0,,1"])
def test_parse_cpu_list_rejects(text: str) -> None:
    with pytest.raises(SysfsError):
        parse_cpu_list(text, "/x/online")


def test_summary_file_wins(tmp_path: Path) -> None:
    root = _tree(tmp_path, "0-1,3\n", {0: None, 1: "0", 2: "0", 3: "1"})
    assert read_online_cpus(root) == (0, 1, 3)


def test_per_cpu_files_when_summary_missing(tmp_path: Path) -> None:
    # cpu0 has no online file (not hot-pluggable): online. cpu2 is offline.
    root = _tree(tmp_path, None, {0: None, 1: "1\n", 2: "0\n", 10: "1\n"})
    assert read_online_cpus(root) == (0, 1, 10)


def test_per_cpu_files_when_summary_garbled(tmp_path: Path) -> None:
    root = _tree(tmp_path, "garbage", {0: None, 1: "0"})
    assert read_online_cpus(root) == (0,)


def test_all_absent_means_all_online(tmp_path: Path) -> None:
    # CONFIG_HOTPLUG_CPU=n: no cpuN/online anywhere.
    root = _tree(tmp_path, None, {0: None, 1: None, 2: None})
    assert read_online_cpus(root) == (0, 1, 2)


def test_unexpected_state_assumed_online_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _tree(tmp_path, None, {0: None, 1: "maybe"})
    with caplog.at_level(logging.WARNING):
        assert read_online_cpus(root) == (0, 1)
    assert "assuming cpu1 is online" in caplog.text


def test_no_sysfs_assumes_cpu_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import os

    with caplog.at_level(logging.WARNING):
        assert read_online_cpus(tmp_path) == tuple(range(os.cpu_count() or 1))
    assert "assuming" in caplog.text


def test_cached_once_per_root(tmp_path: Path) -> None:
    root = _tree(tmp_path, "0-2\n", {})
    online_cpus.cache_clear()
    try:
        assert online_cpus(str(root)) == (0, 1, 2)
        (root / "devices/system/cpu/online").write_text("0\n")
        assert online_cpus(str(root)) == (0, 1, 2)  # cached
    finally:
        online_cpus.cache_clear()


def test_real_host() -> None:
    cpus = online_cpus()
    assert cpus and cpus == tuple(sorted(cpus))
    assert number_of_online_cpus() == len(cpus)
