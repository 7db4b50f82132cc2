"""The wire format: one codec object per type, built once from the annotations and cached.

A codec knows its fixed ``size`` in bytes and its ``max_fds``; ``encode`` writes a value at an
offset of a zeroed buffer and appends the fds it carries; ``decode`` reads one back, taking
received fds in order from an :class:`FdReader`. Layout rules (DESIGN.md has the full table):
little-endian fixed-width numbers, bool = 1 byte (0/1), no padding between fields, Optional =
1 tag byte + payload, union = 1 tag byte + the largest variant, all unused bytes zero.

Decoding is strict because the peer is untrusted: every byte pattern that no value encodes to
(bool 2, an unknown tag, non-zero padding) is an :class:`InvalidType`, so each value has exactly
one encoding.
"""

from __future__ import annotations

import enum
import os
import struct
import threading
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

from msg_socket._message import Msg, TaggedUnion
from msg_socket._types import Array, FdMarker, FixedBytes, Float, Int, fd_factory
from msg_socket.errors import (
    BadRecvSize,
    DeclarationError,
    EncodeError,
    ExpectFd,
    InvalidType,
    NotExpectFd,
)

__all__ = [
    "MAX_FDS",
    "Codec",
    "FdReader",
    "check_declaration",
    "codec_for",
    "decode",
    "encode",
    "max_fd_count",
    "msg_size",
    "wire_size",
]

#: Linux accepts at most 253 fds in one SCM_RIGHTS message (SCM_MAX_FD).
MAX_FDS = 253

T = TypeVar("T")


class FdReader:
    """Hands out received fds in order and remembers what it made of them, so a failed decode
    can close every one (the objects built so far, and the fds not reached yet)."""

    __slots__ = ("_fds", "_made", "pos")

    def __init__(self, fds: Sequence[int]) -> None:
        self._fds = list(fds)
        self._made: list[Any] = []
        self.pos = 0

    @property
    def received(self) -> int:
        return len(self._fds)

    def take(self, factory: Callable[[int], Any] | None, where: str) -> Any:
        if self.pos >= len(self._fds):
            raise ExpectFd(len(self._fds))
        fd = self._fds[self.pos]
        if factory is None:
            obj: Any = fd
        else:
            try:
                obj = factory(fd)
            except (OSError, ValueError, TypeError) as e:
                # The factory did not take the fd: it stays unconsumed and close_all closes it.
                raise InvalidType(where, f"received fd is not usable as this type ({e})") from e
        self.pos += 1
        self._made.append(obj)
        return obj

    def close_all(self) -> None:
        """Close everything received: objects already built, and the fds not consumed."""
        made, self._made = self._made, []
        for obj in made:
            try:
                if isinstance(obj, int):
                    os.close(obj)
                else:
                    obj.close()
            except OSError:
                pass
        rest, self._fds = self._fds[self.pos :], []
        for fd in rest:
            try:
                os.close(fd)
            except OSError:
                pass


class Codec:
    """Encoder/decoder of one type. ``fmt`` is set by the flat primitives (one struct code),
    so a struct made only of them packs in a single ``struct`` call."""

    size: int = 0
    max_fds: int = 0
    fmt: str | None = None
    where: str = "?"

    def encode(self, value: Any, buf: bytearray, off: int, fds: list[int]) -> None:
        raise NotImplementedError

    def decode(self, buf: bytes, off: int, rx: FdReader) -> Any:
        raise NotImplementedError

    # Flat primitives: validate a value before packing / convert a value after unpacking.
    # None means "identity" (struct itself checks the range of ints).
    flat_in: Callable[[Any], Any] | None = None
    flat_out: Callable[[Any], Any] | None = None


class _UnitCodec(Codec):
    def __init__(self, where: str) -> None:
        self.where = where

    def encode(self, value: Any, buf: bytearray, off: int, fds: list[int]) -> None:
        if value is not None:
            raise EncodeError(self.where, f"expected None, got {type(value).__name__}")

    def decode(self, buf: bytes, off: int, rx: FdReader) -> Any:
        return None


class _IntCodec(Codec):
    def __init__(self, where: str, marker: Int | Float) -> None:
        self.where = where
        self.size = marker.size
        self._st = struct.Struct(marker.fmt)
        self.fmt = marker.fmt[1:]
        self._float = isinstance(marker, Float)

    def encode(self, value: Any, buf: bytearray, off: int, fds: list[int]) -> None:
        try:
            self._st.pack_into(buf, off, value)
        except struct.error as e:
            raise EncodeError(self.where, f"{value!r} does not fit: {e}") from None

    def decode(self, buf: bytes, off: int, rx: FdReader) -> Any:
        return self._st.unpack_from(buf, off)[0]


