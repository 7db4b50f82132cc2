/* virtio 1.x over PCI (modern interface, virtio spec 1.2 section 4.1), split virtqueues. */
#include "virtio.h"

/* common configuration structure offsets (virtio 1.2, 4.1.4.3) */
#define CC_DFSELECT 0x00
#define CC_DF 0x04
#define CC_GFSELECT 0x08
#define CC_GF 0x0C
#define CC_MSIX 0x10
#define CC_NUMQ 0x12
#define CC_STATUS 0x14
#define CC_CFGGEN 0x15
#define CC_Q_SELECT 0x16
#define CC_Q_SIZE 0x18
#define CC_Q_MSIX 0x1A
#define CC_Q_ENABLE 0x1C
#define CC_Q_NOFF 0x1E
#define CC_Q_DESC 0x20
#define CC_Q_AVAIL 0x28
#define CC_Q_USED 0x30

#define NO_VECTOR 0xFFFF

static struct vdev vdevs[16];
static int nvdevs;
static int next_msix_vec = VEC_MSIX_BASE;

int irq_wait_hlt = -1;

int virtio_irq_mode(void) {
    if (irq_wait_hlt < 0) {
        const char *w = cmdline_get("irq_wait");
        irq_wait_hlt = w && !strcmp(w, "hlt");
    }
    const char *m = cmdline_get("irq");
    if (m && !strcmp(m, "msix")) return IRQ_MSIX;
    if (m && !strcmp(m, "intx")) return IRQ_INTX;
    return IRQ_POLL;
}

static u64 bar_addr(struct pci_dev *p, u8 bar, u32 off) {
    if (bar > 5 || p->bar_io[bar] || !p->bar[bar]) return 0;
    return p->bar[bar] + off;
}

struct vdev *virtio_find(u16 type, int nth) {
    u16 ids[3] = {(u16)(0x1040 + type), 0, 0};
    /* transitional ids (still modern-capable): net 0x1000, blk 0x1001, balloon 0x1002,
     * console 0x1003, rng 0x1005 */
    static const u16 trans[] = {0, 0x1000, 0x1001, 0x1003, 0x1005, 0x1002};
    if (type < ARRAY_SIZE(trans)) ids[1] = trans[type];
    struct pci_dev *p = pci_find(VIRTIO_VENDOR, ids, nth);
    if (!p) return NULL;
    for (int i = 0; i < nvdevs; i++)
        if (vdevs[i].pci == p) return &vdevs[i];
    if (nvdevs >= (int)ARRAY_SIZE(vdevs)) return NULL;
    struct vdev *d = &vdevs[nvdevs++];
    memset(d, 0, sizeof(*d));
    d->pci = p;
    d->type = type;
    for (u8 c = pci_find_cap(p, 0x09, 0); c; c = pci_find_cap(p, 0x09, c)) {
        u8 cfg_type = pci_read8(p, c + 3), bar = pci_read8(p, c + 4);
        u32 off = pci_read32(p, c + 8);
        u64 a = bar_addr(p, bar, off);
        if (!a) continue;
        if (cfg_type == 1 && !d->common) d->common = a;
        else if (cfg_type == 2 && !d->notify) d->notify = a, d->notify_mult = pci_read32(p, c + 16);
        else if (cfg_type == 3 && !d->isr) d->isr = a;
        else if (cfg_type == 4 && !d->devcfg) d->devcfg = a;
    }
    if (!d->common || !d->notify) fail("virtio %02x:%02x.%x: no modern capabilities", p->bus, p->dev, p->fn);
    pci_enable(p, 0);
    u8 mc = pci_find_cap(p, 0x11, 0);
    if (mc) {
        u16 ctl = pci_read16(p, mc + 2);
        u32 tbl = pci_read32(p, mc + 4);
        d->msix_entries = (ctl & 0x7FF) + 1;
        d->msix_table = bar_addr(p, tbl & 7, tbl & ~7u);
    }
    return d;
}

u8 virtio_status(struct vdev *d) { return mmio_r8(d->common + CC_STATUS); }

void virtio_reset(struct vdev *d) {
    mmio_w8(d->common + CC_STATUS, 0);
    u64 t0 = rdtsc();
    while (mmio_r8(d->common + CC_STATUS) != 0 && rdtsc() - t0 < tsc_ms(1000)) cpu_relax();
    d->nvq = 0;
}

int virtio_has(struct vdev *d, int bit) { return (d->features >> bit) & 1; }

