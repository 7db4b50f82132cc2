"""Fuzz the decoder: random bytes and fd counts give a value or a MsgError, never anything else,
and never leak an fd."""

from __future__ import annotations

import enum
import os
import socket
from typing import Annotated

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msg_socket import (
    Array,
    FixedBytes,
    Msg,
    MsgError,
    MsgSocket,
    OwnedFd,
    RawFd,
    TaggedUnion,
    Unit,
    decode,
    encode,
    i32,
    u8,
    u16,
    u64,
    wire_size,
)
from sys_util import EventFd


class Mode(enum.IntEnum):
    OFF = 0
    ON = 1
    AUTO = 7


class Inner(Msg):
    flag: bool
    mode: Mode
    fd: OwnedFd | None


class Fuzzed(TaggedUnion):
    pass


class Empty(Fuzzed):
    pass


class Numbers(Fuzzed):
    a: u8
    b: u16
    c: i32
    d: u64
    e: Annotated[bytes, FixedBytes(5)]


class Nested(Fuzzed):
    inner: Inner
    more: Annotated[tuple[Inner, ...], Array(2)]
    raw: RawFd


class WithEvent(Fuzzed):
    evt: EventFd | None
    sock: socket.socket | None
    flags: Annotated[tuple[bool, ...], Array(3)]


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def close_value(value: object) -> None:
    """Close every fd a decoded value owns (the test then checks that nothing leaked)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return
    if isinstance(value, Msg):
        for name in value.__dataclass_fields__:  # type: ignore[attr-defined]
            field = getattr(value, name)
            if isinstance(value, Nested) and name == "raw":
                os.close(field)
            else:
                close_value(field)
    elif isinstance(value, tuple):
        for v in value:
            close_value(v)
    elif hasattr(value, "close"):
        value.close()


def fresh_fds(n: int, kind: int) -> list[int]:
    """``n`` new fds of a mixed bag of kinds (pipes, eventfds, sockets)."""
    fds: list[int] = []
    for i in range(n):
        k = (kind + i) % 3
        if k == 0:
            r, w = os.pipe()
            os.close(w)
            fds.append(r)
        elif k == 1:
            fds.append(os.eventfd(0, os.EFD_CLOEXEC))
        else:
            a, b = socket.socketpair()
            b.close()
            fds.append(a.detach())
    return fds


SIZE = wire_size(Fuzzed)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.binary(min_size=SIZE, max_size=SIZE),  # the right size: exercises the layout checks
        st.binary(max_size=SIZE + 4),
        st.builds(
            lambda t, rest: bytes([t]) + rest,
            st.integers(0, 5),  # a valid tag, then random bytes
            st.binary(min_size=SIZE - 1, max_size=SIZE - 1),
        ),
    ),
    nfds=st.integers(0, 6),
    kind=st.integers(0, 2),
)
def test_decode_random_input(data: bytes, nfds: int, kind: int) -> None:
    before = fd_count()
    fds = fresh_fds(nfds, kind)
    try:
        value = decode(Fuzzed, data, fds)
    except MsgError:
        pass
    else:
        assert isinstance(value, Fuzzed)
        # a successful decode is canonical: it re-encodes to exactly the same bytes
        assert encode(Fuzzed, value)[0] == data
        close_value(value)
    assert fd_count() == before


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=SIZE + 4).filter(bool),
    nfds=st.integers(0, 6),
    kind=st.integers(0, 2),
)
def test_recv_random_packets(data: bytes, nfds: int, kind: int) -> None:
    before = fd_count()
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with MsgSocket(mine, Unit, Fuzzed, recv_timeout=5) as sock, theirs:
        fds = fresh_fds(nfds, kind)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview_of(fds)))] if fds else []
        theirs.sendmsg([data], anc)
        for fd in fds:
            os.close(fd)  # the receiver got its own copies
        try:
            value = sock.recv()
        except MsgError:
            pass
        else:
            close_value(value)
    assert fd_count() == before


def memoryview_of(fds: list[int]) -> memoryview:
    import array

    return memoryview(array.array("i", fds))


def _valid_values() -> st.SearchStrategy[Fuzzed]:
    """Valid messages whose fd fields hold a placeholder int (encode only collects it; the
    test sends fresh fds instead)."""
    fd = st.just(0)
    inner = st.builds(Inner, st.booleans(), st.sampled_from(Mode), st.one_of(st.none(), fd))
    return st.one_of(
        st.just(Empty()),
        st.builds(
            Numbers,
            st.integers(0, 255),
            st.integers(0, 65535),
            st.integers(-(2**31), 2**31 - 1),
            st.integers(0, 2**64 - 1),
            st.binary(min_size=5, max_size=5),
        ),
        st.builds(Nested, inner, st.tuples(inner, inner), fd),
        st.builds(
            WithEvent,
            st.one_of(st.none(), fd),
            st.one_of(st.none(), fd),
            st.tuples(st.booleans(), st.booleans(), st.booleans()),
        ),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=_valid_values(),
    flip=st.one_of(st.none(), st.tuples(st.integers(0, SIZE - 1), st.integers(1, 255))),
    fd_delta=st.sampled_from([0, 0, 0, -1, 1]),
)
def test_decode_mutated_valid_messages(
    value: Fuzzed, flip: tuple[int, int] | None, fd_delta: int
) -> None:
    """Valid encodings, sometimes with one byte changed or one fd too few/many: a mutation
    that still decodes must re-encode canonically, a failure must close every fd (including
    the ones already turned into EventFd/socket objects)."""
    # count the placeholder fds, then hand the decoder fresh ones instead
    data, placeholders = encode(Fuzzed, value)
    nfds = max(0, len(placeholders) + fd_delta)
    if flip is not None:
        buf = bytearray(data)
        buf[flip[0]] ^= flip[1]
        data = bytes(buf)
    before = fd_count()
    # eventfds work for every fd field (RawFd, OwnedFd, EventFd); sockets would not be eventfds
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
    try:
        got = decode(Fuzzed, data, fds)
    except MsgError:
        pass
    else:
        assert encode(Fuzzed, got)[0] == data
        close_value(got)
    assert fd_count() == before
