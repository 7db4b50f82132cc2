"""Errors raised by kvm. Every error of this package derives from :class:`Error`."""


class Error(Exception):
    """Base class of every kvm error."""
