"""The CPUID each vCPU sees: KVM's supported list, per-vCPU topology, and a documented mask.

We start from ``KVM_GET_SUPPORTED_CPUID`` (never the host's raw CPUID: that is how QEMU's
``-cpu host`` leaked POPCNT and XSAVE to guests here) and then:

* give every vCPU its identity: leaf 1 EBX[31:24] initial APIC ID, EBX[23:16] logical CPU count
  and EDX.HTT when there is more than one vCPU, leaves 0xB/0x1F x2APIC topology (one thread per
  core, all vCPUs cores of one package, x2APIC ID = vCPU index), leaf 4 core count;
* set leaf 1 ECX.hypervisor (bit 31);
* hide :data:`HIDDEN_FEATURES`: instructions KVM's x86 emulator cannot execute (on emulating
  hosts every CPL0 instruction goes through it, so the guest kernel must not be told about
  them), features that depend on a hidden one (everything AVX needs XSAVE), features whose
  string operations are slow when emulated (ERMS/FSRM), and KVM paravirtual features that use
  hypercalls (which never return on the nested kvm_pvm hosts) -- PV IPIs, sched-yield, TLB
  flush, spinlock kick, async-PF delivery. The kvmclock bits stay on: kvmclock is MSR-based.
* zero leaf 0xD (XSAVE state enumeration), since XSAVE is hidden.

Caveat, measured on the nested kvm_pvm hosts: there the feature bits of leaves 1 and 7 that a
guest's ``cpuid`` returns are the host's, whatever we set (``KVM_GET_CPUID2`` even reports them
back), and guest *user* mode (which runs natively) sees the host's CPUID entirely. What kernel
mode sees of the identity fields (APIC ID, counts) and of the hypervisor leaves 0x4000000x does
follow our table -- so the PV-feature mask, which is what SMP Linux needs, is effective. A Linux
guest there still needs :func:`guest_cmdline_workarounds` (``noxsave clearcpuid=...``) for
the basic-leaf features. On ordinary KVM hosts the table alone is enough.

:func:`filter_cpuid` is a pure function over :class:`kvm.CpuIdEntry` lists, so the mask is
tested without ``/dev/kvm``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from kvm import CpuIdEntry

__all__ = [
    "HIDDEN_FEATURES",
    "KVM_CPUID_SIGNATURE",
    "HiddenFeature",
    "filter_cpuid",
    "guest_cmdline_workarounds",
    "hidden_mask",
]

KVM_CPUID_SIGNATURE = 0x4000_0000
_KVM_CPUID_FEATURES = 0x4000_0001
_SIGNIFICANT_INDEX = 1  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX

_HYPERVISOR_BIT = 1 << 31
_HTT_BIT = 1 << 28
_EPB_BIT = 1 << 3
_CLFLUSH_LINE_8_QWORDS = 8 << 8

_EMU = "not executed by KVM's instruction emulator"
_XSAVE_DEP = "needs XSAVE state, which is hidden"
_SLOW = "rep movsb/stosb run one emulated iteration per byte; rep movsq/stosq are 8x fewer"
_HCALL = "paravirtual feature using KVM hypercalls, which never return on nested kvm_pvm"
_MISC = "hangs or fails under emulation on these hosts (tiny-kernel clearcpuid list)"


@dataclass(frozen=True, slots=True)
class HiddenFeature:
    """One CPUID feature bit the guest is not told about, and why."""

    leaf: int
    subleaf: int
    register: str  # "eax" | "ebx" | "ecx" | "edx"
    bit: int
    name: str
    reason: str

    @property
    def clearcpuid(self) -> bool:
        """Also cleared through the guest command line (see :func:`guest_cmdline_workarounds`)."""
        return self.name in _CLEARCPUID_NAMES


def _f(leaf: int, sub: int, reg: str, bit: int, name: str, reason: str) -> HiddenFeature:
    return HiddenFeature(leaf, sub, reg, bit, name, reason)


# The Linux flag names proven on these hosts (tiny-kernel RESULTS.md), in its order.
_CLEARCPUID_NAMES = (
    "popcnt", "erms", "fsrm", "fsgsbase", "smap", "rdrand", "rdseed", "pcid", "invpcid",
    "rdpid", "pku", "cx16", "avx", "avx2",
)  # fmt: skip


#: Every bit :func:`filter_cpuid` clears, with the reason (see the module docstring).
HIDDEN_FEATURES: tuple[HiddenFeature, ...] = (
    # leaf 1 ECX
    _f(1, 0, "ecx", 5, "vmx", "no nested virtualization"),
    _f(1, 0, "ecx", 12, "fma", _XSAVE_DEP),
    _f(1, 0, "ecx", 13, "cx16", "lock cmpxchg16b is " + _EMU),
    _f(1, 0, "ecx", 17, "pcid", _MISC),
    _f(1, 0, "ecx", 23, "popcnt", "popcnt is " + _EMU),
    _f(1, 0, "ecx", 26, "xsave", "xsave/xrstor are " + _EMU),
    _f(1, 0, "ecx", 27, "osxsave", "xsave/xrstor are " + _EMU),
    _f(1, 0, "ecx", 28, "avx", _XSAVE_DEP),
    _f(1, 0, "ecx", 29, "f16c", _XSAVE_DEP),
    _f(1, 0, "ecx", 30, "rdrand", "rdrand is " + _EMU),
    # leaf 7.0 EBX
    _f(7, 0, "ebx", 0, "fsgsbase", "rd/wrfsbase are " + _EMU),
    _f(7, 0, "ebx", 2, "sgx", "no SGX"),
    _f(7, 0, "ebx", 4, "hle", "TSX is " + _EMU),
    _f(7, 0, "ebx", 5, "avx2", _XSAVE_DEP),
    _f(7, 0, "ebx", 9, "erms", _SLOW),
    _f(7, 0, "ebx", 10, "invpcid", _MISC),
    _f(7, 0, "ebx", 11, "rtm", "TSX is " + _EMU),
    _f(7, 0, "ebx", 14, "mpx", _XSAVE_DEP),
    _f(7, 0, "ebx", 16, "avx512f", _XSAVE_DEP),
    _f(7, 0, "ebx", 17, "avx512dq", _XSAVE_DEP),
    _f(7, 0, "ebx", 18, "rdseed", "rdseed is " + _EMU),
    _f(7, 0, "ebx", 20, "smap", "stac/clac are " + _EMU),
    _f(7, 0, "ebx", 21, "avx512ifma", _XSAVE_DEP),
    _f(7, 0, "ebx", 26, "avx512pf", _XSAVE_DEP),
    _f(7, 0, "ebx", 27, "avx512er", _XSAVE_DEP),
    _f(7, 0, "ebx", 28, "avx512cd", _XSAVE_DEP),
    _f(7, 0, "ebx", 30, "avx512bw", _XSAVE_DEP),
    _f(7, 0, "ebx", 31, "avx512vl", _XSAVE_DEP),
    # leaf 7.0 ECX
    _f(7, 0, "ecx", 1, "avx512vbmi", _XSAVE_DEP),
    _f(7, 0, "ecx", 3, "pku", _MISC),
    _f(7, 0, "ecx", 4, "ospke", _MISC),
    _f(7, 0, "ecx", 5, "waitpkg", "umwait/tpause are " + _EMU),
    _f(7, 0, "ecx", 6, "avx512vbmi2", _XSAVE_DEP),
    _f(7, 0, "ecx", 7, "cet_ss", _XSAVE_DEP),
    _f(7, 0, "ecx", 9, "vaes", _XSAVE_DEP),
    _f(7, 0, "ecx", 10, "vpclmulqdq", _XSAVE_DEP),
    _f(7, 0, "ecx", 11, "avx512vnni", _XSAVE_DEP),
    _f(7, 0, "ecx", 12, "avx512bitalg", _XSAVE_DEP),
    _f(7, 0, "ecx", 14, "avx512vpopcntdq", _XSAVE_DEP),
    _f(7, 0, "ecx", 16, "la57", "the boot page tables are 4-level"),
    _f(7, 0, "ecx", 22, "rdpid", "rdpid is " + _EMU),
    # leaf 7.0 EDX
    _f(7, 0, "edx", 2, "avx512_4vnniw", _XSAVE_DEP),
    _f(7, 0, "edx", 3, "avx512_4fmaps", _XSAVE_DEP),
    _f(7, 0, "edx", 4, "fsrm", _SLOW),
    _f(7, 0, "edx", 8, "avx512_vp2intersect", _XSAVE_DEP),
    _f(7, 0, "edx", 20, "cet_ibt", _XSAVE_DEP),
    _f(7, 0, "edx", 22, "amx_bf16", _XSAVE_DEP),
    _f(7, 0, "edx", 23, "avx512_fp16", _XSAVE_DEP),
    _f(7, 0, "edx", 24, "amx_tile", _XSAVE_DEP),
    _f(7, 0, "edx", 25, "amx_int8", _XSAVE_DEP),
    # leaf 7.1 EAX
    _f(7, 1, "eax", 4, "avx_vnni", _XSAVE_DEP),
    _f(7, 1, "eax", 5, "avx512_bf16", _XSAVE_DEP),
    _f(7, 1, "eax", 10, "fzrm", _SLOW),
    _f(7, 1, "eax", 11, "fsrs", _SLOW),
    _f(7, 1, "eax", 12, "fsrc", _SLOW),
    # leaf 0x80000001 ECX
    _f(0x8000_0001, 0, "ecx", 2, "svm", "no nested virtualization"),
    _f(0x8000_0001, 0, "ecx", 11, "xop", _XSAVE_DEP),
    _f(0x8000_0001, 0, "ecx", 16, "fma4", _XSAVE_DEP),
    # KVM paravirtual features (leaf 0x40000001 EAX)
    _f(_KVM_CPUID_FEATURES, 0, "eax", 4, "kvm_async_pf", "async PF needs ASYNC_PF_INT, hidden"),
    _f(_KVM_CPUID_FEATURES, 0, "eax", 7, "kvm_pv_unhalt", _HCALL + " (spinlock kick)"),
    _f(_KVM_CPUID_FEATURES, 0, "eax", 9, "kvm_pv_tlb_flush", _HCALL),
    _f(_KVM_CPUID_FEATURES, 0, "eax", 10, "kvm_async_pf_vmexit", "async PF is hidden"),
    _f(_KVM_CPUID_FEATURES, 0, "eax", 11, "kvm_pv_send_ipi", _HCALL),
    _f(_KVM_CPUID_FEATURES, 0, "eax", 12, "kvm_poll_control", "host-side halt polling control"),
    _f(_KVM_CPUID_FEATURES, 0, "eax", 13, "kvm_pv_sched_yield", _HCALL),
    _f(_KVM_CPUID_FEATURES, 0, "eax", 14, "kvm_async_pf_int", _MISC),
    _f(_KVM_CPUID_FEATURES, 0, "eax", 16, "kvm_hc_map_gpa_range", _HCALL),
    _f(_KVM_CPUID_FEATURES, 0, "eax", 17, "kvm_migration_control", "no live migration"),
)

_REGS = ("eax", "ebx", "ecx", "edx")
#: Leaves whose subleaf number (ECX input) matters.
_INDEXED_LEAVES = frozenset({4, 7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1F})


def _build_masks() -> dict[tuple[int, int], dict[str, int]]:
    masks: dict[tuple[int, int], dict[str, int]] = {}
    for feature in HIDDEN_FEATURES:
        mask = masks.setdefault((feature.leaf, feature.subleaf), dict.fromkeys(_REGS, 0))
        mask[feature.register] |= 1 << feature.bit
    return masks


_MASKS = _build_masks()
_NO_MASK = dict.fromkeys(_REGS, 0)


def hidden_mask(leaf: int, subleaf: int) -> dict[str, int]:
    """The bits hidden in ``(leaf, subleaf)`` per register (0 where nothing is hidden)."""
    return dict(_MASKS.get((leaf, subleaf), _NO_MASK))


def _bits_for(count: int) -> int:
    """Bits needed to number ``count`` items (x2APIC ID shift)."""
    return max(count - 1, 0).bit_length()


def _topology_entries(leaf: int, cpu_id: int, cpu_count: int) -> list[CpuIdEntry]:
    """Leaf 0xB/0x1F: level 0 SMT (1 thread per core), level 1 core (all vCPUs), then end."""
    flag = _SIGNIFICANT_INDEX
    return [
        CpuIdEntry(leaf, 0, flag, eax=0, ebx=1, ecx=(1 << 8) | 0, edx=cpu_id),
        CpuIdEntry(
            leaf, 1, flag, eax=_bits_for(cpu_count), ebx=cpu_count, ecx=(2 << 8) | 1, edx=cpu_id
        ),
        CpuIdEntry(leaf, 2, flag, eax=0, ebx=0, ecx=2, edx=cpu_id),
    ]


def filter_cpuid(
    supported: Sequence[CpuIdEntry], *, cpu_id: int, cpu_count: int
) -> list[CpuIdEntry]:
    """The CPUID table for vCPU ``cpu_id`` of ``cpu_count``, from KVM's supported entries.

    The input is not modified. Raises ``ValueError`` for an impossible ``cpu_id``/``cpu_count``
    (APIC IDs are 8 bits in leaf 1).
    """
    if not 0 <= cpu_id < cpu_count <= 255:
        raise ValueError(f"vCPU {cpu_id} of {cpu_count}: need 0 <= id < count <= 255")
    max_basic = next((e.eax for e in supported if e.function == 0), 0)
    out: list[CpuIdEntry] = []
    topology_done: set[int] = set()
    for original in supported:
        entry = dataclasses.replace(original)
        leaf = entry.function
        subleaf = entry.index if leaf in _INDEXED_LEAVES else 0
        if leaf in (0xB, 0x1F):
            if leaf not in topology_done:
                topology_done.add(leaf)
                out.extend(_topology_entries(leaf, cpu_id, cpu_count))
            continue
        if leaf == 0xD:
            entry.eax = entry.ebx = entry.ecx = entry.edx = 0
            out.append(entry)
            continue
        mask = _MASKS.get((leaf, subleaf))
        if mask is not None:
            for reg, bits in mask.items():
                setattr(entry, reg, getattr(entry, reg) & ~bits)
        if leaf == 1:
            entry.ebx = (cpu_id << 24) | _CLFLUSH_LINE_8_QWORDS
            entry.ecx |= _HYPERVISOR_BIT
            if cpu_count > 1:
                entry.ebx |= cpu_count << 16
                entry.edx |= _HTT_BIT
            else:
                entry.edx &= ~_HTT_BIT
        elif leaf == 4 and entry.eax & 0x1F:  # a real cache level (type != 0)
            # EAX[31:26]: addressable core IDs in the package - 1, consistent with leaf 0xB.
            cores = min((1 << _bits_for(cpu_count)) - 1, 63)
            entry.eax = (entry.eax & 0x03FF_FFFF) | (cores << 26)
        elif leaf == 6:
            entry.ecx &= ~_EPB_BIT
        out.append(entry)
    if max_basic >= 0xB and 0xB not in topology_done:
        out.extend(_topology_entries(0xB, cpu_id, cpu_count))
    return out


def guest_cmdline_workarounds() -> list[str]:
    """Kernel parameters that hide the same features from inside a Linux guest.

    For hosts whose CPUID masking does not reach the guest (see the module docstring):
    ``["noxsave", "clearcpuid=popcnt,erms,..."]``. ``clearcpuid`` is parsed in
    ``early_cpu_init()``, so these must be on the real command line, not in CONFIG_CMDLINE.
    """
    return ["noxsave", "clearcpuid=" + ",".join(_CLEARCPUID_NAMES)]
