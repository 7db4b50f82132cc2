"""Errors raised by sys_util. Every error of this package derives from :class:`Error`."""


class Error(Exception):
    """Base class of every sys_util error."""
