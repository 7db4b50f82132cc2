"""The vhost devices' seccomp policies: they parse, include the common policy, compile to the
same verdicts as libseccomp, and allow exactly the vhost ioctls each device makes in its jail
(numbers taken from sys_util's computed request numbers, so a typo in a policy fails here)."""

from __future__ import annotations

import errno
import socket

import pytest

from devices.proxy import policy_dir
from io_jail import Policy, compile_policy, simulate, syscall_number
from sys_util import _vhost as vh
from sys_util import jail as sj

KILL = sj.SECCOMP_RET_KILL_PROCESS
ALLOW = sj.SECCOMP_RET_ALLOW
ENOTTY = sj.SECCOMP_RET_ERRNO | errno.ENOTTY
M64 = (1 << 64) - 1
FIONBIO = 0x5421
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8

#: What the device process does with the vhost fd (activate and reset).
COMMON_VHOST = [
    vh.VHOST_SET_OWNER,
    vh.VHOST_SET_FEATURES,
    vh.VHOST_SET_MEM_TABLE,
    vh.VHOST_SET_VRING_NUM,
    vh.VHOST_SET_VRING_ADDR,
    vh.VHOST_SET_VRING_BASE,
    vh.VHOST_GET_VRING_BASE,
    vh.VHOST_SET_VRING_KICK,
    vh.VHOST_SET_VRING_CALL,
    vh.VHOST_SET_VRING_ERR,
]
NEEDED = {
    "vhost_net": [*COMMON_VHOST, vh.VHOST_NET_SET_BACKEND, TUNSETOFFLOAD, TUNSETVNETHDRSZ],
    "vhost_vsock": [*COMMON_VHOST, vh.VHOST_VSOCK_SET_RUNNING],
}
#: Done before the fork (or never): refused in the jail.
REFUSED = {
    "vhost_net": [vh.VHOST_GET_FEATURES, vh.VHOST_RESET_OWNER, vh.VHOST_VSOCK_SET_RUNNING,
                  vh.VHOST_VSOCK_SET_GUEST_CID, TUNSETIFF],
    "vhost_vsock": [vh.VHOST_GET_FEATURES, vh.VHOST_RESET_OWNER, vh.VHOST_VSOCK_SET_GUEST_CID,
                    vh.VHOST_NET_SET_BACKEND, TUNSETOFFLOAD, TUNSETIFF],
}  # fmt: skip


def _policy(name: str) -> Policy:
    return Policy.parse_file(policy_dir() / f"{name}_device.policy")


def _verdict(name: str, syscall: str, *args: int) -> int:
    return simulate(compile_policy(_policy(name), KILL), syscall_number(syscall), list(args))


@pytest.mark.parametrize("name", sorted(NEEDED))
def test_policy_includes_common_and_compiles(name: str) -> None:
    common = Policy.parse_file(policy_dir() / "common_device.policy")
    policy = _policy(name)
    assert set(common.names) <= set(policy.names)
    assert len(compile_policy(policy, KILL)) // 8 < 4096


@pytest.mark.parametrize("name", sorted(NEEDED))
def test_exactly_the_needed_ioctls(name: str) -> None:
    for request in NEEDED[name]:
        assert _verdict(name, "ioctl", 3, request) == ALLOW, hex(request)
    for request in REFUSED[name]:
        assert _verdict(name, "ioctl", 3, request) == ENOTTY, hex(request)
    assert _verdict(name, "ioctl", 3, FIONBIO) == ALLOW
    # The upper 32 bits of the request must not smuggle a different number past the filter.
    assert _verdict(name, "ioctl", 3, vh.VHOST_SET_OWNER | 1 << 40) == ENOTTY


@pytest.mark.parametrize("name", sorted(NEEDED))
def test_no_exec_no_open_no_network(name: str) -> None:
    assert _verdict(name, "execve") == KILL
    assert _verdict(name, "ptrace") == KILL
    assert _verdict(name, "mprotect", 0, 4096, 7) == KILL
    assert _verdict(name, "openat", M64, 0, 0) == sj.SECCOMP_RET_ERRNO | errno.ENOENT
    for family in (socket.AF_UNIX, socket.AF_INET, socket.AF_VSOCK, socket.AF_NETLINK):
        assert _verdict(name, "socket", family, socket.SOCK_STREAM, 0) == KILL


def _libseccomp_rules(policy: Policy) -> list[tuple[int, int, list[tuple[int, str, int, int]]]]:
    out: list[tuple[int, int, list[tuple[int, str, int, int]]]] = []
    for rule in policy.rules.values():
        if rule.clauses is None:
            out.append((rule.action, rule.nr, []))
            continue
        for clause in rule.clauses:
            cmps: list[tuple[int, str, int, int]] = []
            for a in clause:
                if a.op == "in":
                    cmps.append((a.arg, "masked==", ~a.value & M64, 0))
                elif a.op == "&":
                    cmps.append((a.arg, "masked==", a.value, a.value))
                else:
                    cmps.append((a.arg, a.op, a.value, 0))
            out.append((rule.action, rule.nr, cmps))
    return out


@pytest.mark.parametrize("name", sorted(NEEDED))
def test_same_verdicts_as_libseccomp(name: str) -> None:
    try:
        sj.libseccomp_export_bpf(KILL, [])
    except OSError as err:  # pragma: no cover - libseccomp missing
        pytest.skip(f"libseccomp unavailable: {err}")
    policy = _policy(name)
    ours = compile_policy(policy, KILL)
    theirs = sj.libseccomp_export_bpf(KILL, _libseccomp_rules(policy))
    ioctl = syscall_number("ioctl")
    for request in [*NEEDED[name], *REFUSED[name], FIONBIO, 0, M64]:
        for args in ([3, request, 0, 0, 0, 0], [3, request | 1 << 40, 0, 0, 0, 0]):
            mine = simulate(ours, ioctl, args)
            if mine == ENOTTY:  # the rule's "otherwise": libseccomp's default action here
                assert simulate(theirs, ioctl, args) == KILL, hex(request)
            else:
                assert simulate(theirs, ioctl, args) == mine, hex(request)


@pytest.mark.parametrize("name", sorted(NEEDED))
def test_the_ioctl_rule_names_nothing_else(name: str) -> None:
    rule = _policy(name).rules[syscall_number("ioctl")]
    assert rule.clauses is not None
    allowed = set()
    for clause in rule.clauses:
        assert len(clause) == 1 and clause[0].arg == 1 and clause[0].op == "=="
        allowed.add(clause[0].value)
    fio = {FIONBIO, 0x5451, 0x5450}  # FIONBIO, FIOCLEX, FIONCLEX
    assert allowed == set(NEEDED[name]) | fio
