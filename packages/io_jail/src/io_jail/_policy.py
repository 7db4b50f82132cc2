"""Parser of minijail's seccomp ``.policy`` syntax.

One rule per line (``\\`` continues a line, ``#`` starts a comment)::

    read: 1                                  # always allowed
    openat: return ENOENT                    # fails with an errno, never runs
    mmap: arg2 in ~PROT_EXEC                 # allowed when the expression holds, else killed
    ioctl: arg1 == FIONBIO || arg1 == 0x1277; return ENOTTY   # ... else fails with ENOTTY
    @include ./common_device.policy

Expressions are in disjunctive normal form: ``||`` of ``&&`` of atoms ``argN OP VALUE`` with OP in
``== != < <= > >= & in``; VALUE is a number, a named constant, ``~VALUE``, ``(VALUE)`` or an
``|`` of those. Any syscall not named is refused with the policy's default action. Every error
names the file and the line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from io_jail._constants import CONSTANTS, ERRNOS
from io_jail._syscalls_x86_64 import SYSCALLS
from io_jail.errors import PolicyError
from sys_util.jail import (
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    SECCOMP_RET_KILL_PROCESS,
    SECCOMP_RET_KILL_THREAD,
    SECCOMP_RET_LOG,
    SECCOMP_RET_TRAP,
)

__all__ = ["OPERATORS", "SYSCALL_NAMES", "Atom", "Policy", "Rule", "syscall_name", "syscall_number"]

MASK64 = (1 << 64) - 1
OPERATORS = ("==", "!=", "<", "<=", ">", ">=", "&", "in")
#: number -> name for x86_64.
SYSCALL_NAMES: dict[int, str] = {nr: name for name, nr in SYSCALLS.items()}
_MAX_INCLUDE_DEPTH = 8

_ACTIONS = {
    "allow": SECCOMP_RET_ALLOW,
    "kill": SECCOMP_RET_KILL_PROCESS,
    "kill-process": SECCOMP_RET_KILL_PROCESS,
    "kill-thread": SECCOMP_RET_KILL_THREAD,
    "trap": SECCOMP_RET_TRAP,
    "log": SECCOMP_RET_LOG,
}

_TOKEN = re.compile(
    r"\s*(?:(?P<num>0[xX][0-9a-fA-F]+|\d+)|(?P<arg>arg[0-5])\b|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>&&|\|\||==|!=|<=|>=|<|>|&|\||~|\(|\)|-))"
)


def syscall_number(name: str) -> int:
    """The x86_64 number of ``name``; ``KeyError`` if unknown."""
    return SYSCALLS[name]


def syscall_name(nr: int) -> str:
    """The x86_64 name of syscall ``nr`` (``"syscall_<nr>"`` if unknown)."""
    return SYSCALL_NAMES.get(nr, f"syscall_{nr}")


@dataclass(frozen=True, slots=True)
class Atom:
    """``arg<arg> <op> <value>`` on the 64-bit argument register."""

    arg: int
    op: str
    value: int

    def holds(self, args: tuple[int, ...] | list[int]) -> bool:
        """Evaluate against concrete arguments (reference semantics for the compiler's tests)."""
        a = args[self.arg] & MASK64
        v = self.value
        match self.op:
            case "==":
                return a == v
            case "!=":
                return a != v
            case "<":
                return a < v
            case "<=":
                return a <= v
            case ">":
                return a > v
            case ">=":
                return a >= v
            case "&":
                return a & v != 0
            case _:  # in: every set bit of the argument is allowed by the mask
                return a & ~v & MASK64 == 0


@dataclass(frozen=True, slots=True)
class Rule:
    """What a policy says about one syscall.

    ``clauses`` is ``None`` for an unconditional rule; otherwise the call gets ``action`` when any
    clause (an AND of atoms) holds, and ``otherwise`` (``None``: the policy default) when none does.
    """

    name: str
    nr: int
    clauses: tuple[tuple[Atom, ...], ...] | None
    action: int
    otherwise: int | None
    path: str
    line: int

    def decide(self, args: tuple[int, ...] | list[int], default: int) -> int:
        if self.clauses is None or any(all(a.holds(args) for a in c) for c in self.clauses):
            return self.action
        return default if self.otherwise is None else self.otherwise


@dataclass
class Policy:
    """A parsed policy: syscall number -> :class:`Rule`."""

    rules: dict[int, Rule] = field(default_factory=dict)

    @classmethod
    def parse_file(cls, path: str | os.PathLike[str]) -> Policy:
        policy = cls()
        policy._load(Path(path), ())
        return policy

    @classmethod
    def parse(cls, text: str, name: str = "<policy>", base_dir: str | None = None) -> Policy:
        """Parse policy text; ``@include`` paths are relative to ``base_dir`` (default: cwd)."""
        policy = cls()
        policy._parse_text(text, name, Path(base_dir or os.getcwd()), ())
        return policy

    def decide(self, nr: int, args: tuple[int, ...] | list[int], default: int) -> int:
        """The action the policy gives syscall ``nr`` with ``args`` (reference semantics)."""
        rule = self.rules.get(nr)
        return default if rule is None else rule.decide(args, default)

    @property
    def names(self) -> list[str]:
        return sorted(r.name for r in self.rules.values())

    # -- parsing ---------------------------------------------------------------------------

    def _load(
        self, path: Path, stack: tuple[Path, ...], where: tuple[str, int] | None = None
    ) -> None:
        resolved = path.resolve()
        if resolved in stack:
            assert where is not None
            chain = " -> ".join(str(p) for p in (*stack, resolved))
            raise PolicyError(where[0], where[1], f"@include loop: {chain}")
        if len(stack) >= _MAX_INCLUDE_DEPTH:
            assert where is not None
            raise PolicyError(where[0], where[1], "@include nested too deeply")
        try:
            text = resolved.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            if where is None:
                raise PolicyError(str(path), 0, f"cannot read policy: {err}") from err
            raise PolicyError(where[0], where[1], f"cannot read {path}: {err}") from err
        self._parse_text(text, str(path), resolved.parent, (*stack, resolved))

    def _parse_text(self, text: str, name: str, base: Path, stack: tuple[Path, ...]) -> None:
        for lineno, line in _logical_lines(text):
            if line.startswith("@"):
                self._directive(line, name, lineno, base, stack)
                continue
            rule = _parse_rule(line, name, lineno)
            old = self.rules.get(rule.nr)
            if old is not None:
                raise PolicyError(
                    name, lineno, f"syscall {rule.name} redefined (first at {old.path}:{old.line})"
                )
            self.rules[rule.nr] = rule

    def _directive(
        self, line: str, name: str, lineno: int, base: Path, stack: tuple[Path, ...]
    ) -> None:
        word, _, rest = line.partition(" ")
        rest = rest.strip()
        if word == "@include":
            if not rest:
                raise PolicyError(name, lineno, "@include needs a path")
            target = Path(rest)
            if not target.is_absolute():
                target = base / target
            self._load(target, stack, (name, lineno))
        elif word == "@frequency":
            return  # ordering hints only; our dispatch does not use them
        else:
            raise PolicyError(name, lineno, f"unknown directive {word}")


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Yield (first line number, text) with comments stripped and continuations joined."""
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].rstrip()
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            yield start, full
    if pending.strip():
        yield start, pending.strip()


def _parse_rule(line: str, path: str, lineno: int) -> Rule:
    def fail(reason: str) -> PolicyError:
        return PolicyError(path, lineno, reason)

    head, sep, body = line.partition(":")
    head, body = head.strip(), body.strip()
    if not sep or not head:
        raise fail(f"expected 'syscall: expression', got {line!r}")
    if head.isdigit():
        nr = int(head)
        name = syscall_name(nr)
    elif head in SYSCALLS:
        nr, name = SYSCALLS[head], head
    else:
        raise fail(f"unknown syscall {head!r}")
    if not body:
        raise fail(f"{name}: empty expression")

    expr, semi, otherwise_text = body.partition(";")
    expr = expr.strip()
    otherwise: int | None = None
    if semi:
        otherwise = _parse_action(otherwise_text.strip(), fail)
        if otherwise is None:
            raise fail(f"{name}: expected an action after ';', got {otherwise_text.strip()!r}")
    action = _parse_action(expr, fail)
    if action is not None:
        if semi:
            raise fail(f"{name}: an action cannot have an ';' alternative")
        return Rule(name, nr, None, action, None, path, lineno)
    clauses = _ExprParser(expr, fail).parse()
    return Rule(name, nr, clauses, SECCOMP_RET_ALLOW, otherwise, path, lineno)


def _parse_action(text: str, fail: object) -> int | None:
    """Return the action for ``1``/``allow``/``kill``/.../``return ERRNO``, else None."""
    if text == "1":
        return SECCOMP_RET_ALLOW
    if text in _ACTIONS:
        return _ACTIONS[text]
    if text.startswith("return"):
        value = text[len("return") :].strip()
        if value in ERRNOS:
            code = ERRNOS[value]
        elif value.isdigit():
            code = int(value)
        else:
            assert callable(fail)
            raise fail(f"unknown errno {value!r} in {text!r}")
        if not 0 <= code <= 0xFFFF:
            assert callable(fail)
            raise fail(f"errno {code} out of range")
        return SECCOMP_RET_ERRNO | code
    return None


class _ExprParser:
    def __init__(self, text: str, fail: object) -> None:
        self.fail = fail
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        text = text.rstrip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                raise self._err(f"unexpected character {text[pos:].lstrip()[:1]!r}")
            kind = m.lastgroup
            assert kind is not None
            self.tokens.append((kind, m.group(kind)))
            pos = m.end()
        self.i = 0

    def _err(self, reason: str) -> PolicyError:
        assert callable(self.fail)
        err = self.fail(reason)
        assert isinstance(err, PolicyError)
        return err

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise self._err("unexpected end of expression")
        self.i += 1
        return tok

    def parse(self) -> tuple[tuple[Atom, ...], ...]:
        clauses = [self.clause()]
        while self.peek() == ("op", "||"):
            self.i += 1
            clauses.append(self.clause())
        tok = self.peek()
        if tok is not None:
            raise self._err(f"unexpected {tok[1]!r}")
        return tuple(clauses)

    def clause(self) -> tuple[Atom, ...]:
        atoms = [self.atom()]
        while self.peek() == ("op", "&&"):
            self.i += 1
            atoms.append(self.atom())
        return tuple(atoms)

    def atom(self) -> Atom:
        kind, text = self.take()
        if kind != "arg":
            raise self._err(f"expected argN, got {text!r}")
        kind, op = self.take()
        if not ((kind == "op" and op in OPERATORS) or (kind == "ident" and op == "in")):
            raise self._err(f"expected a comparison operator after {text}, got {op!r}")
        return Atom(int(text[3:]), op, self.value())

    def value(self) -> int:
        result = self.term()
        while self.peek() == ("op", "|"):
            self.i += 1
            result |= self.term()
        return result

    def term(self) -> int:
        kind, text = self.take()
        if kind == "num":
            value = (
                int(text, 0)
                if not (len(text) > 1 and text[0] == "0" and text[1].isdigit())
                else int(text, 8)
            )
        elif kind == "ident":
            if text not in CONSTANTS:
                raise self._err(f"unknown constant {text!r}")
            value = CONSTANTS[text]
        elif (kind, text) == ("op", "~"):
            return ~self.term() & MASK64
        elif (kind, text) == ("op", "-"):
            return -self.term() & MASK64
        elif (kind, text) == ("op", "("):
            value = self.value()
            if self.take() != ("op", ")"):
                raise self._err("expected ')'")
        else:
            raise self._err(f"expected a value, got {text!r}")
        if value > MASK64:
            raise self._err(f"value {value:#x} does not fit 64 bits")
        return value & MASK64
