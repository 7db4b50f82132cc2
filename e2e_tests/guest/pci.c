/* PCI configuration mechanism #1 (ports 0xCF8/0xCFC), BAR sizing and assignment. */
#include "pci.h"

#define MAX_PCI 64
static struct pci_dev devs[MAX_PCI];
static int ndevs = -1;

static u32 addr(const struct pci_dev *d, u8 off) {
    return 0x80000000u | (u32)d->bus << 16 | (u32)d->dev << 11 | (u32)d->fn << 8 | (off & 0xFC);
}
u32 pci_read32(const struct pci_dev *d, u8 off) {
    outl(0xCF8, addr(d, off));
    return inl(0xCFC);
}
u16 pci_read16(const struct pci_dev *d, u8 off) {
    outl(0xCF8, addr(d, off));
    return inw(0xCFC + (off & 2));
}
u8 pci_read8(const struct pci_dev *d, u8 off) {
    outl(0xCF8, addr(d, off));
    return inb(0xCFC + (off & 3));
}
void pci_write32(const struct pci_dev *d, u8 off, u32 v) {
    outl(0xCF8, addr(d, off));
    outl(0xCFC, v);
}
void pci_write16(const struct pci_dev *d, u8 off, u16 v) {
    outl(0xCF8, addr(d, off));
    outw(0xCFC + (off & 2), v);
}
void pci_write8(const struct pci_dev *d, u8 off, u8 v) {
    outl(0xCF8, addr(d, off));
    outb(0xCFC + (off & 3), v);
}

static void size_bars(struct pci_dev *d) {
    int nbars = (d->hdr_type & 0x7F) == 0 ? 6 : (d->hdr_type & 0x7F) == 1 ? 2 : 0;
    u16 cmd = pci_read16(d, 0x04);
    pci_write16(d, 0x04, cmd & ~0x3); /* no decoding while the BARs hold all-ones */
    for (int i = 0; i < nbars; i++) {
        u8 off = 0x10 + 4 * i;
        u32 lo = pci_read32(d, off);
        pci_write32(d, off, 0xFFFFFFFF);
        u32 mlo = pci_read32(d, off);
        pci_write32(d, off, lo);
        if (!mlo) continue;
        if (lo & 1) {
            d->bar_io[i] = 1;
            d->bar[i] = lo & ~3u;
            d->bar_size[i] = (u16)(~(mlo & ~3u) + 1);
            continue;
        }
        u64 base = lo & ~0xFull, mask = mlo & ~0xFull;
        if (((lo >> 1) & 3) == 2 && i < 5) {
            u32 hi = pci_read32(d, off + 4);
            pci_write32(d, off + 4, 0xFFFFFFFF);
            u32 mhi = pci_read32(d, off + 4);
            pci_write32(d, off + 4, hi);
            base |= (u64)hi << 32;
            mask |= (u64)mhi << 32;
            d->bar_64[i] = 1;
        } else {
            mask |= 0xFFFFFFFF00000000ull;
        }
        d->bar[i] = base;
        d->bar_size[i] = ~mask + 1;
        if (d->bar_64[i]) i++;
    }
    pci_write16(d, 0x04, cmd);
}

static int overlaps(u64 a, u64 asz, u64 *end) {
    for (int k = 0; k < ndevs; k++)
        for (int i = 0; i < 6; i++) {
            struct pci_dev *d = &devs[k];
            if (d->bar_io[i] || !d->bar_size[i] || !d->bar[i]) continue;
            if (a < d->bar[i] + d->bar_size[i] && d->bar[i] < a + asz) {
                *end = d->bar[i] + d->bar_size[i];
                return 1;
            }
        }
    return 0;
}

