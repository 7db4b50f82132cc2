"""Errors raised by io_jail. Every error of this package derives from :class:`Error`."""


class Error(Exception):
    """Base class of every io_jail error."""