static void setup_irq(struct vdev *d) {
    d->irq_mode = virtio_irq_mode();
    if (d->irq_mode == IRQ_MSIX && !d->msix_table) d->irq_mode = IRQ_INTX;
    pci_enable(d->pci, d->irq_mode == IRQ_INTX);
    u8 mc = pci_find_cap(d->pci, 0x11, 0);
    if (mc) {
        u16 ctl = pci_read16(d->pci, mc + 2);
        if (d->irq_mode == IRQ_MSIX) ctl |= 0x8000;
        else ctl &= ~0x8000;
        pci_write16(d->pci, mc + 2, ctl & ~0x4000);
    }
    if (d->irq_mode == IRQ_INTX) {
        /* The handler reads (and so deasserts) this device's ISR. Which IOAPIC pin: on QEMU's
         * q35 (ICH9) PCI INTx reach the IOAPIC as PIRQ A-H = GSI 16-23 whatever the firmware
         * wrote into the interrupt-line register (that is the 8259 routing); elsewhere (crosvm,
         * MP-table machines) the interrupt line is the GSI. */
        irq_isr_addr[VEC_INTX] = d->isr;
        static const u16 ich9[] = {0x29C0, 0};
        u8 line = d->pci->irq_line;
        if (pci_find(0x8086, ich9, 0) || !line || line >= 24) {
            for (u32 g = 16; g < 24; g++) ioapic_route(g, VEC_INTX, 1);
        } else {
            ioapic_route(line, VEC_INTX, 1);
        }
    }
}

int virtio_init(struct vdev *d, u64 want) {
    virtio_reset(d);
    mmio_w8(d->common + CC_STATUS, VS_ACK);
    mmio_w8(d->common + CC_STATUS, VS_ACK | VS_DRIVER);
    mmio_w32(d->common + CC_DFSELECT, 0);
    u64 f = mmio_r32(d->common + CC_DF);
    mmio_w32(d->common + CC_DFSELECT, 1);
    f |= (u64)mmio_r32(d->common + CC_DF) << 32;
    d->offered = f;
    if (!(f >> VIRTIO_F_VERSION_1 & 1)) fail("virtio device without VERSION_1");
    const char *nf = cmdline_get("no_features"); /* e.g. no_features=28,29 */
    u64 mask = ~0ull;
    while (nf && *nf) {
        u64 b = 0;
        while (*nf >= '0' && *nf <= '9') b = b * 10 + (*nf++ - '0');
        mask &= ~(1ull << b);
        if (*nf) nf++;
    }
    d->features = f & (want | 1ull << VIRTIO_F_VERSION_1) & mask;
    mmio_w32(d->common + CC_GFSELECT, 0);
    mmio_w32(d->common + CC_GF, (u32)d->features);
    mmio_w32(d->common + CC_GFSELECT, 1);
    mmio_w32(d->common + CC_GF, (u32)(d->features >> 32));
    mmio_w8(d->common + CC_STATUS, VS_ACK | VS_DRIVER | VS_FEATURES_OK);
    if (!(virtio_status(d) & VS_FEATURES_OK)) {
        mmio_w8(d->common + CC_STATUS, VS_FAILED);
        return -1;
    }
    setup_irq(d);
    if (d->irq_mode == IRQ_MSIX) mmio_w16(d->common + CC_MSIX, NO_VECTOR);
    return 0;
}

static void msix_set(struct vdev *d, u16 entry, u8 vector) {
    u64 e = d->msix_table + 16ull * entry;
    mmio_w32(e + 0, 0xFEE00000u | apic_id() << 12);
    mmio_w32(e + 4, 0);
    mmio_w32(e + 8, vector);
    mmio_w32(e + 12, 0); /* unmasked */
}