def _bool_in(where: str) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if value is True:
            return 1
        if value is False:
            return 0
        raise EncodeError(where, f"expected a bool, got {value!r}")

    return check


def _bool_out(where: str) -> Callable[[int], bool]:
    def check(raw: int) -> bool:
        if raw == 0:
            return False
        if raw == 1:
            return True
        raise InvalidType(where, f"bool byte {raw:#04x} is neither 0 nor 1")

    return check


class _BoolCodec(Codec):
    size = 1
    fmt = "B"

    def __init__(self, where: str) -> None:
        self.where = where
        self.flat_in = _bool_in(where)
        self.flat_out = _bool_out(where)

    def encode(self, value: Any, buf: bytearray, off: int, fds: list[int]) -> None:
        assert self.flat_in is not None
        buf[off] = self.flat_in(value)

    def decode(self, buf: bytes, off: int, rx: FdReader) -> Any:
        assert self.flat_out is not None
        return self.flat_out(buf[off])


def _auto_enum_width(cls: type[enum.Enum], where: str) -> Int:
    values = [int(m.value) for m in cls.__members__.values()]
    if not values:
        raise DeclarationError(where, f"enum {cls.__qualname__} has no members")
    lo, hi = min(values), max(values)
    for size in (1, 2, 4, 8):
        marker = Int(size, lo < 0)
        if marker.min <= lo and hi <= marker.max:
            return marker
    raise DeclarationError(where, f"enum {cls.__qualname__} values do not fit 64 bits")


class _EnumCodec(Codec):
    def __init__(self, where: str, cls: type[enum.Enum], marker: Int) -> None:
        self.where = where
        self.size = marker.size
        self.fmt = marker.fmt[1:]
        self._st = struct.Struct(marker.fmt)
        for m in cls.__members__.values():
            if not marker.min <= int(m.value) <= marker.max:
                raise DeclarationError(
                    where, f"{cls.__qualname__}.{m.name} = {m.value} does not fit {marker}"
                )
        name = cls.__qualname__

        def check_in(value: Any) -> int:
            try:
                return int(cls(value).value)
            except (ValueError, TypeError):
                raise EncodeError(where, f"{value!r} is not a {name}") from None

        def check_out(raw: int) -> Any:
            try:
                return cls(raw)
            except ValueError:
                raise InvalidType(where, f"{raw} is not a value of {name}") from None

        self.flat_in = check_in
        self.flat_out = check_out

    def encode(self, value: Any, buf: bytearray, off: int, fds: list[int]) -> None:
        assert self.flat_in is not None
        self._st.pack_into(buf, off, self.flat_in(value))

    def decode(self, buf: bytes, off: int, rx: FdReader) -> Any:
        assert self.flat_out is not None
        return self.flat_out(self._st.unpack_from(buf, off)[0])


class _BytesCodec(Codec):
    def __init__(self, where: str, length: int) -> None:
        self.where = where
        self.size = length
        self.fmt = f"{length}s"

        def check_in(value: Any) -> bytes:
            if not isinstance(value, bytes | bytearray | memoryview):
                raise EncodeError(where, f"expected {length} bytes, got {type(value).__name__}")
            data = bytes(value)
            if len(data) != length:
                raise EncodeError(where, f"expected exactly {length} bytes, got {len(data)}")
            return data

        self.flat_in = check_in

    def encode(self, value: Any, buf: bytearray, off: int, fds: list[int]) -> None:
        assert self.flat_in is not None
        buf[off : off + self.size] = self.flat_in(value)

    def decode(self, buf: bytes, off: int, rx: FdReader) -> Any:
        return bytes(buf[off : off + self.size])


