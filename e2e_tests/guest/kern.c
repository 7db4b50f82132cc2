/* The only C that runs at CPL0: the fatal-exception report. It runs emulated, once. */
#include "guest.h"

struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rdi, rsi, rbp, rbx, rdx, rcx, rax;
    u64 vector, error, rip, cs, rflags, rsp, ss;
};

static u8 kinb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "d"(port));
    return v;
}

static void koutb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "d"(port)); }

static void kputc(char c) {
    while (!(kinb(0x3F8 + 5) & 0x20)) {
    }
    koutb(0x3F8, (u8)c);
}

static void kputs(const char *s) {
    while (*s) kputc(*s++);
}

static void kputx(u64 v) {
    kputs("0x");
    int started = 0;
    for (int sh = 60; sh >= 0; sh -= 4) {
        unsigned d = (v >> sh) & 15;
        if (d || started || sh == 0) {
            kputc("0123456789abcdef"[d]);
            started = 1;
        }
    }
}

void kernel_exception(struct frame *f, u64 cr2) {
    kputs("\r\nRESULT status=fail reason=exception vector=");
    kputx(f->vector);
    kputs(" error=");
    kputx(f->error);
    kputs(" rip=");
    kputx(f->rip);
    kputs(" cs=");
    kputx(f->cs);
    kputs(" rsp=");
    kputx(f->rsp);
    kputs(" cr2=");
    kputx(cr2);
    kputs("\r\n");
    koutb(0x64, 0xFE);
}
