"""Errors raised by io_jail. Every error of this package derives from :class:`Error`."""

from __future__ import annotations


class Error(Exception):
    """Base class of every io_jail error."""


class PolicyError(Error, ValueError):
    """A seccomp policy file is malformed; ``str()`` is ``file:line: reason``."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason

    def __reduce__(self) -> tuple[type[PolicyError], tuple[str, int, str]]:
        return (type(self), (self.path, self.line, self.reason))


class CompileError(Error):
    """A policy cannot be turned into a BPF program (for example, it is too long)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __reduce__(self) -> tuple[type[CompileError], tuple[str]]:
        return (type(self), (self.reason,))


class JailSetupError(Error):
    """A jail step failed in the child (reported to the parent before the child exits)."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"jail setup failed at {step}: {reason}")
        self.step = step
        self.reason = reason

    def __reduce__(self) -> tuple[type[JailSetupError], tuple[str, str]]:
        return (type(self), (self.step, self.reason))


class NotSingleThreaded(Error):
    """``fork()`` was called while other Python threads run (their locks would be copied held)."""

    def __init__(self, threads: int) -> None:
        super().__init__(
            f"Minijail.fork() needs a single-threaded process, but {threads} threads are running: "
            "fork every jailed child before starting vCPU or worker threads"
        )
        self.threads = threads

    def __reduce__(self) -> tuple[type[NotSingleThreaded], tuple[int]]:
        return (type(self), (self.threads,))
