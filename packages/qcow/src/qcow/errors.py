"""Errors raised by qcow. Every error of this package derives from :class:`Error`."""


class Error(Exception):
    """Base class of every qcow error."""
