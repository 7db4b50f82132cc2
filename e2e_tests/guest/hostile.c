/*
 * Hostile requests: malformed virtio-blk chains a buggy or malicious guest could send. Each case
 * reports whether the device completed it (and with which status), whether it asked for a reset
 * (DEVICE_NEEDS_RESET), and whether a valid request was served afterwards (survived=1), first
 * without and, failing that, after a device reset.
 */
#include "blk.h"
#include "scenarios.h"

#define RAW 8 /* raw descriptors live at the top of the ring: size-RAW .. size-1 */

static struct blk_hdr *hdr;
static volatile u8 *status;
static u8 *buf, *ref;

static u16 raw_base(struct virtq *q) {
    /* keep the driver's own allocator away from the raw descriptors */
    q->num_free = q->size - RAW;
    return q->size - RAW;
}

static void publish(struct virtq *q, u16 head) {
    q->token[head] = VQ_RAW_TOKEN;
    q->avail->ring[q->avail_idx & (q->size - 1)] = head;
    q->avail_idx++;
    barrier();
    q->avail->idx = q->avail_idx;
    vq_kick(q);
}

static void set(struct virtq *q, u16 i, u64 addr, u32 len, u16 flags, u16 next) {
    q->desc[i].addr = addr;
    q->desc[i].len = len;
    q->desc[i].flags = flags;
    q->desc[i].next = next;
}

static int valid_read(struct blk *b, u64 timeout) {
    memset(buf, 0, 4096);
    hdr->type = VIRTIO_BLK_T_IN, hdr->sector = 0, *status = 0xFF;
    struct vbuf v[3] = {{hdr, 16}, {buf, 4096}, {(const void *)status, 1}};
    if (vq_add(b->q, v, 1, 2, (void *)2)) return 0;
    vq_kick(b->q);
    u64 t0 = rdtsc();
    while (rdtsc() - t0 < timeout) {
        void *t = vq_wait(b->q, NULL, timeout);
        if (t == (void *)2) return *status == 0 && !memcmp(buf, ref, 4096);
        if (!t) break;
    }
    return 0;
}

