"""Shared helpers for the qcow tests: driving the qemu-img / qemu-io peers."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest


def run_tool(*args: str, ok_codes: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, check=False, timeout=120)
    if proc.returncode not in ok_codes:
        raise AssertionError(f"{args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def qemu_img() -> Callable[..., subprocess.CompletedProcess[str]]:
    def call(*args: str, ok_codes: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
        return run_tool("qemu-img", *args, ok_codes=ok_codes)

    return call


@pytest.fixture
def qemu_io() -> Callable[..., subprocess.CompletedProcess[str]]:
    def call(path: str, *cmds: str, fmt: str = "qcow2") -> subprocess.CompletedProcess[str]:
        args = ["qemu-io", "-f", fmt]
        for c in cmds:
            args += ["-c", c]
        proc = run_tool(*args, path)
        assert "error" not in proc.stdout.lower() + proc.stderr.lower(), proc.stdout + proc.stderr
        return proc

    return call


@pytest.fixture
def raw_of(tmp_path: Path) -> Callable[..., bytes]:
    """The guest-visible content of an image, according to qemu-img."""
    counter = iter(range(1_000_000))

    def call(path: str | Path, *extra: str) -> bytes:
        out = tmp_path / f"peer-raw-{next(counter)}.img"
        run_tool("qemu-img", "convert", *extra, "-O", "raw", str(path), str(out))
        data = out.read_bytes()
        out.unlink()
        return data

    return call
