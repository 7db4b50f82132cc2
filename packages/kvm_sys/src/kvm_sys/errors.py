"""Errors raised by kvm_sys. Every error of this package derives from :class:`Error`."""

from __future__ import annotations


class Error(Exception):
    """Base class of every kvm_sys error."""


class VersionMismatch(Error):
    """The compiled ``_native`` module was built for another version of this package.

    A stale ``.so`` left by an old editable install could carry other struct layouts; rebuild
    with ``pip install -e packages/kvm_sys``.
    """

    def __init__(self, built: str, expected: str) -> None:
        super().__init__(
            f"kvm_sys._native was built for kvm_sys {built}, but kvm_sys is {expected}: rebuild it"
        )
        self.built = built
        self.expected = expected

    def __reduce__(self) -> tuple[type[VersionMismatch], tuple[str, str]]:
        return (type(self), (self.built, self.expected))
