/* virtio-blk driver (virtio 1.2 section 5.2) and the block scenarios. */
#include "blk.h"
#include "scenarios.h"

#define BLK_F_SIZE_MAX 1
#define BLK_F_SEG_MAX 2
#define BLK_F_RO 5
#define BLK_F_BLK_SIZE 6
#define BLK_F_FLUSH 9

static struct blk blks[4];

int blk_setup(struct blk *b) {
    u64 want = 1ull << BLK_F_SIZE_MAX | 1ull << BLK_F_SEG_MAX | 1ull << BLK_F_RO |
               1ull << BLK_F_BLK_SIZE | 1ull << BLK_F_FLUSH | 1ull << VIRTIO_F_INDIRECT_DESC |
               1ull << VIRTIO_F_EVENT_IDX;
    if (virtio_init(b->d, want)) return -1;
    b->q = virtio_queue(b->d, 0, (u16)cmdline_u64("queue_size", 256));
    if (!b->q) return -1;
    virtio_driver_ok(b->d);
    b->capacity = virtio_cfg64(b->d, 0);
    b->size_max = virtio_has(b->d, BLK_F_SIZE_MAX) ? virtio_cfg32(b->d, 8) : 0;
    b->seg_max = virtio_has(b->d, BLK_F_SEG_MAX) ? virtio_cfg32(b->d, 12) : 0;
    b->ro = virtio_has(b->d, BLK_F_RO);
    b->flush = virtio_has(b->d, BLK_F_FLUSH);
    return 0;
}

struct blk *blk_open(int nth) {
    struct vdev *d = virtio_find(VIRTIO_ID_BLOCK, nth);
    if (!d) fail("no virtio-blk device #%d", nth);
    struct blk *b = &blks[nth & 3];
    if (b->d == d) return b;
    memset(b, 0, sizeof(*b));
    b->d = d;
    if (blk_setup(b)) fail("virtio-blk init failed");
    printf("RESULT blk=%02x:%02x.%x capacity=%lu features=0x%lx ro=%d flush=%d queue_size=%u "
           "irq=%d\n",
           d->pci->bus, d->pci->dev, d->pci->fn, (unsigned long)b->capacity,
           (unsigned long)d->features, b->ro, b->flush, b->q->size, d->irq_mode);
    return b;
}

int blk_rw(struct blk *b, u32 type, u64 sector, void *buf, u32 len) {
    static struct blk_hdr *hdr;
    static volatile u8 *status;
    if (!hdr) hdr = alloc(sizeof(*hdr), 16), status = alloc(64, 64);
    hdr->type = type;
    hdr->reserved = 0;
    hdr->sector = sector;
    *status = 0xFF;
    struct vbuf v[3] = {{hdr, sizeof(*hdr)}, {buf, len}, {(const void *)status, 1}};
    int r;
    if (!len) {
        v[1] = v[2];
        r = vq_add(b->q, v, 1, 1, (void *)1);
    } else {
        r = vq_add(b->q, v, type == VIRTIO_BLK_T_OUT ? 2 : 1, type == VIRTIO_BLK_T_OUT ? 1 : 2,
                   (void *)1);
    }
    if (r) fail("virtio-blk: queue full");
    vq_kick(b->q);
    if (!vq_wait(b->q, NULL, tsc_ms(cmdline_u64("io_timeout_ms", 10000)))) return -1;
    return *status;
}

static u64 disk_bytes(struct blk *b) {
    u64 lim = cmdline_u64("bytes", 0);
    u64 cap = b->capacity * 512;
    return lim && lim < cap ? lim : cap;
}

void sc_blk_read_sha256(void) {
    struct blk *b = blk_open((int)cmdline_u64("disk", 0));
    u64 total = disk_bytes(b), chunk = 1 << 20;
    u8 *buf = alloc(chunk, 4096);
    sha256_ctx c;
    sha256_init(&c);
    u64 t0 = rdtsc();
    for (u64 off = 0; off < total; off += chunk) {
        u32 n = (u32)(total - off < chunk ? total - off : chunk);
        int st = blk_rw(b, VIRTIO_BLK_T_IN, off / 512, buf, n);
        if (st) fail("read at %lu: status %d", (unsigned long)off, st);
        sha256_update(&c, buf, n);
    }
    u64 us = elapsed_us(t0);
    u8 h[32];
    char hex[65];
    sha256_final(&c, h);
    hexstr(hex, h, 32);
    printf("RESULT sha256=%s bytes=%lu us=%lu\n", hex, (unsigned long)total, (unsigned long)us);
}

