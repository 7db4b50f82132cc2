"""A Minijail for Python: namespaces, pivot_root, capabilities and seccomp policies.

:class:`Minijail` describes a jail and forks a child into it; :class:`Policy` parses minijail's
seccomp policy files and :func:`compile_policy` turns one into a classic-BPF program (ours, in
pure Python; :func:`simulate` runs one); :func:`wait_for_jailed` reports how a jailed child
ended, naming the syscall seccomp refused when the jail logs failures.
"""

from io_jail.__about__ import __version__
from io_jail._bpf import BPF_MAXINSNS, compile_policy, disassemble, simulate
from io_jail._constants import CONSTANTS, ERRNOS
from io_jail._jail import Minijail
from io_jail._policy import Atom, Policy, Rule, syscall_name, syscall_number
from io_jail._report import JailExit, SeccompReport, decode_wait_status, wait_for_jailed
from io_jail.errors import (
    CompileError,
    Error,
    JailSetupError,
    NotSingleThreaded,
    PolicyError,
)

__all__ = [
    "BPF_MAXINSNS",
    "CONSTANTS",
    "ERRNOS",
    "Atom",
    "CompileError",
    "Error",
    "JailExit",
    "JailSetupError",
    "Minijail",
    "NotSingleThreaded",
    "Policy",
    "PolicyError",
    "Rule",
    "SeccompReport",
    "__version__",
    "compile_policy",
    "decode_wait_status",
    "disassemble",
    "simulate",
    "syscall_name",
    "syscall_number",
    "wait_for_jailed",
]
