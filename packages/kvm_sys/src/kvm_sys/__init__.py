"""Raw KVM constants, struct layouts and ioctl numbers, compiled from <linux/kvm.h> with cffi."""

from kvm_sys.__about__ import __version__
from kvm_sys.errors import Error

__all__ = ["Error", "__version__"]
