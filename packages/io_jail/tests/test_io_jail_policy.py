"""The policy parser: syntax, constants, includes, and errors that name file:line."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from io_jail import CONSTANTS, Atom, Policy, PolicyError, syscall_name, syscall_number
from sys_util.jail import SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS

KILL = SECCOMP_RET_KILL_PROCESS
ALLOW = SECCOMP_RET_ALLOW


def test_syscall_table_matches_header() -> None:
    header = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
    if not header.exists():
        pytest.skip("kernel headers not installed")
    import re

    expected = {
        m[1]: int(m[2]) for m in re.finditer(r"#define __NR_(\w+)\s+(\d+)", header.read_text())
    }
    for name, nr in expected.items():
        assert syscall_number(name) == nr
    assert syscall_number("read") == 0 and syscall_name(41) == "socket"
    assert syscall_name(100000) == "syscall_100000"


def test_constants_from_the_running_system() -> None:
    import mmap
    import os
    import socket
    import termios

    assert CONSTANTS["PROT_EXEC"] == mmap.PROT_EXEC
    assert CONSTANTS["O_CLOEXEC"] == os.O_CLOEXEC
    assert CONSTANTS["AF_UNIX"] == socket.AF_UNIX
    assert CONSTANTS["FIONBIO"] == termios.FIONBIO == 0x5421
    assert CONSTANTS["PR_SET_NAME"] == 15 and CONSTANTS["CLONE_THREAD"] == 0x10000
    assert CONSTANTS["MADV_DONTNEED"] == 4 and CONSTANTS["F_GETFL"] == 3


def test_rules_actions_and_expressions() -> None:
    text = """
    # a comment line
    read: 1   # trailing comment
    write: allow
    openat: return ENOENT
    mmap: arg2 in ~PROT_EXEC
    madvise: arg2 == MADV_DONTNEED || arg2 == MADV_DONTDUMP || \\
             arg2 == MADV_REMOVE
    ioctl: arg1 == FIONBIO && arg0 >= 3; return ENOTTY
    fcntl: arg1 == (F_GETFL | F_SETFL) || arg1 != 0x10 && arg1 <= 020
    clone: arg0 & CLONE_THREAD
    """
    p = Policy.parse(text, "t.policy")
    assert p.names == sorted(
        ["read", "write", "openat", "mmap", "madvise", "ioctl", "fcntl", "clone"]
    )
    read = p.rules[0]
    assert read.clauses is None and read.action == ALLOW and read.line == 3
    assert p.rules[syscall_number("openat")].action == SECCOMP_RET_ERRNO | 2
    madvise = p.rules[syscall_number("madvise")]
    assert madvise.line == 7 and len(madvise.clauses or ()) == 3
    ioctl = p.rules[syscall_number("ioctl")]
    assert ioctl.clauses == ((Atom(1, "==", 0x5421), Atom(0, ">=", 3)),)
    assert ioctl.otherwise == SECCOMP_RET_ERRNO | 25
    fcntl = p.rules[syscall_number("fcntl")]
    assert fcntl.clauses == ((Atom(1, "==", 3 | 4),), (Atom(1, "!=", 0x10), Atom(1, "<=", 0o20)))
    assert p.decide(syscall_number("ioctl"), [3, 0x5421], KILL) == ALLOW
    assert p.decide(syscall_number("ioctl"), [2, 0x5421], KILL) == SECCOMP_RET_ERRNO | 25
    assert p.decide(syscall_number("mmap"), [0, 0, 3], KILL) == ALLOW
    assert p.decide(syscall_number("mmap"), [0, 0, 7], KILL) == KILL
    assert p.decide(syscall_number("clone"), [0x10000 | 0x100], KILL) == ALLOW
    assert p.decide(syscall_number("socket"), [2], KILL) == KILL


def test_numeric_syscall_and_negative_values() -> None:
    p = Policy.parse("0: 1\nlseek: arg1 == -1\n")
    assert p.rules[0].name == "read"
    assert p.decide(syscall_number("lseek"), [0, (1 << 64) - 1], KILL) == ALLOW
    assert p.decide(syscall_number("lseek"), [0, (1 << 32) - 1], KILL) == KILL


def _err(tmp_path: Path, text: str, name: str = "bad.policy") -> PolicyError:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        Policy.parse_file(path)
    return info.value


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("read: 1\nwrite 1\n", 2, "expected 'syscall: expression'"),
        ("read: 1\n\nnot_a_syscall: 1\n", 3, "unknown syscall 'not_a_syscall'"),
        ("mmap: arg2 in ~PROT_EXECUTE\n", 1, "unknown constant 'PROT_EXECUTE'"),
        ("read: 1\nread: 1\n", 2, "syscall read redefined"),
        ("read: arg0 === 1\n", 1, "unexpected"),
        ("read: arg9 == 1\n", 1, "expected argN"),
        ("read: arg0 == 1 ||\n", 1, "unexpected end"),
        ("read: arg0 == 1 &&& arg1\n", 1, "expected"),
        ("read: arg0 == (1 | 2\n", 1, "unexpected end"),
        ("read: arg0 == (1 | 2 3\n", 1, "expected ')'"),
        ("read: return ENOTANERRNO\n", 1, "unknown errno"),
        ("read: arg0 == 1; bogus\n", 1, "expected an action"),
        ("read:\n", 1, "empty expression"),
        ("@frobnicate x\n", 1, "unknown directive"),
        ("read: arg0 == 0x1ffffffffffffffff\n", 1, "does not fit 64 bits"),
        ("# ok\nread: 1\n\\\n  write: arg0 $ 1\n", 3, "unexpected character"),
    ],
)
def test_malformed_policies_name_file_and_line(
    tmp_path: Path, text: str, line: int, reason: str
) -> None:
    err = _err(tmp_path, text)
    assert err.path.endswith("bad.policy") and err.line == line, str(err)
    assert reason in err.reason
    assert str(err).startswith(f"{err.path}:{line}: ")
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.line, again.reason) == (err.path, err.line, err.reason)


def test_include_relative_and_redefinition_across_files(tmp_path: Path) -> None:
    (tmp_path / "common.policy").write_text("read: 1\nwrite: 1\n")
    (tmp_path / "dev.policy").write_text("@include ./common.policy\nfsync: 1\n")
    p = Policy.parse_file(tmp_path / "dev.policy")
    assert p.names == ["fsync", "read", "write"]
    assert p.rules[0].path.endswith("common.policy")
    err = _err(tmp_path, "@include ./common.policy\nread: 1\n", "dup.policy")
    assert err.line == 2 and "first at" in err.reason and "common.policy:1" in err.reason


def test_include_loop_and_missing(tmp_path: Path) -> None:
    (tmp_path / "a.policy").write_text("read: 1\n@include b.policy\n")
    (tmp_path / "b.policy").write_text("\n@include a.policy\n")
    with pytest.raises(PolicyError) as info:
        Policy.parse_file(tmp_path / "a.policy")
    assert info.value.path.endswith("b.policy") and info.value.line == 2
    assert "@include loop" in info.value.reason
    err = _err(tmp_path, "read: 1\n@include nowhere.policy\n")
    assert err.line == 2 and "cannot read" in err.reason
    with pytest.raises(PolicyError) as missing:
        Policy.parse_file(tmp_path / "absent.policy")
    assert missing.value.line == 0
