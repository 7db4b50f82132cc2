"""Wire layout: sizes, byte patterns, strict decoding and declaration-time refusals."""

from __future__ import annotations

import enum
import os
import socket
import struct
from typing import Annotated

import pytest

from msg_socket import (
    Array,
    BadRecvSize,
    DeclarationError,
    EncodeError,
    ExpectFd,
    FixedBytes,
    InvalidType,
    Msg,
    NotExpectFd,
    OwnedFd,
    RawFd,
    TaggedUnion,
    Unit,
    decode,
    encode,
    f64,
    i16,
    max_fd_count,
    msg_size,
    u8,
    u16,
    u32,
    u64,
    usize,
    wire_size,
)

# --- crosvm's OLD vm_control types, the worked example of crosvm-facts.md section 5.1 ---------


class BalloonControlCommand(TaggedUnion):
    pass


class Adjust(BalloonControlCommand):
    num_bytes: u64


class DiskControlCommand(TaggedUnion):
    pass


class Resize(DiskControlCommand):
    new_size: u64


class UsbControlCommand(TaggedUnion):
    pass


class AttachDevice(UsbControlCommand):
    bus: u8
    addr: u8
    vid: u16
    pid: u16
    fd: OwnedFd | None


class DetachDevice(UsbControlCommand):
    port: u8


class ListDevice(UsbControlCommand):
    ports: Annotated[tuple[u8, ...], Array(16)]


class VmRequest(TaggedUnion):
    pass


class Exit(VmRequest):
    pass


class Suspend(VmRequest):
    pass


class Resume(VmRequest):
    pass


class BalloonCommand(VmRequest):
    command: BalloonControlCommand


class DiskCommand(VmRequest):
    disk_index: usize
    command: DiskControlCommand


class UsbCommand(VmRequest):
    command: UsbControlCommand


class UsbControlAttachedDevice(Msg):
    port: u8
    vendor_id: u16
    product_id: u16


class UsbControlResult(TaggedUnion):
    pass


class UsbOk(UsbControlResult):
    port: u8


class NoAvailablePort(UsbControlResult):
    pass


class NoSuchDevice(UsbControlResult):
    pass


class NoSuchPort(UsbControlResult):
    pass


class FailedToOpenDevice(UsbControlResult):
    pass


class Devices(UsbControlResult):
    devices: Annotated[tuple[UsbControlAttachedDevice, ...], Array(16)]


class VmResponse(TaggedUnion):
    pass


class Ok(VmResponse):
    pass


class Err(VmResponse):
    errno: u32


class RegisterMemory(VmResponse):
    pfn: u64
    slot: u32


class UsbResponse(VmResponse):
    result: UsbControlResult


def test_crosvm_vm_request_is_18_bytes_with_at_most_one_fd() -> None:
    assert msg_size(VmRequest) == 1 + max(9, 8 + 9, 17) == 18
    assert max_fd_count(VmRequest) == 1


def test_crosvm_vm_request_byte_patterns() -> None:
    assert encode(VmRequest, Exit()) == (bytes(18), [])
    data, fds = encode(VmRequest, BalloonCommand(Adjust(0x0102030405060708)))
    assert data == b"\x03\x00" + struct.pack("<Q", 0x0102030405060708) + bytes(8)
    assert fds == []
    data, _ = encode(VmRequest, DiskCommand(disk_index=2, command=Resize(new_size=4096)))
    assert data == b"\x04" + struct.pack("<Q", 2) + b"\x00" + struct.pack("<Q", 4096)


def test_crosvm_vm_response_is_82_bytes() -> None:
    assert msg_size(UsbControlResult) == 1 + 16 * 5
    assert msg_size(VmResponse) == 82


def test_round_trip_of_every_vm_request_variant() -> None:
    values: list[VmRequest] = [
        Exit(),
        Suspend(),
        Resume(),
        BalloonCommand(Adjust(1 << 63)),
        DiskCommand(7, Resize(123)),
        UsbCommand(DetachDevice(9)),
        UsbCommand(ListDevice(tuple(range(16)))),
        UsbCommand(AttachDevice(1, 2, 0x1D6B, 0x0002, None)),
    ]
    for v in values:
        data, fds = encode(VmRequest, v)
        assert fds == []
        assert decode(VmRequest, data) == v


