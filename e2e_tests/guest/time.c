/* TSC calibration against the PIT (channel 2, read back through port 0x61), CMOS/RTC. */
#include "guest.h"

u64 tsc_hz;

u8 cmos_read(u8 reg) {
    outb(0x70, reg);
    return inb(0x71);
}

/* Latch and read PIT channel 0. *tsc is the midpoint of the TSC window that holds the latch,
 * *width that window (wide when the vCPU was preempted around the port access). */
static u16 pit0_count(u64 *tsc, u64 *width) {
    u64 a = rdtsc();
    outb(0x43, 0x00); /* latch channel 0 */
    u64 b = rdtsc();
    *tsc = a + (b - a) / 2;
    *width = b - a;
    u8 lo = inb(0x40);
    return (u16)(lo | inb(0x40) << 8);
}

/* The narrowest of a few samples: keeps preemption (busy hosts) out of the end points. */
static u16 pit0_sample(u64 *tsc, u64 *ticks, u16 *prev) {
    u64 best_w = ~0ull, best_t = 0, w, t;
    u16 best_c = 0;
    for (int i = 0; i < 5; i++) {
        u16 c = pit0_count(&t, &w);
        *ticks += (u16)(*prev - c);
        *prev = c;
        if (w < best_w) best_w = w, best_t = t, best_c = c;
    }
    /* ticks counts to the last sample; correct it back to the chosen one */
    *ticks -= (u16)(best_c - *prev);
    *tsc = best_t;
    return best_c;
}

static int pit_calibrate(u64 *hz) {
    /*
     * Channel 0 as a free-running 16-bit down counter (mode 2, reload 0 = 65536) read back with
     * latch commands. Not port 0x61/channel 2: crosvm's i8042 answers 0x61 with a constant 0x20.
     * IRQ 0 stays masked (PIC and IOAPIC), so the counter only serves as a clock here.
     */
    outb(0x43, 0x34);
    outb(0x40, 0);
    outb(0x40, 0);
    u64 t0, t1, ticks = 0, w, t;
    u16 prev = pit0_count(&t, &w);
    u16 c0 = pit0_sample(&t0, &ticks, &prev);
    ticks = (u16)(c0 - prev); /* from the chosen start sample to the latest reading */
    for (u64 spins = 0; ticks < 119318; spins++) { /* 100 ms of 1.193182 MHz */
        u16 cur = pit0_count(&t, &w);
        ticks += (u16)(prev - cur);
        prev = cur;
        if (spins > 100000 && ticks < 100) return -1; /* the counter does not move */
        if (spins > 2000000) return -1;
    }
    pit0_sample(&t1, &ticks, &prev);
    *hz = (t1 - t0) * 1193182ull / ticks;
    return 0;
}

static int cmos_calibrate(u64 *hz) {
    /* Two seconds edges of the RTC: exact to the TSC read latency, takes 1-2 s. */
    u8 s = cmos_read(0x00);
    u64 t0 = rdtsc();
    while (cmos_read(0x00) == s)
        if (rdtsc() - t0 > 20000000000ull) return -1;
    t0 = rdtsc();
    s = cmos_read(0x00);
    while (cmos_read(0x00) == s)
        if (rdtsc() - t0 > 20000000000ull) return -1;
    *hz = rdtsc() - t0;
    return 0;
}

void time_init(void) {
    u64 hz = 0;
    const char *src = cmdline_get("clock");
    if (!(src && !strcmp(src, "cmos")) && pit_calibrate(&hz) == 0 && hz > 100000000ull) {
        tsc_hz = hz;
        return;
    }
    if (cmos_calibrate(&hz) == 0) {
        tsc_hz = hz;
        return;
    }
    tsc_hz = 2000000000ull; /* a guess: every figure derived from it says so in clock= */
}

u64 tsc_ms(u64 ms) { return tsc_hz / 1000 * ms; }
u64 tsc_us(u64 us) { return tsc_hz / 1000000 * us; }
u64 elapsed_us(u64 t0) { return (rdtsc() - t0) * 1000000ull / tsc_hz; }

static unsigned bcd(u8 v, int is_bcd) { return is_bcd ? (v & 15) + (v >> 4) * 10 : v; }

static u64 days_from_civil(i64 y, unsigned m, unsigned d) {
    /* Howard Hinnant's algorithm: days since 1970-01-01 of a proleptic Gregorian date. */
    y -= m <= 2;
    i64 era = (y >= 0 ? y : y - 399) / 400;
    u64 yoe = (u64)(y - era * 400);
    u64 doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    u64 doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return (u64)(era * 146097 + (i64)doe - 719468);
}

u64 rtc_epoch(char *iso, size_t isolen) {
    u8 r[7], again[7];
    u8 regs[7] = {0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32};
    for (int tries = 0; tries < 5; tries++) {
        u64 t0 = rdtsc();
        while ((cmos_read(0x0A) & 0x80) && rdtsc() - t0 < tsc_ms(10)) cpu_relax();
        for (int i = 0; i < 7; i++) r[i] = cmos_read(regs[i]);
        for (int i = 0; i < 7; i++) again[i] = cmos_read(regs[i]);
        if (!memcmp(r, again, sizeof(r))) break;
    }
    u8 b = cmos_read(0x0B);
    int is_bcd = !(b & 0x04);
    unsigned sec = bcd(r[0], is_bcd), min = bcd(r[1], is_bcd);
    unsigned hour = bcd(r[2] & 0x7F, is_bcd);
    if (!(b & 0x02) && (r[2] & 0x80)) hour = (hour % 12) + 12; /* 12-hour mode, PM */
    unsigned day = bcd(r[3], is_bcd), mon = bcd(r[4], is_bcd), year = bcd(r[5], is_bcd);
    unsigned century = bcd(r[6], is_bcd);
    if (century < 19 || century > 30) century = 20;
    year += century * 100;
    snprintf(iso, isolen, "%04u-%02u-%02uT%02u:%02u:%02uZ", year, mon, day, hour, min, sec);
    return days_from_civil(year, mon, day) * 86400ull + hour * 3600ull + min * 60ull + sec;
}
