/* Scenarios that need no PCI: hello, cpuid, rtc, speed, serial-echo. */
#include "guest.h"
#include "scenarios.h"

extern u64 mem_total;

void sc_hello(void) {
    printf("Hello from the pycrosvm test guest\n");
    u64 cs, fl;
    __asm__ volatile("mov %%cs, %0; pushfq; popq %1" : "=r"(cs), "=r"(fl));
    extern int io_native;
    printf("RESULT hello=1 cpl=%u iopl=%u io=%s\n", (unsigned)(cs & 3), (unsigned)((fl >> 12) & 3),
           io_native ? "native" : "syscall");
}

void sc_cpuid(void) {
    u32 r[4];
    char vendor[13], hv[13];
    cpuid(0, 0, r);
    u32 max_basic = r[0];
    memcpy(vendor, &r[1], 4), memcpy(vendor + 4, &r[3], 4), memcpy(vendor + 8, &r[2], 4);
    vendor[12] = 0;
    cpuid(1, 0, r);
    u32 eax1 = r[0], ecx1 = r[2], edx1 = r[3];
    unsigned family = (eax1 >> 8) & 15, model = (eax1 >> 4) & 15;
    if (family == 15) family += (eax1 >> 20) & 0xFF;
    if (family >= 6) model |= ((eax1 >> 16) & 15) << 4;
    cpuid(0x40000000, 0, r);
    memcpy(hv, &r[1], 4), memcpy(hv + 4, &r[2], 4), memcpy(hv + 8, &r[3], 4);
    hv[12] = 0;
    for (int i = 0; i < 12; i++)
        if (hv[i] < 0x20 || hv[i] > 0x7e) hv[i] = '_';
    u32 max_hv = r[0];
    cpuid(0x80000000, 0, r);
    u32 max_ext = r[0];
    printf("RESULT cpuid_vendor=%s max_basic=0x%x max_ext=0x%x family=%u model=%u "
           "leaf1_ecx=0x%08x leaf1_edx=0x%08x hypervisor=%s max_hv=0x%x\n",
           vendor, max_basic, max_ext, family, model, ecx1, edx1, (ecx1 >> 31) ? hv : "none",
           max_hv);
    if ((ecx1 >> 31) && max_hv >= 0x40000001) {
        cpuid(0x40000001, 0, r);
        printf("RESULT kvm_features=0x%08x\n", r[0]);
    }
}

void sc_rtc(void) {
    char iso[32];
    u64 e = rtc_epoch(iso, sizeof(iso));
    printf("RESULT rtc_epoch=%lu rtc=%s\n", (unsigned long)e, iso);
}

static u64 cpl3_spin(u64 n) {
    u64 t0 = rdtsc();
    __asm__ volatile("1: dec %0; jnz 1b" : "+r"(n)::"cc");
    return rdtsc() - t0;
}

void sc_speed(void) {
    /* Each loop is 2 instructions per iteration. Grow n until the run is long enough to time. */
    u64 n0 = 1000, t0 = 0;
    for (;;) {
        u64 t = rdtsc();
        sys_call(SYS_SPIN, n0);
        t0 = rdtsc() - t;
        if (t0 > tsc_ms(100) || n0 >= 100000000ull) break;
        n0 *= 10;
    }
    u64 n3 = 1000000, t3 = 0;
    for (;;) {
        t3 = cpl3_spin(n3);
        if (t3 > tsc_ms(50) || n3 >= 10000000000ull) break;
        n3 *= 10;
    }
    u64 t = rdtsc();
    for (int i = 0; i < 100; i++) sys_call(SYS_NOP, 0);
    u64 trap_ns = (rdtsc() - t) * 10000000ull / tsc_hz; /* per call: /100 * 1e9 */
    /* exits: a port read the VMM answers in user space (COM1 LSR; includes the CPL0 call when
     * port I/O is not native), and an MMIO read of the in-kernel LAPIC */
    t = rdtsc();
    for (int i = 0; i < 100; i++) (void)inb(0x3F8 + 5);
    u64 pio_ns = (rdtsc() - t) * 10000000ull / tsc_hz;
    t = rdtsc();
    for (int i = 0; i < 100; i++) (void)mmio_r32(0xFEE00030);
    u64 lapic_ns = (rdtsc() - t) * 10000000ull / tsc_hz;
    u64 cpl0_ips = 2 * n0 * tsc_hz / (t0 ? t0 : 1);
    u64 cpl3_ips = 2 * n3 * tsc_hz / (t3 ? t3 : 1);
    u64 ms0 = t0 * 1000 / tsc_hz, us3 = t3 * 1000000 / tsc_hz;
    printf("RESULT speed=1 cpl0_iters=%lu cpl0_ms=%lu cpl0_ips=%lu cpl3_iters=%lu cpl3_us=%lu "
           "cpl3_ips=%lu syscall_ns=%lu pio_ns=%lu lapic_mmio_ns=%lu tsc_hz=%lu\n",
           (unsigned long)n0, (unsigned long)ms0, (unsigned long)cpl0_ips, (unsigned long)n3,
           (unsigned long)us3, (unsigned long)cpl3_ips, (unsigned long)trap_ns,
           (unsigned long)pio_ns, (unsigned long)lapic_ns, (unsigned long)tsc_hz);
}

void sc_serial_echo(void) {
    /* Echo lines from COM1 with a prefix until a line "END"; proves the receive path. */
    char line[256];
    unsigned n = 0, lines = 0, bytes = 0;
    printf("READY serial-echo\n");
    u64 deadline = rdtsc() + tsc_ms(cmdline_u64("timeout_ms", 20000));
    for (;;) {
        if (rdtsc() > deadline) fail("serial-echo timeout");
        int c = serial_getc(tsc_ms(100));
        if (c < 0) continue;
        bytes++;
        if (c == '\r') continue;
        if (c != '\n' && n < sizeof(line) - 1) {
            line[n++] = (char)c;
            continue;
        }
        line[n] = 0;
        if (!strcmp(line, "END")) break;
        printf("ECHO %s\n", line);
        lines++;
        n = 0;
    }
    printf("RESULT serial_lines=%u serial_bytes=%u\n", lines, bytes);
}
