/*
 * virtio-balloon (virtio 1.2 section 5.5): inflate gives guest pages back to the host, deflate
 * takes them back. mode=self inflates `pages` pages on its own and deflates them again;
 * mode=host follows the device's num_pages target (set from the host, e.g. QMP `balloon`):
 * inflate to it, report, then deflate when the target returns to 0.
 */
#include "scenarios.h"
#include "virtio.h"

#define BALLOON_F_MUST_TELL_HOST 0

static struct vdev *d;
static struct virtq *inq, *defq;
static u32 *pfns;

static void xfer(struct virtq *q, u32 *list, u32 n) {
    struct vbuf v = {list, n * 4};
    if (vq_add(q, &v, 1, 0, list)) fail("balloon: queue full");
    vq_kick(q);
    if (!vq_wait(q, NULL, tsc_ms(10000))) fail("balloon: device did not take %u pfns", n);
}

static void set_actual(u32 pages) { virtio_cfg_w32(d, 4, pages); }

static void move_pages(struct virtq *q, u8 *base, u32 pages) {
    for (u32 done = 0; done < pages;) {
        u32 n = pages - done > 256 ? 256 : pages - done;
        for (u32 i = 0; i < n; i++) pfns[i] = (u32)(((u64)base >> 12) + done + i);
        xfer(q, pfns, n);
        done += n;
    }
}

void sc_balloon(void) {
    d = virtio_find(VIRTIO_ID_BALLOON, 0);
    if (!d) fail("no virtio-balloon device");
    if (virtio_init(d, 1ull << BALLOON_F_MUST_TELL_HOST)) fail("balloon init");
    inq = virtio_queue(d, 0, 64);
    defq = virtio_queue(d, 1, 64);
    if (!inq || !defq) fail("balloon: missing queues");
    virtio_driver_ok(d);
    pfns = alloc(4096, 4096);
    const char *mode = cmdline_get("mode");
    if (mode && !strcmp(mode, "host")) {
        u64 max = cmdline_u64("max_pages", 16384);
        u8 *pool = alloc(max << 12, 4096);
        printf("READY balloon\n");
        u64 deadline = rdtsc() + tsc_ms(cmdline_u64("timeout_ms", 30000));
        u32 target;
        while (!(target = virtio_cfg32(d, 0))) {
            if (rdtsc() > deadline) fail("balloon: no target from the host");
            u64 t = rdtsc();
            while (rdtsc() - t < tsc_ms(2)) cpu_relax();
        }
        if (target > max) fail("balloon: target %u pages above max_pages=%lu", target, (unsigned long)max);
        move_pages(inq, pool, target);
        set_actual(target);
        printf("RESULT balloon_inflated=%u actual=%u\n", target, virtio_cfg32(d, 4));
        while (virtio_cfg32(d, 0)) {
            if (rdtsc() > deadline) fail("balloon: target never returned to 0");
            u64 t = rdtsc();
            while (rdtsc() - t < tsc_ms(2)) cpu_relax();
        }
        move_pages(defq, pool, target);
        set_actual(0);
        memset(pool, 0x5A, (u64)target << 12); /* the deflated pages are usable again */
        printf("RESULT balloon_deflated=%u actual=%u\n", target, virtio_cfg32(d, 4));
        return;
    }
    u32 pages = (u32)cmdline_u64("pages", 256);
    u8 *pool = alloc((u64)pages << 12, 4096);
    memset(pool, 0xA5, (u64)pages << 12);
    move_pages(inq, pool, pages);
    set_actual(pages);
    u32 actual = virtio_cfg32(d, 4);
    move_pages(defq, pool, pages);
    set_actual(0);
    u32 zeroed = 0; /* pages the host discarded while they were in the balloon */
    for (u32 p = 0; p < pages; p++) {
        u64 *w = (u64 *)(pool + ((u64)p << 12)), any = 0;
        for (int i = 0; i < 512; i++) any |= w[i];
        zeroed += !any;
    }
    memset(pool, 0x5A, (u64)pages << 12);
    printf("RESULT balloon_pages=%u actual_inflated=%u actual_after=%u zeroed=%u features=0x%lx\n",
           pages, actual, virtio_cfg32(d, 4), zeroed, (unsigned long)d->features);
}