def test_fd_field_round_trip_through_decode_takes_ownership() -> None:
    r, w = os.pipe()
    try:
        sent = UsbCommand(AttachDevice(1, 2, 3, 4, OwnedFd(os.dup(r))))
        data, fds = encode(VmRequest, sent)  # fds are borrowed from `sent`
        assert len(fds) == 1
        got = decode(VmRequest, data, [os.dup(fds[0])])
        del sent  # closes the sender's copy
        assert isinstance(got, UsbCommand) and isinstance(got.command, AttachDevice)
        fd = got.command.fd
        assert isinstance(fd, OwnedFd)
        os.write(w, b"x")
        assert os.read(fd.fileno(), 1) == b"x"
        fd.close()
    finally:
        os.close(r)
        os.close(w)


class Color(enum.IntEnum):
    RED = 1
    GREEN = 2
    BLUE = 300


class Flags(Msg):
    a: bool
    b: u8
    c: Color
    d: Annotated[Color, u32]
    e: i16
    f: f64
    g: Annotated[bytes, FixedBytes(3)]
    h: tuple[u8, bool]
    i: u32 | None


def test_primitive_layout() -> None:
    assert msg_size(Flags) == 1 + 1 + 2 + 4 + 2 + 8 + 3 + 2 + 5
    v = Flags(True, 255, Color.BLUE, Color.RED, -2, 0.5, b"abc", (7, False), 9)
    data, _ = encode(Flags, v)
    assert data == (
        b"\x01\xff"
        + struct.pack("<HIhd", 300, 1, -2, 0.5)
        + b"abc\x07\x00\x01"
        + struct.pack("<I", 9)
    )
    assert decode(Flags, data) == v
    v2 = Flags(False, 0, Color.RED, Color.GREEN, 0, 0.0, b"\0\0\0", (0, True), None)
    assert decode(Flags, encode(Flags, v2)[0]) == v2


def _flags_bytes() -> bytearray:
    v = Flags(True, 1, Color.RED, Color.RED, 0, 0.0, b"xyz", (0, False), None)
    return bytearray(encode(Flags, v)[0])


@pytest.mark.parametrize(
    ("offset", "byte", "what"),
    [
        (0, 2, "bool byte"),  # bad bool
        (2, 3, "not a value of Color"),  # enum value 3 is no member
        (22, 2, "neither 0 nor 1"),  # the tuple's bool
        (23, 2, "option tag"),  # option tag 2
        (24, 1, "non-zero payload"),  # None with a payload
    ],
)
def test_strict_decoding(offset: int, byte: int, what: str) -> None:
    data = _flags_bytes()
    data[offset] = byte
    with pytest.raises(InvalidType, match=what):
        decode(Flags, bytes(data))


def test_unknown_variant_tag_and_nonzero_padding() -> None:
    with pytest.raises(InvalidType, match="unknown variant tag 6"):
        decode(VmRequest, b"\x06" + bytes(17))
    with pytest.raises(InvalidType, match="padding"):
        decode(VmRequest, b"\x00" + bytes(16) + b"\x01")


def test_wrong_size() -> None:
    with pytest.raises(BadRecvSize) as e:
        decode(VmRequest, bytes(17))
    assert (e.value.expected, e.value.actual) == (18, 17)
    with pytest.raises(BadRecvSize):
        decode(VmRequest, bytes(19))


def test_encode_errors_name_the_field() -> None:
    with pytest.raises(EncodeError, match=r"Adjust\.num_bytes"):
        encode(VmRequest, BalloonCommand(Adjust(-1)))
    with pytest.raises(EncodeError, match="not a variant"):
        encode(VmRequest, Adjust(1))
    with pytest.raises(EncodeError, match="exactly 16"):
        encode(VmRequest, UsbCommand(ListDevice((1, 2))))
    with pytest.raises(EncodeError, match="bool"):
        encode(Flags, Flags(2, 1, Color.RED, Color.RED, 0, 0.0, b"xyz", (0, False), None))  # type: ignore[arg-type]
    with pytest.raises(EncodeError, match="Color"):
        encode(Flags, Flags(True, 1, 5, Color.RED, 0, 0.0, b"xyz", (0, False), None))  # type: ignore[arg-type]
    with pytest.raises(EncodeError, match="3 bytes"):
        encode(Flags, Flags(True, 1, Color.RED, Color.RED, 0, 0.0, b"xy", (0, False), None))