struct virtq *virtio_queue(struct vdev *d, u16 i, u16 max_size) {
    if (i >= ARRAY_SIZE(d->vq)) return NULL;
    mmio_w16(d->common + CC_Q_SELECT, i);
    u16 size = mmio_r16(d->common + CC_Q_SIZE);
    if (!size) return NULL;
    if (max_size && size > max_size) size = max_size;
    while (size & (size - 1)) size &= size - 1; /* split rings must be a power of 2 */
    struct virtq *q = &d->vq[i];
    memset(q, 0, sizeof(*q));
    q->dev = d;
    q->index = i;
    q->size = size;
    q->desc = alloc(16ull * size, 4096);
    q->avail = alloc(6 + 2ull * size, 4096);
    q->used = alloc(6 + 8ull * size, 4096);
    q->token = alloc(sizeof(void *) * size, 8);
    q->use_indirect = virtio_has(d, VIRTIO_F_INDIRECT_DESC);
    q->event_idx = virtio_has(d, VIRTIO_F_EVENT_IDX);
    if (q->use_indirect) q->indirect = alloc(16ull * VQ_MAX_INDIRECT * size, 4096);
    for (u16 k = 0; k < size; k++) q->desc[k].next = k + 1;
    q->num_free = size;
    q->vector = -1;
    mmio_w16(d->common + CC_Q_SIZE, size);
    mmio_w64(d->common + CC_Q_DESC, (u64)q->desc);
    mmio_w64(d->common + CC_Q_AVAIL, (u64)q->avail);
    mmio_w64(d->common + CC_Q_USED, (u64)q->used);
    if (d->irq_mode == IRQ_MSIX && i < d->msix_entries && next_msix_vec < 0xF0) {
        q->vector = next_msix_vec++;
        msix_set(d, i, (u8)q->vector);
        mmio_w16(d->common + CC_Q_MSIX, i);
        if (mmio_r16(d->common + CC_Q_MSIX) != i) q->vector = -1;
    } else if (d->irq_mode == IRQ_INTX) {
        q->vector = VEC_INTX;
    }
    if (d->irq_mode == IRQ_POLL) {
        q->avail->flags = 1; /* VRING_AVAIL_F_NO_INTERRUPT */
        if (q->event_idx) q->avail->ring[size] = 0xFFFF; /* used_event far away */
    }
    u16 noff = mmio_r16(d->common + CC_Q_NOFF);
    q->notify_addr = d->notify + (u64)noff * d->notify_mult;
    mmio_w16(d->common + CC_Q_ENABLE, 1);
    if (i + 1 > d->nvq) d->nvq = i + 1;
    return q;
}

int virtio_config_irq(struct vdev *d) {
    /* Config-change interrupts: an MSI-X entry after the queues' (msix_config), or INTx, where the
     * handler's read of the ISR (bit 1 = configuration change) deasserts the line. */
    if (d->irq_mode == IRQ_INTX) return VEC_INTX;
    if (d->irq_mode != IRQ_MSIX || d->nvq >= d->msix_entries || next_msix_vec >= 0xF0) return -1;
    int vector = next_msix_vec++;
    msix_set(d, (u16)d->nvq, (u8)vector);
    mmio_w16(d->common + CC_MSIX, (u16)d->nvq);
    return mmio_r16(d->common + CC_MSIX) == d->nvq ? vector : -1;
}

void virtio_driver_ok(struct vdev *d) {
    mmio_w8(d->common + CC_STATUS, VS_ACK | VS_DRIVER | VS_FEATURES_OK | VS_DRIVER_OK);
}

static u32 cfg_gen(struct vdev *d) { return mmio_r8(d->common + CC_CFGGEN); }
u8 virtio_cfg8(struct vdev *d, u32 off) { return mmio_r8(d->devcfg + off); }
u16 virtio_cfg16(struct vdev *d, u32 off) { return mmio_r16(d->devcfg + off); }
u32 virtio_cfg32(struct vdev *d, u32 off) { return mmio_r32(d->devcfg + off); }
u64 virtio_cfg64(struct vdev *d, u32 off) {
    u32 g, lo, hi;
    do {
        g = cfg_gen(d);
        lo = mmio_r32(d->devcfg + off);
        hi = mmio_r32(d->devcfg + off + 4);
    } while (g != cfg_gen(d));
    return (u64)hi << 32 | lo;
}
void virtio_cfg_w32(struct vdev *d, u32 off, u32 v) { mmio_w32(d->devcfg + off, v); }

