"""Kernel command lines for the kit's guests.

On hosts where guest kernel code runs in KVM's instruction emulator (nested "kvm_pvm"), the
reference measurements (tiny-kernel/RESULTS.md) found:

* ``rodata=off`` saves ~13 s (no splitting of the kernel mappings), ``noreplace-smp`` ~2 s;
* ``reboot=k`` leaves through the i8042 reset line (never ``reboot=t``: it executes int3, which
  the emulator cannot deliver); ``panic=-1`` reboots at once on a panic, so a VMM exits;
* ``noxsave`` and ``clearcpuid=...`` hide CPU features whose instructions the emulator lacks
  (popcnt, cmpxchg16b, rd/wrfsbase, stac/clac, rdrand/rdseed, invpcid, rdpid, rdpkru, xsave) or
  that make it slower (erms/fsrm: ``rep movsb`` is 8x the iterations of ``rep movsq``).

The clearcpuid list is only needed when the guest sees the *host's* CPUID (as under QEMU
here). pycrosvm builds CPUID itself from KVM_GET_SUPPORTED_CPUID minus those features, so for
crosvm ``BASE_CMDLINE`` should suffice; ``EMULATING_HOST_CMDLINE`` stays available for
QEMU and as a belt-and-braces option.
"""

from __future__ import annotations

__all__ = [
    "BASE_CMDLINE",
    "CLEARCPUID",
    "EMULATING_HOST_CMDLINE",
    "kernel_cmdline",
]

CLEARCPUID = (
    "popcnt", "erms", "fsrm", "fsgsbase", "smap", "rdrand", "rdseed", "pcid", "invpcid",
    "rdpid", "pku", "cx16", "avx", "avx2",
)  # fmt: skip

BASE_CMDLINE = (
    "console=ttyS0 reboot=k panic=-1 noxsave mitigations=off rodata=off noreplace-smp "
    "tsc=reliable no_timer_check quiet"
)

EMULATING_HOST_CMDLINE = f"{BASE_CMDLINE} clearcpuid={','.join(CLEARCPUID)}"


def kernel_cmdline(
    *,
    clearcpuid: bool = True,
    mode: str | None = None,
    guest_exit: str | None = None,
    extra: str = "",
) -> str:
    """A command line: the base parameters, the clearcpuid list unless ``clearcpuid=False``,
    ``guestmode=``/``guestexit=`` for /init, and ``extra`` appended."""
    parts = [EMULATING_HOST_CMDLINE if clearcpuid else BASE_CMDLINE]
    if mode:
        parts.append(f"guestmode={mode}")
    if guest_exit:
        parts.append(f"guestexit={guest_exit}")
    if extra:
        parts.append(extra)
    return " ".join(parts)
