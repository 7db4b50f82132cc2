"""Tests of the --serial parameter syntax, crosvm's COM defaults and the COM port builder."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from devices.bus import Bus
from devices.errors import SerialConfigError
from devices.serial import (
    COM_PORTS,
    SerialHardware,
    SerialParameters,
    SerialType,
    create_com_ports,
    merge_serial_parameters,
)


class FakeEvent:
    def __init__(self) -> None:
        self.count = 0
        self.closed = False

    def write(self, n: int = 1) -> None:
        self.count += n

    def close(self) -> None:
        self.closed = True


def test_parse_full() -> None:
    p = SerialParameters.parse("type=file,num=3,path=/tmp/x.log,console,stdin")
    assert p == SerialParameters(SerialType.FILE, 3, "/tmp/x.log", True, True)
    assert SerialParameters.parse("type=sink").num == 1
    assert not SerialParameters.parse("type=stdout,console=false").console
    assert (
        SerialParameters.parse("type=syslog,hardware=virtio-console").hardware
        is SerialHardware.VIRTIO_CONSOLE
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("type=tty", "unknown type 'tty'"),
        ("type=stdout,num=0", "num must be 1 to 4"),
        ("type=stdout,num=5", "num must be 1 to 4"),
        ("type=stdout,num=one", "integer"),
        ("type=file", "needs path"),
        ("type=file,path=", "path must not be empty"),
        ("type=stdout,path=/x", "only valid with type=file"),
        ("num=2", "type= is required"),
        ("type=stdout,speed=9600", "unknown key 'speed'"),
        ("type=stdout,,num=2", "empty item"),
        ("type=stdout,type=sink", "given twice"),
        ("type=stdout,console=maybe", "true or false"),
        ("type=stdout,hardware=pl011", "unknown hardware"),
    ],
)
def test_parse_errors_are_one_line(text: str, needle: str) -> None:
    with pytest.raises(SerialConfigError) as info:
        SerialParameters.parse(text)
    msg = str(info.value)
    assert needle in msg
    assert "\n" not in msg
    assert isinstance(info.value, ValueError)


def test_error_pickles() -> None:
    err = SerialConfigError("type=x", "bad")
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_defaults() -> None:
    m = merge_serial_parameters([])
    assert [m[n].type for n in (1, 2, 3, 4)] == [
        SerialType.STDOUT,
        SerialType.SINK,
        SerialType.SINK,
        SerialType.SINK,
    ]
    assert m[1].console and m[1].stdin
    assert not any(m[n].console or m[n].stdin for n in (2, 3, 4))


def test_user_console_elsewhere_takes_the_role_from_com1() -> None:
    m = merge_serial_parameters([SerialParameters.parse("type=stdout,num=2,console")])
    assert m[2].console and m[2].stdin
    assert m[1].type is SerialType.STDOUT and not m[1].console and not m[1].stdin


def test_file_console_does_not_read_stdin_unless_asked(tmp_path: Path) -> None:
    p = SerialParameters.parse(f"type=file,path={tmp_path}/c,console")
    assert not merge_serial_parameters([p])[1].stdin


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["type=sink,num=2", "type=stdout,num=2"], "given twice"),
        (["type=stdout,num=1,console", "type=stdout,num=2,console"], "console set on ports"),
        (["type=stdout,num=1,stdin", "type=sink,num=3,stdin"], "stdin set on ports"),
    ],
)
def test_merge_errors(options: list[str], needle: str) -> None:
    with pytest.raises(SerialConfigError, match=needle):
        merge_serial_parameters([SerialParameters.parse(o) for o in options])


def test_create_com_ports_layout_and_file_output(tmp_path: Path) -> None:
    events: list[FakeEvent] = []

    def make() -> FakeEvent:
        events.append(FakeEvent())
        return events[-1]

    log = tmp_path / "com2.log"
    ports = create_com_ports(
        [SerialParameters.parse(f"type=file,num=2,path={log}")], make_event=make
    )
    try:
        assert [(p.num, p.base, p.gsi, p.length) for p in ports] == [
            (1, 0x3F8, 4, 8),
            (2, 0x2F8, 3, 8),
            (3, 0x3E8, 4, 8),
            (4, 0x2E8, 3, 8),
        ]
        assert [(p.base, p.gsi) for p in ports] == list(COM_PORTS)
        assert [p.tty_name for p in ports] == ["ttyS0", "ttyS1", "ttyS2", "ttyS3"]
        assert ports[0].params.console and ports[0].stdin_fd == 0
        assert all(p.stdin_fd is None for p in ports[1:])
        bus = Bus()
        for p in ports:
            bus.insert(p.serial, p.base, p.length)
        for b in b"to com2\n":
            bus.write(0x2F8, bytes([b]))
        bus.write(0x3E8, b"x")  # sink
    finally:
        for p in ports:
            p.close()
    assert log.read_bytes() == b"to com2\n"
    assert len(events) == 4 and not any(e.closed for e in events)  # caller-made: not owned


def test_create_com_ports_default_eventfds_are_owned(tmp_path: Path) -> None:
    ports = create_com_ports([SerialParameters.parse("type=sink,num=1")])
    evt = ports[0].interrupt
    assert hasattr(evt, "fileno")
    for p in ports:
        p.close()
    with pytest.raises(OSError):
        evt.write(1)


def test_virtio_console_ports_are_left_out() -> None:
    ports = create_com_ports(
        [SerialParameters.parse("type=sink,num=4,hardware=virtio-console")],
        make_event=FakeEvent,
    )
    assert [p.num for p in ports] == [1, 2, 3]
    for p in ports:
        p.close()


def test_bad_file_path_fails_before_start(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        create_com_ports(
            [SerialParameters.parse(f"type=file,num=3,path={tmp_path}/missing/dir/log")],
            make_event=FakeEvent,
        )
