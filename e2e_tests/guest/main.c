/* CPL3 entry: boot information, command line, memory, scenario dispatch. */
#include "guest.h"
#include "scenarios.h"

static char cmdline[2048];
static u64 heap_next, heap_end;
u64 mem_total;

struct memrange { u64 base, size; u32 type; };
static struct memrange memmap[64];
static unsigned memmap_n;

static void add_range(u64 base, u64 size, u32 type) {
    if (memmap_n < ARRAY_SIZE(memmap)) memmap[memmap_n++] = (struct memrange){base, size, type};
}

static void parse_boot_info(void) {
    const char *cl = NULL;
    if (boot_kind == BOOT_LINUX64) {
        u8 *bp = (u8 *)boot_info;
        cl = (const char *)(u64) * (u32 *)(bp + 0x228);
        unsigned n = bp[0x1e8];
        for (unsigned i = 0; i < n && i < 128; i++) {
            u8 *e = bp + 0x2d0 + 20 * i;
            add_range(*(u64 *)e, *(u64 *)(e + 8), *(u32 *)(e + 16));
        }
    } else if (boot_kind == BOOT_PVH) {
        u8 *si = (u8 *)boot_info;
        if (*(u32 *)si != 0x336ec578) fail("bad hvm_start_info magic");
        cl = (const char *)*(u64 *)(si + 24);
        if (*(u32 *)(si + 4) >= 1) {
            u8 *mm = (u8 *)*(u64 *)(si + 40);
            unsigned n = *(u32 *)(si + 48);
            for (unsigned i = 0; i < n && mm; i++)
                add_range(*(u64 *)(mm + 24 * i), *(u64 *)(mm + 24 * i + 8), *(u32 *)(mm + 24 * i + 16));
        }
    }
    if (cl) {
        size_t i = 0;
        for (; cl[i] && i < sizeof(cmdline) - 1; i++) cmdline[i] = cl[i];
        cmdline[i] = 0;
    }
    if (!memmap_n) {
        /* No map (old PVH start info): CMOS 0x34/0x35 = RAM above 16 MiB in 64 KiB units. */
        u64 above16 = ((u64)cmos_read(0x35) << 8 | cmos_read(0x34)) << 16;
        add_range(0, 0x9FC00, 1);
        add_range(0x100000, 0xF00000 + above16, 1);
    }
}

const char *cmdline_get(const char *key) {
    size_t kl = strlen(key);
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ') p++;
        if (!strncmp(p, key, kl) && p[kl] == '=') {
            static char val[8][256];
            static unsigned slot;
            char *v = val[slot++ % 8];
            const char *s = p + kl + 1;
            size_t i = 0;
            while (s[i] && s[i] != ' ' && i < 255) v[i] = s[i], i++;
            v[i] = 0;
            return v;
        }
        while (*p && *p != ' ') p++;
    }
    return NULL;
}

u64 cmdline_u64(const char *key, u64 dflt) {
    const char *v = cmdline_get(key);
    if (!v || !*v) return dflt;
    u64 r = 0;
    int base = 10;
    if (v[0] == '0' && v[1] == 'x') base = 16, v += 2;
    for (; *v; v++) {
        unsigned d;
        if (*v >= '0' && *v <= '9') d = *v - '0';
        else if (base == 16 && (*v | 32) >= 'a' && (*v | 32) <= 'f') d = (*v | 32) - 'a' + 10;
        else if (*v == 'k' || *v == 'K') return r << 10;
        else if (*v == 'm' || *v == 'M') return r << 20;
        else if (*v == 'g' || *v == 'G') return r << 30;
        else break;
        r = r * base + d;
    }
    return r;
}

static void heap_init(void) {
    u64 start = ALIGN_UP((u64)__image_end, 4096);
    for (unsigned i = 0; i < memmap_n; i++) {
        struct memrange *m = &memmap[i];
        if (m->type != 1) continue;
        mem_total += m->size;
        u64 lo = m->base, hi = m->base + m->size;
        if (hi > 0xC0000000ull) hi = 0xC0000000ull; /* only the RAM part of the identity map */
        if (lo < start) lo = start;
        if (hi > lo && hi - lo > heap_end - heap_next) heap_next = lo, heap_end = hi;
    }
    if (heap_end - heap_next < (1u << 20)) fail("no usable RAM after the image");
}

void *alloc(u64 size, u64 align) {
    u64 p = ALIGN_UP(heap_next, align ? align : 16);
    if (p + size > heap_end || p + size < p) fail("out of memory (alloc %lu)", (unsigned long)size);
    heap_next = p + size;
    memset((void *)p, 0, size);
    return (void *)p;
}

u64 ram_top(void) { return heap_end; }

static const struct scenario scenarios[] = {
    {"hello", sc_hello},
    {"cpuid", sc_cpuid},
    {"rtc", sc_rtc},
    {"speed", sc_speed},
    {"pci-list", sc_pci_list},
    {"serial-echo", sc_serial_echo},
    {"blk-read-sha256", sc_blk_read_sha256},
    {"blk-write-pattern", sc_blk_write_pattern},
    {"blk-resize", sc_blk_resize},
    {"blk-bench", sc_blk_bench},
    {"rng-read", sc_rng_read},
    {"console-echo", sc_console_echo},
    {"net-echo", sc_net_echo},
    {"net-bench", sc_net_bench},
    {"balloon", sc_balloon},
    {"vsock-echo", sc_vsock_echo},
    {"vsock-connect", sc_vsock_connect},
    {"hostile", sc_hostile},
    {"irq", sc_irq},
    {"smp", sc_smp},
};

int io_native;
int io_probe(void);

void user_main(void) {
    memset(__bss_start, 0, (size_t)(__bss_end - __bss_start));
    io_native = io_probe();
    serial_init();
    parse_boot_info();
    heap_init();
    apic_init();
    time_init();
    const char *name = cmdline_get("scenario");
    if (!name) name = "hello";
    printf("\nGUEST boot=%s scenario=%s\n", boot_kind == BOOT_PVH ? "pvh" : "linux64", name);
    u64 fl;
    __asm__ volatile("pushfq; popq %0" : "=r"(fl));
    printf("RESULT boot=%s io=%s rflags=0x%lx mem_mib=%lu tsc_mhz=%lu heap_mib=%lu\n",
           boot_kind == BOOT_PVH ? "pvh" : "linux64", io_native ? "native" : "syscall",
           (unsigned long)fl, (unsigned long)(mem_total >> 20),
           (unsigned long)(tsc_hz / 1000000), (unsigned long)((heap_end - heap_next) >> 20));
    for (unsigned i = 0; i < ARRAY_SIZE(scenarios); i++) {
        if (!strcmp(scenarios[i].name, name)) {
            scenarios[i].run();
            printf("RESULT status=ok scenario=%s\n", name);
            vm_exit();
        }
    }
    fail("unknown-scenario:%s", name);
}
