import pytest

from arch.x86_64.cpuid import (
    HIDDEN_FEATURES,
    filter_cpuid,
    guest_cmdline_workarounds,
    hidden_mask,
)
from kvm import CpuIdEntry

ALL = 0xFFFF_FFFF


def _supported() -> list[CpuIdEntry]:
    """A host that claims every feature bit: whatever survives the filter is deliberate."""
    return [
        CpuIdEntry(0, 0, 0, 0x1F, 0x756E_6547, 0x6C65_746E, 0x4965_6E69),
        CpuIdEntry(1, 0, 0, 0x000A_06A5, ALL, ALL, ALL),
        CpuIdEntry(4, 0, 1, 0x0400_0121, 0x01C0_003F, 0x3F, 0),
        CpuIdEntry(4, 1, 1, 0, 0, 0, 0),  # end of the cache list
        CpuIdEntry(6, 0, 0, 4, 0, ALL, 0),
        CpuIdEntry(7, 0, 1, 1, ALL, ALL, ALL),
        CpuIdEntry(7, 1, 1, ALL, 0, 0, 0),
        CpuIdEntry(0xB, 0, 1, 1, 2, 0x100, 7),
        CpuIdEntry(0xB, 1, 1, 4, 8, 0x201, 7),
        CpuIdEntry(0xD, 0, 1, 0x207, 0x340, 0x340, 0),
        CpuIdEntry(0xD, 1, 1, 0xF, 0, 0, 0),
        CpuIdEntry(0x4000_0000, 0, 0, 0x4000_0001, 0x4B4D_564B, 0x564B_4D56, 0x4D),
        CpuIdEntry(0x4000_0001, 0, 0, 0x0103_FFFF, 0, 0, 0),
        CpuIdEntry(0x8000_0000, 0, 0, 0x8000_0008, 0, 0, 0),
        CpuIdEntry(0x8000_0001, 0, 0, 0, 0, ALL, ALL),
    ]


def _get(entries: list[CpuIdEntry], leaf: int, sub: int = 0) -> CpuIdEntry:
    return next(e for e in entries if e.function == leaf and e.index == sub)


def test_every_hidden_bit_is_cleared() -> None:
    out = filter_cpuid(_supported(), cpu_id=0, cpu_count=1)
    for f in HIDDEN_FEATURES:
        assert not getattr(_get(out, f.leaf, f.subleaf), f.register) >> f.bit & 1, f.name


@pytest.mark.parametrize(
    "name",
    ["xsave", "osxsave", "avx", "avx2", "popcnt", "cx16", "erms", "fsrm", "fsgsbase", "smap",
     "rdrand", "rdseed", "pcid", "invpcid", "rdpid", "pku", "kvm_pv_send_ipi",
     "kvm_pv_sched_yield", "kvm_pv_tlb_flush", "kvm_async_pf_int", "kvm_poll_control"],
)  # fmt: skip
def test_required_features_are_in_the_mask(name: str) -> None:
    assert any(f.name == name for f in HIDDEN_FEATURES)


def test_mask_is_well_formed() -> None:
    seen = set()
    for f in HIDDEN_FEATURES:
        key = (f.leaf, f.subleaf, f.register, f.bit)
        assert key not in seen and 0 <= f.bit < 32 and f.reason
        seen.add(key)
    assert hidden_mask(1, 0)["ecx"] & (1 << 26)
    assert hidden_mask(0x4000_0001, 0)["eax"] & (1 << 0) == 0  # kvmclock stays


def test_kept_features() -> None:
    out = filter_cpuid(_supported(), cpu_id=0, cpu_count=1)
    leaf1 = _get(out, 1)
    assert leaf1.ecx & (1 << 31)  # hypervisor
    assert leaf1.ecx & (1 << 0) and leaf1.ecx & (1 << 20)  # sse3, sse4.2 kept
    kvm = _get(out, 0x4000_0001)
    for bit in (0, 3, 24):  # kvmclock, kvmclock2, stable bit
        assert kvm.eax & (1 << bit)
    assert _get(out, 0x4000_0000).ebx == 0x4B4D_564B
    assert _get(out, 0).eax == 0x1F


def test_leaf_d_zeroed() -> None:
    out = filter_cpuid(_supported(), cpu_id=0, cpu_count=1)
    for e in out:
        if e.function == 0xD:
            assert (e.eax, e.ebx, e.ecx, e.edx) == (0, 0, 0, 0)


@pytest.mark.parametrize(("cpu_id", "count"), [(0, 1), (0, 2), (1, 2), (3, 4), (4, 5)])
def test_topology(cpu_id: int, count: int) -> None:
    out = filter_cpuid(_supported(), cpu_id=cpu_id, cpu_count=count)
    leaf1 = _get(out, 1)
    assert leaf1.ebx >> 24 == cpu_id
    assert (leaf1.ebx >> 8) & 0xFF == 8
    if count > 1:
        assert (leaf1.ebx >> 16) & 0xFF == count and leaf1.edx & (1 << 28)
    else:
        assert not leaf1.edx & (1 << 28) and (leaf1.ebx >> 16) & 0xFF == 0
    topo = sorted((e for e in out if e.function == 0xB), key=lambda e: e.index)
    assert [e.index for e in topo] == [0, 1, 2]
    assert all(e.edx == cpu_id and e.flags & 1 for e in topo)
    assert (topo[0].ebx, (topo[0].ecx >> 8) & 0xFF) == (1, 1)  # SMT level: 1 thread
    assert (topo[1].ebx, (topo[1].ecx >> 8) & 0xFF) == (count, 2)  # core level
    assert (1 << topo[1].eax) >= count
    assert (topo[2].ecx >> 8) & 0xFF == 0  # invalid level ends the list
    cache = _get(out, 4, 0)
    assert (cache.eax >> 26) + 1 >= count and cache.eax & 0x3FF_FFFF == 0x121
    assert _get(out, 4, 1).eax == 0


def test_input_not_modified_and_bad_ids() -> None:
    supported = _supported()
    before = [repr(e) for e in supported]
    filter_cpuid(supported, cpu_id=1, cpu_count=2)
    assert [repr(e) for e in supported] == before
    for cpu_id, count in [(1, 1), (-1, 2), (0, 0), (0, 256)]:
        with pytest.raises(ValueError):
            filter_cpuid(supported, cpu_id=cpu_id, cpu_count=count)


def test_topology_leaf_added_when_missing() -> None:
    supported = [e for e in _supported() if e.function != 0xB]
    out = filter_cpuid(supported, cpu_id=1, cpu_count=2)
    assert _get(out, 0xB, 1).ebx == 2


def test_guest_cmdline_workarounds_match_the_mask() -> None:
    params = guest_cmdline_workarounds()
    assert params[0] == "noxsave"
    names = params[1].removeprefix("clearcpuid=").split(",")
    assert sorted(names) == sorted(f.name for f in HIDDEN_FEATURES if f.clearcpuid)
    assert {"popcnt", "cx16", "avx", "avx2", "smap", "fsgsbase"} <= set(names)
