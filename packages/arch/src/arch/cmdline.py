"""The kernel command line: a validating builder.

Why a builder rather than a string: the command line is assembled from several sources (the
user's ``-p``, the console choice, ``root=``, virtio-mmio device descriptions), it must fit the
kernel's limit (``setup_header.cmdline_size``; 2047 bytes plus NUL on x86 without a header), and a
stray NUL, control character or non-ASCII byte would be silently truncated or mangled by the
kernel's parser. Errors are raised where the bad piece is added, with a one-line message.
"""

from __future__ import annotations

from arch.errors import CmdlineError, CmdlineTooLong

__all__ = ["DEFAULT_CMDLINE_LIMIT", "Cmdline", "validate_text"]

#: x86 COMMAND_LINE_SIZE is 2048 including the terminating NUL.
DEFAULT_CMDLINE_LIMIT = 2047

_PRINTABLE = frozenset(range(0x20, 0x7F))


def validate_text(text: str, what: str = "command line") -> None:
    """Raise :class:`CmdlineError` unless ``text`` is printable ASCII (space allowed, no NUL)."""
    for pos, char in enumerate(text):
        if ord(char) not in _PRINTABLE:
            raise CmdlineError(
                f"{what} has a non-printable or non-ASCII character {char!r} at position {pos}"
            )


def _validate_key(key: str) -> None:
    if not key:
        raise CmdlineError("empty parameter name")
    validate_text(key, f"parameter name {key!r}")
    for bad in (" ", "=", '"'):
        if bad in key:
            raise CmdlineError(f"parameter name {key!r} contains {bad!r}")


def _format_value(key: str, value: str) -> str:
    validate_text(value, f"value of {key!r}")
    if '"' in value:
        raise CmdlineError(f"value of {key!r} contains a double quote")
    if " " in value:
        # The kernel's parser (lib/cmdline.c next_arg) keeps quoted values together.
        return f'"{value}"'
    return value


class Cmdline:
    """A kernel command line under construction.

    Args:
        limit: the longest command line the kernel accepts, without the terminating NUL
            (``setup_header.cmdline_size`` for boot protocol >= 2.06).

    Example:
        >>> c = Cmdline()
        >>> c.insert("console", "ttyS0")
        >>> c.insert("quiet")
        >>> str(c)
        'console=ttyS0 quiet'
    """

    __slots__ = ("_limit", "_parts")

    def __init__(self, limit: int = DEFAULT_CMDLINE_LIMIT) -> None:
        if limit < 1:
            raise CmdlineError(f"limit {limit} must be at least 1")
        self._limit = limit
        self._parts: list[str] = []

    @property
    def limit(self) -> int:
        """Maximum length without the terminating NUL."""
        return self._limit

    def _append(self, part: str) -> None:
        new_len = len(self) + (1 if self._parts else 0) + len(part)
        if new_len > self._limit:
            raise CmdlineTooLong(new_len, self._limit)
        self._parts.append(part)

    def insert(self, key: str, value: str | int | None = None) -> None:
        """Append ``key`` (a flag) or ``key=value``; values with spaces are quoted."""
        _validate_key(key)
        if value is None:
            self._append(key)
        else:
            self._append(f"{key}={_format_value(key, str(value))}")

    def insert_str(self, text: str) -> None:
        """Append free text (the user's ``-p``), validated but otherwise kept as written."""
        validate_text(text)
        text = text.strip(" ")
        if text:
            self._append(text)

    def __len__(self) -> int:
        if not self._parts:
            return 0
        return sum(len(p) for p in self._parts) + len(self._parts) - 1

    def __str__(self) -> str:
        return " ".join(self._parts)

    def __repr__(self) -> str:
        return f"Cmdline({str(self)!r}, limit={self._limit})"

    def to_bytes(self) -> bytes:
        """The command line as the kernel reads it: ASCII, NUL-terminated."""
        return str(self).encode("ascii") + b"\0"

    def with_limit(self, limit: int) -> Cmdline:
        """A copy checked against a different limit (once the kernel's own limit is known)."""
        copy = Cmdline(limit)
        if len(self) > limit:
            raise CmdlineTooLong(len(self), limit)
        copy._parts = list(self._parts)
        return copy
