"""The BPF compiler: same verdicts as the policy's reference semantics, as libseccomp, and as
the kernel itself."""

from __future__ import annotations

import errno
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from io_jail import (
    BPF_MAXINSNS,
    Atom,
    CompileError,
    Policy,
    Rule,
    compile_policy,
    disassemble,
    simulate,
    syscall_number,
)
from sys_util import jail as sj

KILL = sj.SECCOMP_RET_KILL_PROCESS
ALLOW = sj.SECCOMP_RET_ALLOW
TRAP = sj.SECCOMP_RET_TRAP
EPERM_ACTION = sj.SECCOMP_RET_ERRNO | errno.EPERM
OPS = ("==", "!=", "<", "<=", ">", ">=", "&", "in")

# Values at the edges of both 32-bit halves, where a two-word comparison can go wrong.
_EDGES = [0, 1, 2, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 32, (1 << 32) + 1]
_EDGES += [(1 << 63), (1 << 64) - 1, (1 << 64) - 2, 0xFFFF_FFFF_0000_0000, 0x1_0000_0001]
values = st.one_of(st.sampled_from(_EDGES), st.integers(0, (1 << 64) - 1), st.integers(0, 40))
atoms = st.builds(Atom, st.integers(0, 5), st.sampled_from(OPS), values)
clauses = st.lists(st.lists(atoms, min_size=1, max_size=3).map(tuple), min_size=1, max_size=3)


def _rule(name: str, cl: list[tuple[Atom, ...]] | None, otherwise: int | None = None) -> Rule:
    return Rule(
        name, syscall_number(name), None if cl is None else tuple(cl), ALLOW, otherwise, "<t>", 1
    )


def _near(v: int) -> list[int]:
    return [x & ((1 << 64) - 1) for x in (v - 1, v, v + 1, v ^ (1 << 32), v >> 32, v << 32)]


@settings(max_examples=80, deadline=None)
@given(cl=clauses, data=st.data())
def test_compiled_program_matches_reference_semantics(
    cl: list[tuple[Atom, ...]], data: st.DataObject
) -> None:
    policy = Policy({syscall_number("ioctl"): _rule("ioctl", cl, EPERM_ACTION)})
    policy.rules[0] = _rule("read", None)
    program = compile_policy(policy, KILL)
    chosen = [a.value for c in cl for a in c]
    for _ in range(20):
        args = [
            data.draw(st.one_of(values, st.sampled_from(_near(data.draw(st.sampled_from(chosen))))))
            for _ in range(6)
        ]
        expected = policy.decide(syscall_number("ioctl"), args, KILL)
        assert simulate(program, syscall_number("ioctl"), args) == expected, (cl, args)
    assert simulate(program, 0, [5]) == ALLOW
    assert simulate(program, syscall_number("socket"), [2]) == KILL


def test_program_checks_arch_first_and_refuses_x32() -> None:
    program = compile_policy(Policy.parse("read: 1\n"), TRAP)
    first = disassemble(program)[:3]
    assert first[0] == (0x20, 0, 0, 4)  # ld [arch]
    assert first[1][3] == sj.AUDIT_ARCH_X86_64
    assert simulate(program, 0, arch=0x40000003) == KILL  # i386: never, whatever the mode
    assert simulate(program, 0) == ALLOW
    assert simulate(program, 0x4000_0000 | 0) == TRAP  # x32 read
    assert simulate(program, 1) == TRAP


def test_long_policies_use_far_jumps_and_overlong_ones_fail() -> None:
    names = ("read", "write", "close", "fstat", "mmap", "munmap", "brk", "futex")
    body = " || ".join(f"arg0 == {i}" for i in range(60))
    policy = Policy.parse("".join(f"{n}: {body}\n" for n in names))
    program = compile_policy(policy)
    assert len(program) // 8 > 1000
    assert simulate(program, syscall_number("futex"), [59]) == ALLOW
    assert simulate(program, syscall_number("futex"), [60]) == KILL
    huge = " || ".join(f"arg0 == {i}" for i in range(900))
    with pytest.raises(CompileError, match="max 4096"):
        compile_policy(Policy.parse(f"read: {huge}\n"))
    assert BPF_MAXINSNS == 4096


# -- against libseccomp ------------------------------------------------------------------------