class _SeqCodec(Codec):
    """Fixed-length arrays (``Array(n)``: one element type) and fixed tuples (``tuple[A, B]``)."""

    def __init__(self, where: str, elems: list[Codec], container: type[Any]) -> None:
        self.where = where
        self._elems = elems
        self._container = container
        self._offsets: list[int] = []
        off = 0
        for c in elems:
            self._offsets.append(off)
            off += c.size
        self.size = off
        self.max_fds = sum(c.max_fds for c in elems)
        self._flat = _FlatPacker(elems)

    def encode(self, value: Any, buf: bytearray, off: int, fds: list[int]) -> None:
        if not isinstance(value, tuple | list):
            raise EncodeError(self.where, f"expected a sequence, got {type(value).__name__}")
        if len(value) != len(self._elems):
            raise EncodeError(
                self.where, f"expected exactly {len(self._elems)} elements, got {len(value)}"
            )
        if self._flat.ok:
            self._flat.pack(buf, off, value)
            return
        for c, o, v in zip(self._elems, self._offsets, value, strict=True):
            c.encode(v, buf, off + o, fds)

    def decode(self, buf: bytes, off: int, rx: FdReader) -> Any:
        if self._flat.ok:
            return self._container(self._flat.unpack(buf, off))
        return self._container(
            c.decode(buf, off + o, rx) for c, o in zip(self._elems, self._offsets, strict=True)
        )


class _OptionCodec(Codec):
    def __init__(self, where: str, inner: Codec) -> None:
        self.where = where
        self._inner = inner
        self.size = 1 + inner.size
        self.max_fds = inner.max_fds
        self._zeros = bytes(inner.size)

    def encode(self, value: Any, buf: bytearray, off: int, fds: list[int]) -> None:
        if value is None:
            return  # tag 0, payload left zero
        buf[off] = 1
        self._inner.encode(value, buf, off + 1, fds)

    def decode(self, buf: bytes, off: int, rx: FdReader) -> Any:
        tag = buf[off]
        if tag == 0:
            if buf[off + 1 : off + self.size] != self._zeros:
                raise InvalidType(self.where, "None option with non-zero payload bytes")
            return None
        if tag != 1:
            raise InvalidType(self.where, f"option tag {tag} is neither 0 (None) nor 1")
        return self._inner.decode(buf, off + 1, rx)


class _FdCodec(Codec):
    max_fds = 1

    def __init__(self, where: str, factory: Callable[[int], Any] | None) -> None:
        self.where = where
        self._factory = factory

    def encode(self, value: Any, buf: bytearray, off: int, fds: list[int]) -> None:
        if isinstance(value, int) and not isinstance(value, bool):
            fd = value
        else:
            try:
                fd = value.fileno()
            except (AttributeError, OSError, ValueError) as e:
                raise EncodeError(self.where, f"{value!r} has no usable fileno(): {e}") from None
        if not isinstance(fd, int) or fd < 0:
            raise EncodeError(self.where, f"invalid file descriptor {fd!r}")
        fds.append(fd)

    def decode(self, buf: bytes, off: int, rx: FdReader) -> Any:
        return rx.take(self._factory, self.where)


class _FlatPacker:
    """Packs a run of flat primitives with one precompiled :class:`struct.Struct`."""

    def __init__(self, codecs: Sequence[Codec]) -> None:
        self.ok = bool(codecs) and all(c.fmt is not None for c in codecs)
        if not self.ok:
            return
        self._st = struct.Struct("<" + "".join(c.fmt or "" for c in codecs))
        self._ins = [(i, c.flat_in) for i, c in enumerate(codecs) if c.flat_in is not None]
        self._outs = [(i, c.flat_out) for i, c in enumerate(codecs) if c.flat_out is not None]
        self._codecs = list(codecs)

    def pack(self, buf: bytearray, off: int, values: Sequence[Any]) -> None:
        if self._ins:
            values = list(values)
            for i, fn in self._ins:
                values[i] = fn(values[i])
        try:
            self._st.pack_into(buf, off, *values)
        except struct.error:
            # Find the field at fault, for a precise message.
            for c, v in zip(self._codecs, values, strict=True):
                try:
                    struct.pack("<" + (c.fmt or ""), v)
                except struct.error as e:
                    raise EncodeError(c.where, f"{v!r} does not fit: {e}") from None
            raise

    def unpack(self, buf: bytes, off: int) -> list[Any]:
        values = list(self._st.unpack_from(buf, off))
        for i, fn in self._outs:
            values[i] = fn(values[i])
        return values


