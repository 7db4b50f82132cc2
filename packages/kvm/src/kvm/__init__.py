"""A safe, fast Python binding of the Linux KVM API: Kvm, Vm, Vcpu."""

from kvm.__about__ import __version__
from kvm.errors import Error

__all__ = ["Error", "__version__"]
