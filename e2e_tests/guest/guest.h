/* Shared declarations of the freestanding test guest. */
#ifndef GUEST_H
#define GUEST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "layout.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t i64;

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define ALIGN_UP(x, a) (((x) + ((a) - 1)) & ~((u64)(a) - 1))
#define barrier() __asm__ volatile("" ::: "memory")
#define mb() __asm__ volatile("mfence" ::: "memory")

/* ---- port I/O. Native `in`/`out` when IOPL=3 is honoured at CPL3 (hardware KVM); otherwise
 * (the emulating host raises #GP) through `int $0x80`. Decided once at boot (io_probe()). */
extern int io_native;
static inline u64 sys_io(u64 nr, u16 port, u32 v) {
    __asm__ volatile("int %[vec]" : "+a"(nr) : "d"(port), "S"(v), [vec] "i"(VEC_SYSCALL) : "rcx", "memory");
    return nr;
}
static inline void outb(u16 port, u8 v) {
    if (io_native) __asm__ volatile("outb %0, %1" ::"a"(v), "d"(port));
    else sys_io(SYS_OUTB, port, v);
}
static inline void outw(u16 port, u16 v) {
    if (io_native) __asm__ volatile("outw %0, %1" ::"a"(v), "d"(port));
    else sys_io(SYS_OUTW, port, v);
}
static inline void outl(u16 port, u32 v) {
    if (io_native) __asm__ volatile("outl %0, %1" ::"a"(v), "d"(port));
    else sys_io(SYS_OUTL, port, v);
}
static inline u8 inb(u16 port) {
    u8 v;
    if (!io_native) return (u8)sys_io(SYS_INB, port, 0);
    __asm__ volatile("inb %1, %0" : "=a"(v) : "d"(port));
    return v;
}
static inline u16 inw(u16 port) {
    u16 v;
    if (!io_native) return (u16)sys_io(SYS_INW, port, 0);
    __asm__ volatile("inw %1, %0" : "=a"(v) : "d"(port));
    return v;
}
static inline u32 inl(u16 port) {
    u32 v;
    if (!io_native) return (u32)sys_io(SYS_INL, port, 0);
    __asm__ volatile("inl %1, %0" : "=a"(v) : "d"(port));
    return v;
}

static inline u8 mmio_r8(u64 a) { return *(volatile u8 *)a; }
static inline u16 mmio_r16(u64 a) { return *(volatile u16 *)a; }
static inline u32 mmio_r32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_w8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_w16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void mmio_w32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void mmio_w64(u64 a, u64 v) { mmio_w32(a, (u32)v); mmio_w32(a + 4, (u32)(v >> 32)); }

static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void cpuid(u32 leaf, u32 sub, u32 r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}
static inline u64 sys_call(u64 nr, u64 arg) {
    __asm__ volatile("int %[vec]" : "+a"(nr) : "D"(arg), [vec] "i"(VEC_SYSCALL) : "rcx", "memory");
    return nr;
}

/* ---- boot.S */
extern u64 boot_info;
extern u32 boot_kind;
extern volatile u64 irq_count[256];
extern volatile u64 irq_isr_addr[256];
extern volatile u64 irq_isr_bits[256];
extern char __image_start[], __image_end[], __bss_start[], __bss_end[];

/* ---- lib.c */
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void serial_init(void);
void serial_putc(char c);
void serial_write(const char *s, size_t n);
int serial_getc(u64 timeout_tsc); /* -1 on timeout */
void hexstr(char *out, const u8 *data, size_t n);
__attribute__((noreturn)) void vm_exit(void);
__attribute__((noreturn)) void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- cmdline (main.c) */
const char *cmdline_get(const char *key); /* value of key=value, or NULL */
u64 cmdline_u64(const char *key, u64 dflt);

/* ---- memory (main.c): bump allocator over the RAM after the image, identity-mapped */
void *alloc(u64 size, u64 align); /* zeroed; fails the scenario if out of memory */
u64 ram_top(void);

/* ---- time.c */
extern u64 tsc_hz;
void time_init(void);
u64 tsc_ms(u64 ms);
u64 tsc_us(u64 us);
u64 elapsed_us(u64 t0);
u8 cmos_read(u8 reg);
u64 rtc_epoch(char *iso, size_t isolen);

/* ---- sha256.c */
typedef struct { u32 h[8]; u64 len; u8 buf[64]; u32 fill; } sha256_ctx;
void sha256_init(sha256_ctx *c);
void sha256_update(sha256_ctx *c, const void *data, size_t n);
void sha256_final(sha256_ctx *c, u8 out[32]);

/* ---- apic.c */
void apic_init(void);
u32 apic_id(void);
void ioapic_route(u32 gsi, u8 vector, int level);
void pic_mask_all(void);
void apic_timer_oneshot(u8 vector, u32 count);

#endif
