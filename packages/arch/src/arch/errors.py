"""Errors raised by arch. Every error of this package derives from :class:`Error`."""


class Error(Exception):
    """Base class of every arch error."""