class _StructCodec(Codec):
    def __init__(self, cls: type[Any], fields: list[tuple[str, Codec]]) -> None:
        self.where = cls.__qualname__
        self._cls = cls
        self._names = [n for n, _ in fields]
        self._codecs = [c for _, c in fields]
        self._offsets: list[int] = []
        off = 0
        for c in self._codecs:
            self._offsets.append(off)
            off += c.size
        self.size = off
        self.max_fds = sum(c.max_fds for c in self._codecs)
        self._flat = _FlatPacker(self._codecs)
        self._plain = not hasattr(cls, "__post_init__") and not hasattr(cls, "__slots__")

    def encode(self, value: Any, buf: bytearray, off: int, fds: list[int]) -> None:
        if not isinstance(value, self._cls):
            raise EncodeError(self.where, f"expected a {self.where}, got {type(value).__name__}")
        if self._flat.ok:
            self._flat.pack(buf, off, [getattr(value, n) for n in self._names])
            return
        for n, c, o in zip(self._names, self._codecs, self._offsets, strict=True):
            c.encode(getattr(value, n), buf, off + o, fds)

    def decode(self, buf: bytes, off: int, rx: FdReader) -> Any:
        if self._flat.ok:
            values = self._flat.unpack(buf, off)
        else:
            values = [
                c.decode(buf, off + o, rx) for c, o in zip(self._codecs, self._offsets, strict=True)
            ]
        if self._plain:
            # A frozen dataclass without __post_init__: filling __dict__ is what its __init__
            # does, minus one object.__setattr__ call per field.
            obj = object.__new__(self._cls)
            obj.__dict__.update(zip(self._names, values, strict=True))
            return obj
        try:
            return self._cls(*values)
        except (ValueError, TypeError) as e:  # the message's own __post_init__ refused it
            raise InvalidType(self.where, str(e)) from None


class _UnionCodec(Codec):
    def __init__(self, root: type[TaggedUnion], variants: list[_StructCodec]) -> None:
        self.where = root.__qualname__
        self._variants = variants
        self._index = {v._cls: i for i, v in enumerate(variants)}
        self.size = 1 + max((v.size for v in variants), default=0)
        self.max_fds = max((v.max_fds for v in variants), default=0)
        self._zeros = bytes(self.size)

    def encode(self, value: Any, buf: bytearray, off: int, fds: list[int]) -> None:
        tag = self._index.get(type(value))
        if tag is None:
            raise EncodeError(
                self.where, f"{type(value).__qualname__} is not a variant of {self.where}"
            )
        buf[off] = tag
        self._variants[tag].encode(value, buf, off + 1, fds)

    def decode(self, buf: bytes, off: int, rx: FdReader) -> Any:
        tag = buf[off]
        if tag >= len(self._variants):
            raise InvalidType(
                self.where, f"unknown variant tag {tag} ({len(self._variants)} variants)"
            )
        variant = self._variants[tag]
        start, end = off + 1 + variant.size, off + self.size
        if buf[start:end] != self._zeros[: end - start]:
            raise InvalidType(self.where, f"non-zero padding after variant {variant.where}")
        return variant.decode(buf, off + 1, rx)


class _Placeholder(Codec):
    """Stands for a message class while a declaration is only being checked."""


# --- building codecs from annotations ------------------------------------------------------

_lock = threading.RLock()
_codecs: dict[type[Any], Codec] = {}
_building: set[type[Any]] = set()

_REFUSED: dict[type[Any], str] = {
    int: "int has no fixed width: use u8/u16/u32/u64/usize/i8/i16/i32/i64 (or RawFd for an fd)",
    float: "float: use f32 or f64",
    str: "str has no fixed length: use Annotated[bytes, FixedBytes(n)] with an encoding",
    bytes: "bytes has no fixed length: use Annotated[bytes, FixedBytes(n)]",
    bytearray: "bytearray has no fixed length: use Annotated[bytes, FixedBytes(n)]",
    list: "list has no fixed length: use Annotated[tuple[T, ...], Array(n)]",
    tuple: "tuple[T, ...] has no fixed length: use Annotated[tuple[T, ...], Array(n)]",
    dict: "dict has no fixed size and cannot be a message field",
    set: "set has no fixed size and cannot be a message field",
    frozenset: "frozenset has no fixed size and cannot be a message field",
    object: "object has no fixed layout",
}


