from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from sys_util import init_logging, logging_fds, reset_logging


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    try:
        yield
    finally:
        reset_logging()
        root.setLevel(level)


def test_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    handler = init_logging(level=logging.DEBUG)
    logging.getLogger("devices.serial").debug("hello %d", 42)
    err = capsys.readouterr().err
    assert "DEBUG devices.serial] hello 42" in err
    assert logging_fds() == [2] or isinstance(handler, logging.StreamHandler)


def test_reinit_replaces_handler(capsys: pytest.CaptureFixture[str]) -> None:
    first = init_logging()
    second = init_logging()
    assert first not in logging.getLogger().handlers
    assert second in logging.getLogger().handlers
    logging.getLogger("x").warning("once")
    assert capsys.readouterr().err.count("once") == 1


def test_syslog(tmp_path: Path) -> None:
    path = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(5)
        handler = init_logging(syslog=True, syslog_address=path, ident="testvm")
        assert isinstance(handler, logging.handlers.SysLogHandler)
        assert len(logging_fds()) == 1
        logging.getLogger("kvm").error("vcpu died")
        record = server.recv(1024).decode()
    assert f"testvm[{os.getpid()}]: ERROR kvm: vcpu died" in record


def test_syslog_missing_falls_back_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = init_logging(syslog=True, syslog_address=str(tmp_path / "nothing"))
    assert isinstance(handler, logging.StreamHandler)
    assert "unavailable; logging to stderr" in capsys.readouterr().err
