"""Errors raised by msg_socket. Every error of this package derives from :class:`Error`."""


class Error(Exception):
    """Base class of every msg_socket error."""
