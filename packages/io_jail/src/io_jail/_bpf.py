"""Compile a :class:`~io_jail.Policy` to a classic-BPF seccomp program, and run one (for tests).

Layout of the program (x86_64 only)::

    ld  arch;  jeq AUDIT_ARCH_X86_64 ? +1 : 0;  ret KILL_PROCESS      # foreign ABI: never
    ld  nr;    jge 0x40000000 ? default : +0                           # x32 syscalls: refused
    jeq nr_1 ? +0 : +1;  ja body_1          # dispatch: two instructions per listed syscall, so
    jeq nr_2 ? +0 : +1;  ja body_2          # every body is reached with a 32-bit `ja` however
    ...                                     # long the policy is
    ret default
    body_i: for each clause: for each atom: compare the argument as two 32-bit halves
            (high word first); a failing atom jumps to the next clause; ret action
            after the last clause: ret otherwise (or default)

Each atom ends in its own ``ja`` trampoline to the next clause, so every conditional jump (8-bit
offsets) stays local to its atom.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from io_jail._policy import MASK64, Atom, Policy, Rule
from io_jail.errors import CompileError
from sys_util.jail import AUDIT_ARCH_X86_64, SECCOMP_RET_KILL_PROCESS

__all__ = ["BPF_MAXINSNS", "compile_policy", "disassemble", "simulate"]

BPF_MAXINSNS = 4096
_INSN = struct.Struct("<HBBI")
X32_SYSCALL_BIT = 0x4000_0000

# classic BPF opcodes
LD_W_ABS = 0x20
JA = 0x05
JEQ_K = 0x15
JGT_K = 0x25
JGE_K = 0x35
JSET_K = 0x45
RET_K = 0x06
AND_K = 0x54

OFF_NR = 0
OFF_ARCH = 4


def _arg_lo(arg: int) -> int:
    return 16 + 8 * arg


def _arg_hi(arg: int) -> int:
    return 16 + 8 * arg + 4


@dataclass
class _Insn:
    code: int
    k: int | str = 0
    jt: int | str = 0
    jf: int | str = 0


class _Asm:
    def __init__(self) -> None:
        self.items: list[_Insn | str] = []
        self._n = 0

    def label(self, hint: str = "L") -> str:
        self._n += 1
        return f"{hint}{self._n}"

    def put(self, name: str) -> None:
        self.items.append(name)

    def emit(self, code: int, k: int | str = 0, jt: int | str = 0, jf: int | str = 0) -> None:
        self.items.append(_Insn(code, k, jt, jf))

    def assemble(self) -> bytes:
        where: dict[str, int] = {}
        insns: list[_Insn] = []
        for item in self.items:
            if isinstance(item, str):
                where[item] = len(insns)
            else:
                insns.append(item)
        if len(insns) > BPF_MAXINSNS:
            raise CompileError(f"policy compiles to {len(insns)} instructions (max {BPF_MAXINSNS})")
        out = bytearray()
        for i, ins in enumerate(insns):

            def rel(target: int | str, i: int = i) -> int:
                return target if isinstance(target, int) else where[target] - (i + 1)

            if ins.code == JA:
                k, jt, jf = rel(ins.k), 0, 0
            else:
                assert isinstance(ins.k, int)
                k, jt, jf = ins.k, rel(ins.jt), rel(ins.jf)
                if not (0 <= jt <= 255 and 0 <= jf <= 255):
                    raise CompileError(f"jump out of range at instruction {i}")
            if k < 0:
                raise CompileError(f"backward jump at instruction {i}")
            out += _INSN.pack(ins.code, jt, jf, k & 0xFFFF_FFFF)
        return bytes(out)


def _atom(asm: _Asm, atom: Atom, fail_label: str) -> None:
    t, f = asm.label("T"), asm.label("F")
    hi_v, lo_v = atom.value >> 32, atom.value & 0xFFFF_FFFF
    hi, lo = _arg_hi(atom.arg), _arg_lo(atom.arg)
    op = atom.op
    if op in ("<", "<="):  # a < v  <=>  not (a >= v);  a <= v  <=>  not (a > v)
        op, t_out, f_out = (">=" if op == "<" else ">"), f, t
    else:
        t_out, f_out = t, f
    match op:
        case "==":
            asm.emit(LD_W_ABS, hi)
            asm.emit(JEQ_K, hi_v, 0, f_out)
            asm.emit(LD_W_ABS, lo)
            asm.emit(JEQ_K, lo_v, t_out, f_out)
        case "!=":
            asm.emit(LD_W_ABS, hi)
            asm.emit(JEQ_K, hi_v, 0, t_out)
            asm.emit(LD_W_ABS, lo)
            asm.emit(JEQ_K, lo_v, f_out, t_out)
        case "&":
            asm.emit(LD_W_ABS, hi)
            asm.emit(JSET_K, hi_v, t_out, 0)
            asm.emit(LD_W_ABS, lo)
            asm.emit(JSET_K, lo_v, t_out, f_out)
        case "in":
            asm.emit(LD_W_ABS, hi)
            asm.emit(AND_K, ~hi_v & 0xFFFF_FFFF)
            asm.emit(JEQ_K, 0, 0, f_out)
            asm.emit(LD_W_ABS, lo)
            asm.emit(AND_K, ~lo_v & 0xFFFF_FFFF)
            asm.emit(JEQ_K, 0, t_out, f_out)
        case ">" | ">=":
            asm.emit(LD_W_ABS, hi)
            asm.emit(JGT_K, hi_v, t_out, 0)
            asm.emit(JEQ_K, hi_v, 0, f_out)
            asm.emit(LD_W_ABS, lo)
            asm.emit(JGT_K if op == ">" else JGE_K, lo_v, t_out, f_out)
        case _:  # pragma: no cover - the parser only produces OPERATORS
            raise CompileError(f"unknown operator {atom.op}")
    asm.put(f)
    asm.emit(JA, fail_label)
    asm.put(t)


def _body(asm: _Asm, rule: Rule, default: int) -> None:
    if rule.clauses is None:
        asm.emit(RET_K, rule.action)
        return
    for clause in rule.clauses:
        next_clause = asm.label("C")
        for atom in clause:
            _atom(asm, atom, next_clause)
        asm.emit(RET_K, rule.action)
        asm.put(next_clause)
    asm.emit(RET_K, default if rule.otherwise is None else rule.otherwise)


def compile_policy(policy: Policy, default_action: int = SECCOMP_RET_KILL_PROCESS) -> bytes:
    """The ``struct sock_filter[]`` bytes of ``policy``; unlisted syscalls get ``default_action``.

    ``default_action`` is ``SECCOMP_RET_KILL_PROCESS`` (default) or ``SECCOMP_RET_TRAP`` (log mode).
    """
    asm = _Asm()
    asm.emit(LD_W_ABS, OFF_ARCH)
    asm.emit(JEQ_K, AUDIT_ARCH_X86_64, 1, 0)
    asm.emit(RET_K, SECCOMP_RET_KILL_PROCESS)
    asm.emit(LD_W_ABS, OFF_NR)
    deny = asm.label("D")
    asm.emit(JGE_K, X32_SYSCALL_BIT, deny, 0)
    rules = sorted(policy.rules.values(), key=lambda r: r.nr)
    bodies = []
    for rule in rules:
        body = asm.label("B")
        bodies.append((body, rule))
        asm.emit(JEQ_K, rule.nr, 0, 1)
        asm.emit(JA, body)
    asm.put(deny)
    asm.emit(RET_K, default_action)
    for body, rule in bodies:
        asm.put(body)
        _body(asm, rule, default_action)
    return asm.assemble()


def disassemble(program: bytes) -> list[tuple[int, int, int, int]]:
    """The (code, jt, jf, k) tuples of a program."""
    return [_INSN.unpack_from(program, i) for i in range(0, len(program), _INSN.size)]


def _alu(op: int, a: int, src: int) -> int:
    if op == 0x00:
        return a + src
    if op == 0x10:
        return a - src
    if op == 0x20:
        return a * src
    if op == 0x30:
        return a // src if src else 0
    if op == 0x40:
        return a | src
    if op == 0x50:
        return a & src
    if op == 0x60:
        return a << src
    if op == 0x70:
        return a >> src
    if op == 0x80:
        return -a
    if op == 0x90:
        return a % src if src else 0
    if op == 0xA0:
        return a ^ src
    raise CompileError(f"unsupported ALU operation {op:#x}")


def simulate(
    program: bytes, nr: int, args: tuple[int, ...] | list[int] = (), arch: int = AUDIT_ARCH_X86_64
) -> int:
    """Run a classic-BPF seccomp program on one ``seccomp_data``; return its verdict.

    Implements the whole classic-BPF instruction set a seccomp filter may use (loads from the
    data, scratch memory, ALU, jumps, returns), so programs from other compilers (libseccomp)
    can be compared with ours.
    """
    full = [*(int(a) & MASK64 for a in args), *([0] * (6 - len(args)))]
    data = struct.pack("<iIQ6Q", nr, arch, 0, *full)
    insns = disassemble(program)
    a = x = 0
    mem = [0] * 16
    pc = 0
    m32 = 0xFFFF_FFFF
    while pc < len(insns):
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if cls == 0x00:  # LD
            mode = code & 0xE0
            if mode == 0x20:  # ABS
                a = struct.unpack_from("<I", data, k)[0]
            elif mode == 0x00:  # IMM
                a = k
            elif mode == 0x60:  # MEM
                a = mem[k]
            elif mode == 0x80:  # LEN
                a = len(data)
            else:
                raise CompileError(f"unsupported load {code:#x}")
        elif cls == 0x01:  # LDX
            mode = code & 0xE0
            x = k if mode == 0x00 else mem[k] if mode == 0x60 else len(data)
        elif cls == 0x02:  # ST
            mem[k] = a
        elif cls == 0x03:  # STX
            mem[k] = x
        elif cls == 0x04:  # ALU
            src = x if code & 0x08 else k
            a = _alu(code & 0xF0, a, src) & m32
        elif cls == 0x05:  # JMP
            op = code & 0xF0
            src = x if code & 0x08 else k
            if op == 0x00:
                pc += k
                continue
            cond = {0x10: a == src, 0x20: a > src, 0x30: a >= src, 0x40: a & src != 0}[op]
            pc += jt if cond else jf
        elif cls == 0x06:  # RET
            return a if code & 0x18 == 0x10 else k
        else:  # MISC
            if code & 0xF8 == 0x00:
                x = a
            else:
                a = x
    raise CompileError("program fell off its end")