static void run_case(struct blk *b, const char *name) {
    if (blk_setup(b)) fail("hostile %s: device init failed", name);
    struct virtq *q = b->q;
    u16 r = raw_base(q);
    u64 ring_addr = (u64)q->desc;
    hdr->type = VIRTIO_BLK_T_IN, hdr->reserved = 0, hdr->sector = 0, *status = 0xFF;
    const u16 N = VRING_DESC_F_NEXT, W = VRING_DESC_F_WRITE;
    if (!strcmp(name, "desc-oob")) {
        set(q, r, (u64)hdr, 16, N, r + 1);
        set(q, r + 1, 1ull << 46, 4096, N | W, r + 2); /* far outside guest RAM */
        set(q, r + 2, (u64)status, 1, W, 0);
        publish(q, r);
    } else if (!strcmp(name, "len-overflow")) {
        set(q, r, (u64)hdr, 16, N, r + 1);
        set(q, r + 1, (u64)buf, 0xFFFFF000u, N | W, r + 2); /* runs off the end of RAM */
        set(q, r + 2, (u64)buf, 0x2000, N | W, r + 3);      /* and the sum overflows u32 */
        set(q, r + 3, (u64)status, 1, W, 0);
        publish(q, r);
    } else if (!strcmp(name, "chain-loop")) {
        set(q, r, (u64)hdr, 16, N, r + 1);
        set(q, r + 1, (u64)buf, 512, N | W, r + 2);
        set(q, r + 2, (u64)buf, 512, N | W, r + 1); /* back to r+1: never ends */
        publish(q, r);
    } else if (!strcmp(name, "chain-10k")) {
        const u32 n = 10000;
        struct vring_desc *t = alloc(16ull * n, 4096);
        t[0] = (struct vring_desc){(u64)hdr, 16, N, 1};
        for (u32 k = 1; k < n - 1; k++) t[k] = (struct vring_desc){(u64)buf, 512, N | W, (u16)(k + 1)};
        t[n - 1] = (struct vring_desc){(u64)status, 1, W, 0};
        set(q, r, (u64)t, 16 * n, VRING_DESC_F_INDIRECT, 0);
        publish(q, r);
    } else if (!strcmp(name, "wo-header")) {
        set(q, r, (u64)hdr, 16, N | W, r + 1); /* header must be device-readable */
        set(q, r + 1, (u64)buf, 4096, N | W, r + 2);
        set(q, r + 2, (u64)status, 1, W, 0);
        publish(q, r);
    } else if (!strcmp(name, "ro-status")) {
        set(q, r, (u64)hdr, 16, N, r + 1);
        set(q, r + 1, (u64)buf, 4096, N | W, r + 2);
        set(q, r + 2, (u64)status, 1, 0, 0); /* status must be device-writable */
        publish(q, r);
    } else if (!strcmp(name, "bad-head")) {
        q->token[0] = VQ_RAW_TOKEN;
        q->avail->ring[q->avail_idx & (q->size - 1)] = (u16)(q->size + 7); /* no such descriptor */
        q->avail_idx++;
        barrier();
        q->avail->idx = q->avail_idx;
        vq_kick(q);
    } else if (!strcmp(name, "avail-overrun")) {
        set(q, r, (u64)hdr, 16, N, r + 1);
        set(q, r + 1, (u64)buf, 4096, N | W, r + 2);
        set(q, r + 2, (u64)status, 1, W, 0);
        for (u16 k = 0; k < q->size; k++) q->avail->ring[k] = r;
        q->token[r] = VQ_RAW_TOKEN;
        q->avail_idx = (u16)(q->avail_idx + q->size + 5); /* more entries than the ring holds */
        barrier();
        q->avail->idx = q->avail_idx;
        vq_kick(q);
    } else if (!strcmp(name, "nested-indirect")) {
        struct vring_desc *inner = alloc(16 * 3, 64), *outer = alloc(16 * 2, 64);
        inner[0] = (struct vring_desc){(u64)hdr, 16, N, 1};
        inner[1] = (struct vring_desc){(u64)buf, 4096, N | W, 2};
        inner[2] = (struct vring_desc){(u64)status, 1, W, 0};
        outer[0] = (struct vring_desc){(u64)inner, 48, VRING_DESC_F_INDIRECT, 0}; /* forbidden */
        set(q, r, (u64)outer, 16, VRING_DESC_F_INDIRECT, 0);
        publish(q, r);
    } else if (!strcmp(name, "indirect-odd-len")) {
        struct vring_desc *t = alloc(16 * 3, 64);
        t[0] = (struct vring_desc){(u64)hdr, 16, N, 1};
        t[1] = (struct vring_desc){(u64)buf, 4096, N | W, 2};
        t[2] = (struct vring_desc){(u64)status, 1, W, 0};
        set(q, r, (u64)t, 16 * 3 - 5, VRING_DESC_F_INDIRECT, 0); /* not a multiple of 16 */
        publish(q, r);
    } else if (!strcmp(name, "queue-mmio")) {
        /* re-place queue 0's descriptor table over the device's own MMIO (its common config) */
        virtio_reset(b->d);
        virtio_init(b->d, b->d->features);
        u64 cc = b->d->common;
        mmio_w16(cc + 0x16, 0);
        mmio_w16(cc + 0x18, q->size);
        mmio_w64(cc + 0x20, cc);
        mmio_w64(cc + 0x28, (u64)q->avail);
        mmio_w64(cc + 0x30, (u64)q->used);
        mmio_w16(cc + 0x1C, 1);
        virtio_driver_ok(b->d);
        memset((void *)q->avail, 0, 6 + 2ull * q->size);
        memset((void *)q->used, 0, 6 + 8ull * q->size);
        q->avail_idx = q->kicked_idx = q->last_used = 0;
        publish(q, 0);
        ring_addr = cc;
    } else {
        fail("unknown hostile case %s", name);
    }
    (void)ring_addr;
    /* did the device complete the bad request? */
    int completed = 0, st = -1;
    u64 t0 = rdtsc();
    while (rdtsc() - t0 < tsc_ms(cmdline_u64("hostile_wait_ms", 300))) {
        if (q->used->idx != q->last_used) {
            completed = 1;
            st = *status;
            q->last_used = q->used->idx;
            break;
        }
        cpu_relax();
    }
    int needs_reset = (virtio_status(b->d) & VS_NEEDS_RESET) != 0;
    int survived = 0, reset = 0;
    /* the ring indices are no longer trustworthy after these: go straight to a reset */
    int ring_broken = !strcmp(name, "queue-mmio") || !strcmp(name, "avail-overrun") ||
                      !strcmp(name, "bad-head");
    if (!needs_reset && !ring_broken) survived = valid_read(b, tsc_ms(2000));
    if (!survived) {
        reset = 1;
        if (blk_setup(b) == 0) survived = valid_read(b, tsc_ms(5000));
    }
    printf("RESULT hostile=%s completed=%d status=%d needs_reset=%d reset=%d survived=%d\n", name,
           completed, st, needs_reset, reset, survived);
}

void sc_hostile(void) {
    static const char *cases[] = {"desc-oob",   "len-overflow",    "chain-loop",
                                  "chain-10k",  "wo-header",       "ro-status",
                                  "bad-head",   "avail-overrun",   "nested-indirect",
                                  "indirect-odd-len", "queue-mmio"};
    struct blk *b = blk_open((int)cmdline_u64("disk", 0));
    hdr = alloc(sizeof(*hdr), 16);
    status = alloc(64, 64);
    buf = alloc(1 << 16, 4096);
    ref = alloc(4096, 4096);
    if (blk_rw(b, VIRTIO_BLK_T_IN, 0, ref, 4096)) fail("hostile: initial read failed");
    const char *only = cmdline_get("case");
    int n = 0, ok = 0;
    for (unsigned i = 0; i < ARRAY_SIZE(cases); i++) {
        if (only && strcmp(only, "all") && strcmp(only, cases[i])) continue;
        run_case(b, cases[i]);
        n++;
    }
    (void)ok;
    if (!n) fail("unknown hostile case %s", only);
}