def _libseccomp_rules(policy: Policy) -> list[tuple[int, int, list[tuple[int, str, int, int]]]]:
    out: list[tuple[int, int, list[tuple[int, str, int, int]]]] = []
    for rule in policy.rules.values():
        if rule.clauses is None:
            out.append((rule.action, rule.nr, []))
            continue
        for clause in rule.clauses:
            cmps = []
            for a in clause:
                if a.op == "in":
                    cmps.append((a.arg, "masked==", ~a.value & ((1 << 64) - 1), 0))
                elif a.op == "&":  # single-bit masks only (libseccomp has no "masked != 0")
                    cmps.append((a.arg, "masked==", a.value, a.value))
                else:
                    cmps.append((a.arg, a.op, a.value, 0))
            out.append((rule.action, rule.nr, cmps))
    return out


single_bit = st.integers(0, 63).map(lambda b: 1 << b)
lib_atom = st.one_of(
    st.builds(
        Atom, st.integers(0, 5), st.sampled_from(("==", "!=", "<", "<=", ">", ">=", "in")), values
    ),
    st.builds(Atom, st.integers(0, 5), st.just("&"), single_bit),
)


@settings(max_examples=40, deadline=None)
@given(
    cl=st.lists(
        st.lists(lib_atom, min_size=1, max_size=3, unique_by=lambda a: a.arg).map(tuple),
        min_size=1,
        max_size=3,
    ),
    data=st.data(),
)
def test_same_verdicts_as_libseccomp(cl: list[tuple[Atom, ...]], data: st.DataObject) -> None:
    try:
        sj.libseccomp_export_bpf(KILL, [])
    except OSError as err:  # pragma: no cover - libseccomp missing
        pytest.skip(f"libseccomp unavailable: {err}")
    policy = Policy({syscall_number("fcntl"): _rule("fcntl", cl)})
    policy.rules[0] = _rule("read", None)
    ours = compile_policy(policy, KILL)
    theirs = sj.libseccomp_export_bpf(KILL, _libseccomp_rules(policy))
    chosen = [a.value for c in cl for a in c]
    for _ in range(25):
        args = [
            data.draw(st.one_of(values, st.sampled_from(_near(data.draw(st.sampled_from(chosen))))))
            for _ in range(6)
        ]
        nr = syscall_number("fcntl")
        assert simulate(ours, nr, args) == simulate(theirs, nr, args), (cl, args)
    for nr in (0, 1, 41):  # (x32 numbers: libseccomp answers with its bad-arch action)
        assert simulate(ours, nr) == simulate(theirs, nr)


# -- against the kernel -------------------------------------------------------------------------

_RUNTIME = "".join(
    f"{n}: 1\n"
    for n in (
        "read",
        "write",
        "close",
        "mmap",
        "munmap",
        "brk",
        "madvise",
        "mprotect",
        "futex",
        "exit",
        "exit_group",
        "rt_sigprocmask",
        "rt_sigaction",
        "getpid",
        "gettid",
        "fstat",
        "newfstatat",
    )
)


@pytest.mark.parametrize(
    "expr",
    [
        "arg1 == 4096",
        "arg1 != -1 && arg2 == SEEK_END",
        "arg1 > 0x100000000 || arg2 in 1",
        "arg1 < 4096 && arg2 <= 1",
        "arg1 >= 0xffffffff00000000 || arg1 & 0x80000000",
    ],
)
def test_kernel_enforces_the_same_verdicts(expr: str, tmp_path: object) -> None:
    cases = [
        (off, whence)
        for off in (
            0,
            1,
            4095,
            4096,
            0x7FFF_FFFF,
            0x8000_0000,
            0xFFFF_FFFF,
            1 << 32,
            (1 << 32) + 1,
            -1,
            -4096,
            -(1 << 32),
        )
        for whence in (0, 1, 2)
    ]
    policy = Policy.parse(_RUNTIME + f"lseek: {expr}; return EPERM\n")
    program = compile_policy(policy, KILL)
    nr = syscall_number("lseek")
    expected = bytes(
        simulate(program, nr, [3, off & ((1 << 64) - 1), w]) == EPERM_ACTION for off, w in cases
    )
    r, w = os.pipe()
    fd = os.open("/dev/zero", os.O_RDONLY)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            sj.set_no_new_privs()
            sj.seccomp_set_filter(program)
            out = bytearray()
            for off, whence in cases:
                try:
                    os.lseek(fd, off, whence)
                    out.append(0)
                except OSError as err:
                    out.append(err.errno == errno.EPERM)
            os.write(w, bytes(out))
            os._exit(0)
        finally:
            os._exit(3)
    os.close(w)
    os.close(fd)
    got = os.read(r, 4096)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert got == expected
    assert struct.unpack("<I", program[4:8])[0] == 4  # sanity: first load is the arch word
