"""VM construction for x86_64: kernel loading, memory layout, boot state."""

from arch.__about__ import __version__
from arch.errors import Error

__all__ = ["Error", "__version__"]
