"""Errors raised by devices. Every error of this package derives from :class:`Error`."""


class Error(Exception):
    """Base class of every devices error."""
