/* Local APIC and IOAPIC programming, done from CPL3 through the user-mapped MMIO pages. */
#include "guest.h"

#define LAPIC 0xFEE00000ull
#define IOAPIC 0xFEC00000ull

void pic_mask_all(void) {
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
}

void apic_init(void) {
    pic_mask_all();
    mmio_w32(LAPIC + 0xF0, 0x1FF); /* software enable, spurious vector 0xFF */
    mmio_w32(LAPIC + 0x80, 0);     /* TPR: accept everything */
}

u32 apic_id(void) { return mmio_r32(LAPIC + 0x20) >> 24; }

static void ioapic_write(u32 reg, u32 v) {
    mmio_w32(IOAPIC, reg);
    mmio_w32(IOAPIC + 0x10, v);
}

void ioapic_route(u32 gsi, u8 vector, int level) {
    /* PCI INTx is level-triggered, active low; ISA edges are active high. */
    u32 lo = vector | (level ? (1u << 15) | (1u << 13) : 0);
    ioapic_write(0x11 + 2 * gsi, apic_id() << 24);
    ioapic_write(0x10 + 2 * gsi, lo);
}

void apic_timer_oneshot(u8 vector, u32 count) {
    mmio_w32(LAPIC + 0x3E0, 0xB);    /* divide by 1 */
    mmio_w32(LAPIC + 0x320, vector); /* one-shot, unmasked */
    mmio_w32(LAPIC + 0x380, count);
}
