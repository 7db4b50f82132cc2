/* blk-bench: sequential 1 MiB and random 4 KiB, reads and writes, queue depth 1 and 32. */
#include "blk.h"
#include "scenarios.h"

struct slot { struct blk_hdr hdr; u8 status; u8 pad[7]; u8 *buf; };

static u64 rng_state = 0x2545F4914F6CDD1Dull;
static u64 xorshift(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/*
 * Requests stopped completing. Say where the rings stand, then notify once more without
 * checking the device's suppression: if that brings completions, the device lost (or wrongly
 * suppressed) a notification; if not, it lost the requests.
 */
static void stall_report(struct blk *b, const char *name, u64 inflight) {
    struct virtq *q = b->q;
    u16 used = q->used->idx, flags = q->used->flags;
    u16 avail_event = *(volatile u16 *)((u64)q->used + 4 + 8ull * q->size);
    mmio_w16(q->notify_addr, q->index);
    u64 t = rdtsc();
    while (q->used->idx == used && rdtsc() - t < tsc_ms(2000)) cpu_relax();
    fail("%s:requests-never-completed inflight=%lu avail_idx=%u used_idx=%u last_used=%u "
         "avail_event=%u used_flags=%u event_idx=%d indirect=%d recovered_by_extra_kick=%d",
         name, (unsigned long)inflight, q->avail_idx, used, q->last_used, avail_event, flags,
         q->event_idx, q->use_indirect, q->used->idx != used);
}

/* one_pass=1: sequential tests end after one pass over the span (or at bench_ms). */
static int one_pass;

static void bench_one(struct blk *b, const char *name, int write, int random, u32 bs, u32 qd,
                      struct slot *slots, u64 span, u64 ms) {
    u64 blocks = span / bs, next_seq = 0, ops = 0, inflight = 0, errors = 0;
    if (!blocks) fail("disk too small for %s", name);
    u64 t0 = rdtsc(), deadline = t0 + tsc_ms(ms), tend;
    int stop = 0;
    u32 free_slots[64], nfree = qd;
    for (u32 i = 0; i < qd; i++) free_slots[i] = i;
    for (;;) {
        int added = 0;
        while (!stop && nfree) {
            if (one_pass && !random && next_seq >= blocks) {
                stop = 1; /* each block once: a buffered VMM must not re-read its page cache */
                break;
            }
            struct slot *s = &slots[free_slots[nfree - 1]];
            u64 blk = random ? xorshift() % blocks : next_seq++ % blocks;
            s->hdr.type = write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
            s->hdr.sector = blk * (bs / 512);
            s->status = 0xFF;
            struct vbuf v[3] = {{&s->hdr, 16}, {s->buf, bs}, {&s->status, 1}};
            if (vq_add(b->q, v, write ? 2 : 1, write ? 1 : 2, s)) break;
            nfree--;
            inflight++;
            added = 1;
        }
        if (added) vq_kick(b->q);
        struct slot *done;
        while ((done = vq_get(b->q, NULL))) {
            if (done->status) errors++;
            free_slots[nfree++] = (u32)(done - slots);
            inflight--;
            ops++;
        }
        if (!stop && rdtsc() >= deadline) stop = 1;
        if (stop && !inflight) break;
        if (rdtsc() - t0 > tsc_ms(ms + 30000)) stall_report(b, name, inflight);
        cpu_relax();
    }
    tend = rdtsc();
    u64 us = (tend - t0) * 1000000ull / tsc_hz;
    u64 bytes = ops * bs;
    u64 kbps = us ? bytes * 1000ull / us : 0; /* KB/s, 1 KB = 1000 B: bytes/us*1000 */
    u64 iops = us ? ops * 1000000ull / us : 0;
    printf("RESULT bench=%s bs=%u qd=%u ops=%lu us=%lu mb_per_s=%lu.%03lu iops=%lu errors=%lu notifies=%lu\n",
           name, bs, qd, (unsigned long)ops, (unsigned long)us, (unsigned long)(kbps / 1000),
           (unsigned long)(kbps % 1000), (unsigned long)iops, (unsigned long)errors,
           (unsigned long)b->q->notifies);
    b->q->notifies = 0;
}

void sc_blk_bench(void) {
    struct blk *b = blk_open((int)cmdline_u64("disk", 0));
    u64 ms = cmdline_u64("bench_ms", 1000);
    one_pass = (int)cmdline_u64("one_pass", 0);
    u64 span = b->capacity * 512;
    u64 lim = cmdline_u64("bytes", 0);
    if (lim && lim < span) span = lim;
    const char *only = cmdline_get("bench");
    u32 qd_max = (u32)cmdline_u64("qd", 32);
    if (qd_max > 64) qd_max = 64;
    if (qd_max > b->q->size) qd_max = b->q->size;
    struct slot *slots = alloc(sizeof(struct slot) * qd_max, 64);
    for (u32 i = 0; i < qd_max; i++) {
        slots[i].buf = alloc(1 << 20, 4096);
        for (u32 k = 0; k < (1u << 20); k += 8) {
            u64 x = xorshift();
            memcpy(slots[i].buf + k, &x, 8);
        }
    }
    static const struct { const char *name; int write, random; u32 bs; } tests[] = {
        {"seq-read", 0, 0, 1 << 20},  {"seq-write", 1, 0, 1 << 20},
        {"rand-read", 0, 1, 4096},    {"rand-write", 1, 1, 4096},
    };
    const u32 qds[2] = {1, qd_max};
    for (unsigned t = 0; t < ARRAY_SIZE(tests); t++) {
        if (only && strcmp(only, "all") && strcmp(only, tests[t].name)) continue;
        if (tests[t].write && b->ro) continue;
        for (int k = 0; k < 2; k++)
            bench_one(b, tests[t].name, tests[t].write, tests[t].random, tests[t].bs, qds[k],
                      slots, span, ms);
    }
    if (b->flush) blk_rw(b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0);
}

void sc_irq(void) {
    /* Real interrupts (irq=msix or irq=intx on the command line): count them per vector. */
    struct blk *b = blk_open((int)cmdline_u64("disk", 0));
    u8 *buf = alloc(4096, 4096);
    if (b->q->vector < 0) fail("no interrupt vector (irq=%s)", cmdline_get("irq"));
    u64 before = irq_count[b->q->vector];
    int n = (int)cmdline_u64("count", 16), ok = 0;
    for (int i = 0; i < n; i++) ok += blk_rw(b, VIRTIO_BLK_T_IN, (u64)i * 8, buf, 4096) == 0;
    printf("RESULT irq_mode=%s vector=0x%x requests=%d ok=%d interrupts=%lu waited=%lu "
           "isr_bits=0x%lx hlt=%d timer_irqs=%lu\n",
           b->d->irq_mode == IRQ_MSIX ? "msix" : b->d->irq_mode == IRQ_INTX ? "intx" : "poll",
           b->q->vector, n, ok, (unsigned long)(irq_count[b->q->vector] - before),
           (unsigned long)b->q->interrupts_waited, (unsigned long)irq_isr_bits[b->q->vector],
           irq_wait_hlt, (unsigned long)irq_count[VEC_TIMER]);
}