def _resolve(tp: Any, where: str, checking: bool) -> Codec:
    """The codec of annotation ``tp`` (``checking``: message classes become placeholders, so a
    declaration is validated without building -- and closing -- the unions it mentions)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _resolve_annotated(tp, where, checking)
    if tp is None or tp is type(None):
        return _UnitCodec(where)
    if tp is bool:
        return _BoolCodec(where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        others = [a for a in args if a is not type(None)]
        if len(others) == 1 and len(args) == 2:
            return _OptionCodec(where, _resolve(others[0], where, checking))
        raise DeclarationError(
            where, f"{tp} is an untagged union: declare a TaggedUnion (only `T | None` is allowed)"
        )
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            raise DeclarationError(where, _REFUSED[tuple])
        return _SeqCodec(
            where, [_resolve(a, f"{where}[{i}]", checking) for i, a in enumerate(args)], tuple
        )
    if origin is not None:
        base = origin if isinstance(origin, type) else None
        reason = _REFUSED.get(base) if base is not None else None
        raise DeclarationError(where, reason or f"{tp} is not a supported message field type")
    if isinstance(tp, type):
        if issubclass(tp, Msg):
            if checking:
                return _Placeholder()
            return codec_for(tp)
        if issubclass(tp, enum.Enum):
            if not issubclass(tp, int):
                raise DeclarationError(where, f"{tp.__qualname__}: use an IntEnum (or IntFlag)")
            return _EnumCodec(where, tp, _auto_enum_width(tp, where))
        factory = fd_factory(tp)
        if factory is not None:
            return _FdCodec(where, factory)
        if tp in _REFUSED:
            raise DeclarationError(where, _REFUSED[tp])
    if isinstance(tp, typing.TypeVar) or tp is typing.Any:
        raise DeclarationError(where, f"{tp} has no fixed layout")
    raise DeclarationError(where, f"{tp!r} is not a supported message field type")


def _resolve_annotated(tp: Any, where: str, checking: bool) -> Codec:
    base, *meta = typing.get_args(tp)
    # `Annotated[Color, u32]`: a marker may come wrapped in one of the aliases (u32 is
    # `Annotated[int, U32]`); take the markers out of it.
    flat: list[Any] = []
    for m in meta:
        if typing.get_origin(m) is typing.Annotated:
            flat.extend(typing.get_args(m)[1:])
        else:
            flat.append(m)
    markers = [m for m in flat if isinstance(m, Int | Float | FixedBytes | Array | FdMarker)]
    if not markers:
        return _resolve(base, where, checking)
    if len(markers) > 1:
        raise DeclarationError(where, f"more than one layout marker: {markers}")
    (m,) = markers
    if isinstance(m, Int):
        if base is int:
            return _IntCodec(where, m)
        if isinstance(base, type) and issubclass(base, enum.Enum) and issubclass(base, int):
            return _EnumCodec(where, base, m)
        raise DeclarationError(where, f"{m} applies to int or an IntEnum, not {base}")
    if isinstance(m, Float):
        if base is not float:
            raise DeclarationError(where, f"{m} applies to float, not {base}")
        return _IntCodec(where, m)
    if isinstance(m, FixedBytes):
        if base is not bytes:
            raise DeclarationError(where, f"FixedBytes applies to bytes, not {base}")
        if m.length < 0:
            raise DeclarationError(where, "FixedBytes length must not be negative")
        return _BytesCodec(where, m.length)
    if isinstance(m, FdMarker):
        if base is not int:
            raise DeclarationError(where, "RawFd is Annotated[int, FD]")
        return _FdCodec(where, None)
    # Array
    origin = typing.get_origin(base)
    args = typing.get_args(base)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        container: type[Any] = tuple
    elif origin is list and len(args) == 1:
        container = list
    else:
        raise DeclarationError(where, f"Array(n) applies to tuple[T, ...] or list[T], not {base}")
    if m.length < 0:
        raise DeclarationError(where, "Array length must not be negative")
    elem = _resolve(args[0], f"{where}[]", checking)
    return _SeqCodec(where, [elem] * m.length, container)


def _fields(cls: type[Any], strict: bool) -> list[tuple[str, Any]] | None:
    """The (name, resolved annotation) of each field, or None if a forward reference cannot be
    resolved yet (and ``strict`` is false)."""
    import dataclasses

    frame = cls.__dict__.get("__msg_frame__")
    localns = frame.f_locals if frame is not None else cls.__msg_localns__
    try:
        hints = typing.get_type_hints(cls, localns=localns, include_extras=True)
    except NameError as e:
        if strict:
            raise DeclarationError(cls.__qualname__, f"cannot resolve an annotation: {e}") from e
        return None
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


def check_declaration(cls: type[Any], frame: types.FrameType | None = None) -> None:
    """Validate a newly declared message class (raises :class:`DeclarationError`).

    ``frame`` is the frame of the class statement: when an annotation names a type that does
    not exist yet (a forward reference), the check waits for the first use, and resolves the
    names then in that frame's (by then complete) namespace.
    """
    fields = _fields(cls, strict=False)
    if fields is None:
        cls.__msg_frame__ = frame
        return
    for name, tp in fields:
        _resolve(tp, f"{cls.__qualname__}.{name}", checking=True)


def codec_for(tp: Any) -> Codec:
    """The (cached) codec of a message type or field annotation."""
    try:
        codec = _codecs.get(tp)
    except TypeError:  # an unhashable annotation
        codec = None
    if codec is not None:
        return codec
    if isinstance(tp, type) and issubclass(tp, Msg):
        with _lock:
            return _build_msg(tp)
    codec = _resolve(tp, getattr(tp, "__qualname__", repr(tp)), checking=False)
    try:
        _codecs[tp] = codec
    except TypeError:
        pass
    return codec


def _build_msg(cls: type[Any]) -> Codec:
    cached = _codecs.get(cls)
    if cached is not None:
        return cached
    if cls in _building:
        raise DeclarationError(
            cls.__qualname__, "a message type contains itself, so it has no fixed size"
        )
    if cls is TaggedUnion or cls is Msg:
        raise DeclarationError(cls.__qualname__, "not a message type: subclass it")
    _building.add(cls)
    try:
        if TaggedUnion in cls.__bases__:
            variants = list(cls.__msg_variants__)
            if not variants:
                raise DeclarationError(cls.__qualname__, "a TaggedUnion needs at least one variant")
            built = [_build_msg(v) for v in variants]
            codec: Codec = _UnionCodec(cls, typing.cast(list[_StructCodec], built))
            cls.__msg_closed__ = True
        else:
            fields = _fields(cls, strict=True)
            assert fields is not None
            codec = _StructCodec(
                cls,
                [(n, _resolve(tp, f"{cls.__qualname__}.{n}", False)) for n, tp in fields],
            )
        if codec.max_fds > MAX_FDS:
            raise DeclarationError(
                cls.__qualname__, f"carries up to {codec.max_fds} fds; Linux passes {MAX_FDS}"
            )
        _codecs[cls] = codec
        if "__msg_frame__" in cls.__dict__:
            del cls.__msg_frame__  # resolved: do not keep the declaring frame alive
        return codec
    finally:
        _building.discard(cls)


# --- public helpers --------------------------------------------------------------------------


def msg_size(tp: Any) -> int:
    """The fixed size of ``tp``'s encoding in bytes (crosvm's ``msg_size()``)."""
    return codec_for(tp).size


def wire_size(tp: Any) -> int:
    """The packet size on the socket: ``msg_size``, except that a 0-byte message travels as one
    zero byte (a 0-byte SOCK_SEQPACKET packet would read as a hang-up)."""
    return max(1, codec_for(tp).size)


def max_fd_count(tp: Any) -> int:
    """The most fds a value of ``tp`` carries (crosvm's ``max_fd_count()``)."""
    return codec_for(tp).max_fds


def encode(tp: Any, value: Any) -> tuple[bytes, list[int]]:
    """Encode ``value`` as a ``tp``: its wire bytes and the fds to send with them (borrowed from
    the value, not duplicated: keep the value alive until the send is done)."""
    codec = codec_for(tp)
    buf = bytearray(max(1, codec.size))
    fds: list[int] = []
    codec.encode(value, buf, 0, fds)
    return bytes(buf), fds


@overload
def decode(tp: type[T], data: bytes, fds: Sequence[int] = ()) -> T: ...
@overload
def decode(tp: Any, data: bytes, fds: Sequence[int] = ()) -> Any: ...
def decode(tp: Any, data: bytes, fds: Sequence[int] = ()) -> Any:
    """Decode one ``tp`` from ``data`` and the received ``fds``, taking ownership of the fds.

    Raises a :class:`~msg_socket.errors.MsgError` for any malformed input; every fd in ``fds``
    has been closed by then (including any object the decode had already built from one).
    """
    rx = FdReader(fds)
    try:
        codec = codec_for(tp)
        size = codec.size
        if len(data) != (size or 1):
            raise BadRecvSize(size or 1, len(data))
        if size == 0 and data != b"\0":
            raise InvalidType(codec.where, "the byte of an empty message is not zero")
        value = codec.decode(data, 0, rx)
        if rx.pos != len(fds):
            raise NotExpectFd(rx.pos, len(fds))
        return value
    except BaseException:
        rx.close_all()
        raise