int vq_add(struct virtq *q, const struct vbuf *b, int nout, int nin, void *token) {
    int n = nout + nin;
    if (n <= 0) return -1;
    if (q->use_indirect && n > 1 && n <= VQ_MAX_INDIRECT) {
        if (!q->num_free) return -1;
        u16 head = q->free_head;
        q->free_head = q->desc[head].next;
        q->num_free--;
        struct vring_desc *t = q->indirect + (u64)head * VQ_MAX_INDIRECT;
        for (int k = 0; k < n; k++) {
            t[k].addr = (u64)b[k].addr;
            t[k].len = b[k].len;
            t[k].flags = (k < n - 1 ? VRING_DESC_F_NEXT : 0) | (k >= nout ? VRING_DESC_F_WRITE : 0);
            t[k].next = k + 1;
        }
        q->desc[head].addr = (u64)t;
        q->desc[head].len = 16u * n;
        q->desc[head].flags = VRING_DESC_F_INDIRECT;
        q->token[head] = token;
        q->avail->ring[q->avail_idx & (q->size - 1)] = head;
    } else {
        if (q->num_free < n) return -1;
        u16 head = q->free_head, cur = head, last = head;
        for (int k = 0; k < n; k++) {
            last = cur;
            q->desc[cur].addr = (u64)b[k].addr;
            q->desc[cur].len = b[k].len;
            q->desc[cur].flags = (k < n - 1 ? VRING_DESC_F_NEXT : 0) | (k >= nout ? VRING_DESC_F_WRITE : 0);
            cur = q->desc[cur].next;
        }
        q->free_head = cur;
        (void)last;
        q->num_free -= n;
        q->token[head] = token;
        q->avail->ring[q->avail_idx & (q->size - 1)] = head;
    }
    q->avail_idx++;
    barrier();
    q->avail->idx = q->avail_idx;
    return 0;
}

void vq_kick(struct virtq *q) {
    mb(); /* the avail index store must be visible before we read the device's suppression */
    u16 old = q->kicked_idx, now = q->avail_idx;
    int need;
    if (q->event_idx) {
        u16 ev = *(volatile u16 *)((u64)q->used + 4 + 8ull * q->size); /* avail_event */
        need = (u16)(now - ev - 1) < (u16)(now - old);
    } else {
        need = !(q->used->flags & 1);
    }
    q->kicked_idx = now;
    if (need) {
        mmio_w16(q->notify_addr, q->index);
        q->notifies++;
    }
}

void *vq_get(struct virtq *q, u32 *len) {
    u16 used_idx = q->used->idx;
    if (q->last_used == used_idx) return NULL;
    if ((u16)(used_idx - q->last_used) > q->size - q->num_free)
        fail("virtio-queue%u:used-index-jumped from=%u to=%u in_flight_descs=%u", q->index,
             q->last_used, used_idx, q->size - q->num_free);
    barrier();
    volatile struct vring_used_elem *e = &q->used->ring[q->last_used & (q->size - 1)];
    u32 id = e->id;
    if (len) *len = e->len;
    if (id >= q->size) fail("virtio: device returned bad used id %u", id);
    void *tok = q->token[id];
    if (!tok) /* never a head we made available, or completed twice: the device is broken */
        fail("virtio-queue%u:device-returned-id-%u-not-in-flight used_idx=%u last_used=%u "
             "len=%u", q->index, id, q->used->idx, q->last_used, e->len);
    q->token[id] = NULL;
    if (tok == VQ_RAW_TOKEN) { /* hand-built (hostile) chain: the caller owns its descriptors */
        q->last_used++;
        return tok;
    }
    /* return the chain to the free list */
    u16 cur = (u16)id, n = 1;
    while ((q->desc[cur].flags & VRING_DESC_F_NEXT) && n < q->size) cur = q->desc[cur].next, n++;
    q->desc[cur].next = q->free_head;
    q->free_head = (u16)id;
    q->num_free += n;
    q->last_used++;
    if (q->event_idx) {
        /* interrupt mode: ask for an interrupt on the next completion; poll mode: never */
        q->avail->ring[q->size] = q->vector >= 0 ? q->last_used : (u16)(q->last_used - 1);
    }
    return tok;
}

void *vq_wait(struct virtq *q, u32 *len, u64 timeout) {
    u64 t0 = rdtsc();
    for (;;) {
        void *t = vq_get(q, len);
        if (t) return t;
        if (q->vector >= 0) {
            /* interrupt mode: the CPL0 handler counts the vector; count what we waited on */
            if (irq_count[q->vector] != q->irq_seen) {
                q->irq_seen = irq_count[q->vector];
                q->interrupts_waited++;
                continue;
            }
            if (irq_wait_hlt) {
                /* sleep at CPL0 until the next interrupt; the LAPIC timer bounds the nap */
                apic_timer_oneshot(VEC_TIMER, 50000000);
                __asm__ volatile("int $0x80"
                                 : "+a"((u64){SYS_HLT})
                                 : "D"(&irq_count[q->vector]), "S"(q->irq_seen)
                                 : "rcx", "memory");
                continue;
            }
        }
        if (timeout && rdtsc() - t0 > timeout) return NULL;
        cpu_relax();
    }
}