class WithFds(Msg):
    first: RawFd
    maybe: OwnedFd | None
    sock: socket.socket


def test_fd_count_mismatch_closes_everything() -> None:
    assert max_fd_count(WithFds) == 3
    a, b = socket.socketpair()
    r, w = os.pipe()
    data, _ = encode(WithFds, WithFds(r, OwnedFd(os.dup(w)), a))
    # too few: the message wants 3, only 2 arrive (each is closed by decode)
    fds = [os.dup(r), os.dup(w)]
    with pytest.raises(ExpectFd):
        decode(WithFds, data, fds)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    # too many
    fds = [os.dup(r), os.dup(w), os.dup(a.fileno()), os.dup(b.fileno())]
    with pytest.raises(NotExpectFd) as e:
        decode(WithFds, data, fds)
    assert (e.value.used, e.value.received) == (3, 4)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    # a pipe where a socket is wanted: InvalidType, all closed
    fds = [os.dup(r), os.dup(w), os.dup(w)]
    with pytest.raises(InvalidType, match="not usable"):
        decode(WithFds, data, fds)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    for fd in (r, w):
        os.close(fd)
    a.close()
    b.close()


def test_unit_and_empty_variants_take_one_byte_on_the_wire() -> None:
    assert msg_size(Unit) == 0
    assert wire_size(Unit) == 1
    assert encode(Unit, Unit()) == (b"\0", [])
    assert decode(Unit, b"\0") == Unit()
    with pytest.raises(InvalidType):
        decode(Unit, b"\1")


# --- declaration-time refusals ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("annotation", "hint"),
    [
        ("int", "u8/u16"),
        ("str", "FixedBytes"),
        ("bytes", "FixedBytes"),
        ("list[u8]", "Array"),
        ("tuple[u8, ...]", "Array"),
        ("dict[u8, u8]", "dict"),
        ("float", "f32 or f64"),
        ("u8 | u16", "TaggedUnion"),
        ("Annotated[str, u32]", "applies to int"),
    ],
)
def test_unbounded_types_are_refused_at_declaration(annotation: str, hint: str) -> None:
    namespace: dict[str, object] = {"Msg": Msg, "u8": u8, "u16": u16, "u32": u32}
    namespace["Annotated"] = Annotated
    source = f"class Bad(Msg):\n    x: {annotation}\n"
    with pytest.raises(DeclarationError, match=hint) as e:
        # dont_inherit: evaluate the annotation now, not as a string (this module's __future__)
        exec(compile(source, "<declaration>", "exec", dont_inherit=True), namespace)
    assert "Bad.x" in str(e.value)


def test_plain_enum_and_union_fields_are_refused() -> None:
    class Plain(enum.Enum):
        A = "a"

    with pytest.raises(DeclarationError, match="IntEnum"):

        class Bad(Msg):
            x: Plain

    with pytest.raises(DeclarationError, match="no fields of its own"):

        class BadUnion(TaggedUnion):
            x: u8


def test_union_closes_after_first_use_and_cannot_be_instantiated() -> None:
    class Cmd(TaggedUnion):
        pass

    class A(Cmd):
        pass

    assert msg_size(Cmd) == 1
    with pytest.raises(DeclarationError, match="closed"):

        class B(Cmd):
            pass

    with pytest.raises(TypeError):
        Cmd()


def test_self_containing_union_is_refused_on_first_use() -> None:
    class Tree(TaggedUnion):
        pass

    class Leaf(Tree):
        pass

    class Node(Tree):
        left: Tree

    with pytest.raises(DeclarationError, match="contains itself"):
        msg_size(Tree)


def test_forward_references_inside_functions_resolve() -> None:
    class Outer(Msg):
        inner: Inner
        n: u8

    class Inner(Msg):
        x: u16

    assert msg_size(Outer) == 3
    assert decode(Outer, encode(Outer, Outer(Inner(5), 1))[0]) == Outer(Inner(5), 1)