static void assign_bars(void) {
    /* Memory BARs left at 0 (no firmware) or placed above 4 GiB (outside the identity map) go
     * into a window of the 32-bit PCI hole: 0xE0000000 by default (cmdline pci_window=). */
    u64 cursor = cmdline_u64("pci_window", 0xE0000000ull);
    for (int k = 0; k < ndevs; k++) {
        struct pci_dev *d = &devs[k];
        for (int i = 0; i < 6; i++) {
            u64 sz = d->bar_size[i];
            if (d->bar_io[i] || !sz || (d->bar[i] && d->bar[i] + sz <= 0x100000000ull)) continue;
            if (sz < 4096) sz = 4096;
            u64 p = ALIGN_UP(cursor, sz), end;
            while (overlaps(p, sz, &end)) p = ALIGN_UP(end, sz);
            if (p + sz > 0xFEC00000ull) {
                printf("WARN no room for BAR%d of %02x:%02x.%x\n", i, d->bus, d->dev, d->fn);
                continue;
            }
            u16 cmd = pci_read16(d, 0x04);
            pci_write16(d, 0x04, cmd & ~0x3);
            pci_write32(d, 0x10 + 4 * i, (u32)p | (d->bar_64[i] ? 4 : 0));
            if (d->bar_64[i]) pci_write32(d, 0x14 + 4 * i, 0);
            pci_write16(d, 0x04, cmd);
            d->bar[i] = p;
            d->bar_assigned[i] = 1;
            cursor = p + sz;
        }
    }
}

static void scan_bus(u8 bus, int depth) {
    for (u8 dev = 0; dev < 32; dev++) {
        for (u8 fn = 0; fn < 8; fn++) {
            struct pci_dev t = {.bus = bus, .dev = dev, .fn = fn};
            u32 id = pci_read32(&t, 0);
            if ((id & 0xFFFF) == 0xFFFF) {
                if (fn == 0) break;
                continue;
            }
            if (ndevs >= MAX_PCI) return;
            struct pci_dev *d = &devs[ndevs++];
            *d = t;
            d->vendor = id & 0xFFFF;
            d->device = id >> 16;
            d->class_rev = pci_read32(d, 0x08);
            d->hdr_type = pci_read8(d, 0x0E);
            u32 intr = pci_read32(d, 0x3C);
            d->irq_line = intr & 0xFF;
            d->irq_pin = (intr >> 8) & 0xFF;
            size_bars(d);
            if ((d->hdr_type & 0x7F) == 1 && depth < 8) {
                u8 sec = pci_read8(d, 0x19);
                if (sec > bus) scan_bus(sec, depth + 1);
            }
            if (fn == 0 && !(d->hdr_type & 0x80)) break;
        }
    }
}

int pci_scan(struct pci_dev **out) {
    if (ndevs < 0) {
        ndevs = 0;
        scan_bus(0, 0);
        assign_bars();
    }
    if (out) *out = devs;
    return ndevs;
}

struct pci_dev *pci_find(u16 vendor, const u16 *ids, int nth) {
    pci_scan(NULL);
    for (int k = 0; k < ndevs; k++) {
        if (devs[k].vendor != vendor) continue;
        for (const u16 *p = ids; *p; p++)
            if (devs[k].device == *p && nth-- == 0) return &devs[k];
    }
    return NULL;
}

u8 pci_find_cap(const struct pci_dev *d, u8 id, u8 start) {
    if (!(pci_read16(d, 0x06) & 0x10)) return 0;
    u8 p = start ? pci_read8(d, start + 1) : pci_read8(d, 0x34);
    for (int guard = 0; p && guard < 48; guard++) {
        p &= 0xFC;
        if (pci_read8(d, p) == id) return p;
        p = pci_read8(d, p + 1);
    }
    return 0;
}

void pci_enable(const struct pci_dev *d, int intx) {
    u16 cmd = pci_read16(d, 0x04);
    cmd |= 0x6; /* memory space, bus master */
    for (int i = 0; i < 6; i++)
        if (d->bar_io[i] && d->bar_size[i]) cmd |= 1;
    if (intx) cmd &= ~(1u << 10);
    else cmd |= 1u << 10; /* INTx disable */
    pci_write16(d, 0x04, cmd);
}
