"""Message declarations: :class:`Msg` (a struct) and :class:`TaggedUnion` (an enum with payloads).

A message is declared once, as a frozen dataclass whose annotations give the wire layout::

    class Adjust(Msg):
        num_bytes: u64

    class VmRequest(TaggedUnion):      # the union: no fields of its own
        pass

    class Exit(VmRequest):             # variant 0
        pass

    class Balloon(VmRequest):          # variant 1
        command: Adjust

The layout is checked when the class is created, so an unbounded field type (``str``, ``list``,
a plain ``int``) fails at import time, not when the first message is sent. A union's variants
are numbered in the order their classes are defined; once the union has been used to encode or
decode, its variant list is closed (a late variant would change the size of every message).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any, ClassVar, dataclass_transform

from msg_socket.errors import DeclarationError

__all__ = ["Msg", "TaggedUnion", "Unit"]


@dataclass_transform(frozen_default=True)
class Msg:
    """Base class of fixed-layout messages: its subclasses become frozen dataclasses whose fields
    are encoded back to back, in declaration order, with no padding."""

    # Per-class bookkeeping, set by __init_subclass__ (never by the user).
    __msg_localns__: ClassVar[dict[str, Any]] = {}
    __msg_union_root__: ClassVar[type[TaggedUnion] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The namespace of the class statement resolves string annotations of classes
        # declared inside functions (tests, local helper types).
        frame = sys._getframe(1)
        cls.__msg_localns__ = dict(frame.f_locals) if frame.f_locals is not frame.f_globals else {}
        union_base = globals().get("TaggedUnion")
        if union_base is None:
            return  # TaggedUnion itself, being defined below
        if union_base in cls.__bases__:
            _declare_union_root(cls)
            return
        root = _union_root_of(cls)
        if root is not None:
            _declare_variant(root, cls)
        dataclasses.dataclass(frozen=True)(cls)
        if inspect.get_annotations(cls):  # inherited fields were checked already
            from msg_socket._codec import check_declaration

            check_declaration(cls, frame)


class TaggedUnion(Msg):
    """Base class of tagged unions (crosvm's enums with payloads).

    A direct subclass is the union; subclasses of *that* are its variants, each a :class:`Msg`
    with its own fields. On the wire: byte 0 is the variant's index in definition order, then
    the variant's fields; every value of the union has the size of the largest variant + 1.
    """

    __msg_variants__: ClassVar[list[type[Any]]] = []
    __msg_closed__: ClassVar[bool] = False


def _declare_union_root(cls: type[Any]) -> None:
    own = {k for k, v in inspect.get_annotations(cls).items() if "ClassVar" not in str(v)}
    if own:
        raise DeclarationError(
            cls.__qualname__,
            f"a TaggedUnion has no fields of its own (found {sorted(own)}); "
            "declare the fields on its variants",
        )
    cls.__msg_variants__ = []
    cls.__msg_closed__ = False
    cls.__msg_union_root__ = cls

    def _no_instances(self: Any, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{cls.__qualname__} is a union: instantiate one of its variants")

    cls.__init__ = _no_instances


def _union_root_of(cls: type[Any]) -> type[TaggedUnion] | None:
    for base in cls.__mro__[1:]:
        if isinstance(base, type) and TaggedUnion in base.__bases__:
            return base
    return None


def _declare_variant(root: type[TaggedUnion], cls: type[Any]) -> None:
    if root not in cls.__bases__:
        raise DeclarationError(
            cls.__qualname__,
            f"variants of {root.__qualname__} must subclass it directly",
        )
    if root.__msg_closed__:
        raise DeclarationError(
            cls.__qualname__,
            f"{root.__qualname__} has already been used to encode or decode, so its variant "
            "list is closed; declare every variant before the first message",
        )
    if len(root.__msg_variants__) >= 256:
        raise DeclarationError(cls.__qualname__, "a union has at most 256 variants (u8 tag)")
    root.__msg_variants__.append(cls)
    cls.__msg_union_root__ = root


class Unit(Msg):
    """The empty message (crosvm's ``()``): no bytes, no fds. A socket direction that carries
    nothing meaningful (a fire-and-forget command's "response") uses it."""
