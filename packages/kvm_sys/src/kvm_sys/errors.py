"""Errors raised by kvm_sys. Every error of this package derives from :class:`Error`."""


class Error(Exception):
    """Base class of every kvm_sys error."""
