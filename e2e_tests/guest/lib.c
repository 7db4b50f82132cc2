/* libc-ish helpers, the 16550 UART and the i8042 exit. Runs at CPL3. */
#include "guest.h"

void *memcpy(void *d, const void *s, size_t n) {
    void *r = d;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return r;
}

void *memmove(void *d, const void *s, size_t n) {
    if ((uintptr_t)d <= (uintptr_t)s || (uintptr_t)d >= (uintptr_t)s + n)
        return memcpy(d, s, n);
    u8 *dd = (u8 *)d + n;
    const u8 *ss = (const u8 *)s + n;
    while (n--) *--dd = *--ss;
    return d;
}

void *memset(void *d, int c, size_t n) {
    void *r = d;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return r;
}

int memcmp(const void *a, const void *b, size_t n) {
    const u8 *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i]) return x[i] < y[i] ? -1 : 1;
    return 0;
}

size_t strlen(const char *s) {
    size_t n = 0;
    while (s[n]) n++;
    return n;
}

int strcmp(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return (u8)*a - (u8)*b;
}

int strncmp(const char *a, const char *b, size_t n) {
    for (; n; n--, a++, b++) {
        if (*a != *b) return (u8)*a - (u8)*b;
        if (!*a) return 0;
    }
    return 0;
}

/* ---- formatting: %d %i %u %x %X %s %c %p %% with l/ll/z modifiers, width and '0' flag */
struct out { char *buf; size_t size, len; };

static void put(struct out *o, char c) {
    if (o->len + 1 < o->size) o->buf[o->len] = c;
    o->len++;
}

static void put_num(struct out *o, u64 v, int base, int upper, int neg, int width, char pad) {
    char tmp[24];
    int n = 0;
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    do {
        tmp[n++] = digits[v % base];
        v /= base;
    } while (v);
    if (neg) tmp[n++] = '-';
    while (n < width) tmp[n++] = pad;
    while (n) put(o, tmp[--n]);
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap) {
    struct out o = {buf, size, 0};
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            put(&o, *fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0, lng = 0;
        if (*fmt == '0') pad = '0', fmt++;
        while (*fmt >= '0' && *fmt <= '9') width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l' || *fmt == 'z') lng++, fmt++;
        switch (*fmt) {
        case 'd':
        case 'i': {
            i64 v = lng ? va_arg(ap, i64) : va_arg(ap, int);
            put_num(&o, v < 0 ? (u64)-v : (u64)v, 10, 0, v < 0, width, pad);
            break;
        }
        case 'u':
            put_num(&o, lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 10, 0, 0, width, pad);
            break;
        case 'x':
        case 'X':
            put_num(&o, lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 16, *fmt == 'X', 0, width,
                    pad);
            break;
        case 'p':
            put(&o, '0'), put(&o, 'x');
            put_num(&o, (u64)va_arg(ap, void *), 16, 0, 0, width, pad);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s) s = "(null)";
            size_t n = strlen(s);
            for (size_t i = n; (int)i < width; i++) put(&o, ' ');
            while (*s) put(&o, *s++);
            break;
        }
        case 'c':
            put(&o, (char)va_arg(ap, int));
            break;
        case '%':
            put(&o, '%');
            break;
        default:
            put(&o, '%');
            if (*fmt) put(&o, *fmt);
            else fmt--;
        }
    }
    if (o.size) o.buf[o.len < o.size ? o.len : o.size - 1] = 0;
    return (int)o.len;
}

int snprintf(char *buf, size_t size, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int r = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return r;
}

void printf(const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(buf) - 1) n = sizeof(buf) - 1;
    serial_write(buf, (size_t)n);
}

void hexstr(char *out, const u8 *data, size_t n) {
    static const char d[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = d[data[i] >> 4];
        out[2 * i + 1] = d[data[i] & 15];
    }
    out[2 * n] = 0;
}

/* ---- 16550 UART on COM1. Each register access is one VM exit, so output checks LSR.THRE
 * only when the transmitter FIFO may be full (every 16 bytes), as the FIFO guarantees. */
#define COM1 0x3F8
static unsigned tx_budget;

void serial_init(void) {
    outb(COM1 + 1, 0x00); /* IER: no interrupts */
    outb(COM1 + 3, 0x80); /* LCR: DLAB */
    outb(COM1 + 0, 0x01); /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); /* 8N1 */
    outb(COM1 + 2, 0x05); /* FIFO enable, clear TX only: input typed before boot is kept */
    outb(COM1 + 4, 0x03); /* DTR | RTS */
    tx_budget = 0;
}

void serial_putc(char c) {
    if (tx_budget == 0) {
        u64 spins = 0;
        while (!(inb(COM1 + 5) & 0x20) && ++spins < 1000000) cpu_relax();
        tx_budget = 16;
    }
    outb(COM1, (u8)c);
    tx_budget--;
}

void serial_write(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\n') serial_putc('\r');
        serial_putc(s[i]);
    }
}

int serial_getc(u64 timeout_tsc) {
    u64 t0 = rdtsc();
    while (!(inb(COM1 + 5) & 0x01)) {
        if (timeout_tsc && rdtsc() - t0 > timeout_tsc) return -1;
        cpu_relax();
    }
    return inb(COM1);
}

/* ---- the end: i8042 pulse-reset (QEMU -no-reboot and crosvm both exit the VM on it) */
void vm_exit(void) {
    for (int i = 0; i < 100000 && (inb(0x64) & 0x02); i++) cpu_relax();
    outb(0x64, 0xFE);
    for (;;) cpu_relax();
}

void fail(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    printf("RESULT status=fail reason=%s\n", buf);
    vm_exit();
}
