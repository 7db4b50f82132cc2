"""Errors raised by crosvm. Every error of this package derives from :class:`Error`."""


class Error(Exception):
    """Base class of every crosvm error."""