/* Deterministic content: byte i of the disk = low byte of a 64-bit mix of (seed, i / 8). */
static void pattern_fill(u8 *buf, u64 off, u32 n, u64 seed) {
    for (u32 i = 0; i < n; i += 8) {
        u64 x = (off + i) / 8 + seed * 0x9E3779B97F4A7C15ull;
        x ^= x >> 33;
        x *= 0xff51afd7ed558ccdull;
        x ^= x >> 33;
        memcpy(buf + i, &x, 8);
    }
}

void sc_blk_write_pattern(void) {
    struct blk *b = blk_open((int)cmdline_u64("disk", 0));
    if (b->ro) fail("disk is read-only");
    u64 total = disk_bytes(b), chunk = 1 << 20, seed = cmdline_u64("seed", 1);
    u8 *buf = alloc(chunk, 4096);
    sha256_ctx c;
    sha256_init(&c);
    for (u64 off = 0; off < total; off += chunk) {
        u32 n = (u32)(total - off < chunk ? total - off : chunk);
        pattern_fill(buf, off, n, seed);
        sha256_update(&c, buf, n);
        int st = blk_rw(b, VIRTIO_BLK_T_OUT, off / 512, buf, n);
        if (st) fail("write at %lu: status %d", (unsigned long)off, st);
    }
    int fl = b->flush ? blk_rw(b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0) : -2;
    /* read back the first chunk to check the device returns what it stored */
    u32 n = (u32)(total < chunk ? total : chunk);
    memset(buf, 0, n);
    int st = blk_rw(b, VIRTIO_BLK_T_IN, 0, buf, n);
    u8 *want = alloc(chunk, 4096);
    pattern_fill(want, 0, n, seed);
    u8 h[32];
    char hex[65];
    sha256_final(&c, h);
    hexstr(hex, h, 32);
    printf("RESULT written=%lu sha256=%s flush=%d readback=%d\n", (unsigned long)total, hex, fl,
           st == 0 && !memcmp(buf, want, n));
}

void sc_pci_list(void) {
    struct pci_dev *d;
    int n = pci_scan(&d);
    for (int i = 0; i < n; i++, d++) {
        printf("RESULT pci=%02x:%02x.%x vendor=0x%04x device=0x%04x class=0x%06x irq_pin=%u "
               "irq_line=%u",
               d->bus, d->dev, d->fn, d->vendor, d->device, d->class_rev >> 8, d->irq_pin,
               d->irq_line);
        for (int k = 0; k < 6; k++)
            if (d->bar_size[k])
                printf(" bar%d=%s:0x%lx/0x%lx%s", k, d->bar_io[k] ? "io" : d->bar_64[k] ? "mem64" : "mem32",
                       (unsigned long)d->bar[k], (unsigned long)d->bar_size[k],
                       d->bar_assigned[k] ? "*" : "");
        printf("\n");
    }
    printf("RESULT pci_count=%d\n", n);
}

void sc_blk_resize(void) {
    /* Wait for the host to resize the disk (crosvm disk resize): the new capacity must arrive
     * with a configuration-change interrupt, and the new last sector must be readable. */
    struct blk *b = blk_open((int)cmdline_u64("disk", 0));
    int vec = virtio_config_irq(b->d);
    u64 irqs0 = vec >= 0 ? irq_count[vec] : 0;
    u64 cap0 = b->capacity, cap;
    printf("READY blk-resize capacity=%lu config_vector=%d\n", (unsigned long)cap0, vec);
    u64 deadline = rdtsc() + tsc_ms(cmdline_u64("timeout_ms", 60000));
    while ((cap = virtio_cfg64(b->d, 0)) == cap0) {
        if (rdtsc() > deadline) fail("blk-resize: the capacity never changed");
        cpu_relax();
    }
    u64 t = rdtsc() + tsc_ms(2000); /* the interrupt may trail the config write a little */
    while (vec >= 0 && irq_count[vec] == irqs0 && rdtsc() < t) cpu_relax();
    b->capacity = cap;
    u8 *buf = alloc(512, 512);
    int st = blk_rw(b, VIRTIO_BLK_T_IN, cap - 1, buf, 512);
    printf("RESULT resized old=%lu new=%lu config_irqs=%lu isr_bits=0x%lx read_last=%d\n",
           (unsigned long)cap0, (unsigned long)cap,
           (unsigned long)(vec >= 0 ? irq_count[vec] - irqs0 : 0),
           (unsigned long)(vec >= 0 ? irq_isr_bits[vec] : 0), st);
    if (st) fail("blk-resize: reading the new last sector failed (status %d)", st);
}
