/* smp: start the application processors with INIT/SIPI (from CPL3, through the LAPIC ICR) and
 * report each vCPU. The APs run ap_main() at CPL3 and then idle in a pause loop. */
#include "scenarios.h"
#include "guest.h"

#define LAPIC 0xFEE00000ull

extern char ap_tramp[], ap_tramp_end[];
static volatile u32 online = 1;
static volatile u32 cpu_apic[MAX_CPUS];
static volatile u32 cpu_cpl[MAX_CPUS];
static volatile u64 cpu_spins[MAX_CPUS];

void ap_main(u64 index) {
    u64 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    cpu_apic[index] = apic_id();
    cpu_cpl[index] = (u32)(cs & 3);
    u64 n = 10000000; /* a native-speed loop, as proof the AP runs at CPL3 on its own */
    __asm__ volatile("1: dec %0; jnz 1b" : "+r"(n)::"cc");
    cpu_spins[index] = 10000000;
    __atomic_fetch_add(&online, 1, __ATOMIC_SEQ_CST);
}

static void icr(u32 lo) {
    mmio_w32(LAPIC + 0x310, 0);
    mmio_w32(LAPIC + 0x300, lo);
    u64 t0 = rdtsc();
    while ((mmio_r32(LAPIC + 0x300) & (1u << 12)) && rdtsc() - t0 < tsc_ms(100)) cpu_relax();
}

static void delay_us(u64 us) {
    u64 t0 = rdtsc();
    while (rdtsc() - t0 < tsc_us(us)) cpu_relax();
}

void sc_smp(void) {
    u64 expect = cmdline_u64("cpus", 0);
    memcpy((void *)(u64)AP_TRAMP, ap_tramp, (size_t)(ap_tramp_end - ap_tramp));
    cpu_apic[0] = apic_id();
    cpu_cpl[0] = 3;
    u64 t0 = rdtsc();
    icr(0x000C4500);                 /* INIT, all excluding self */
    delay_us(10000);
    icr(0x000C4600 | (AP_TRAMP >> 12)); /* SIPI */
    delay_us(200);
    icr(0x000C4600 | (AP_TRAMP >> 12));
    /* wait for the expected count, or until no AP arrives for a while */
    u32 last = online;
    u64 quiet = rdtsc(), limit = tsc_ms(cmdline_u64("timeout_ms", 10000));
    while (rdtsc() - t0 < limit) {
        if (expect && online >= expect) break;
        if (online != last) last = online, quiet = rdtsc();
        if (!expect && rdtsc() - quiet > tsc_ms(3000)) break;
        cpu_relax();
    }
    u64 ms = (rdtsc() - t0) * 1000 / tsc_hz;
    u32 n = online;
    for (u32 i = 0; i < n && i < MAX_CPUS; i++)
        printf("RESULT cpu=%u apic_id=%u cpl=%u\n", i, cpu_apic[i], cpu_cpl[i]);
    printf("RESULT cpus_online=%u startup_ms=%lu\n", n, (unsigned long)ms);
    if (expect && n != expect) fail("expected %lu vCPUs, %u came online", (unsigned long)expect, n);
}
