/* virtio-rng (virtio 1.2 section 5.4) and virtio-console (5.3, single port) scenarios. */
#include "scenarios.h"
#include "virtio.h"

void sc_rng_read(void) {
    struct vdev *d = virtio_find(VIRTIO_ID_RNG, 0);
    if (!d) fail("no virtio-rng device");
    if (virtio_init(d, 1ull << VIRTIO_F_INDIRECT_DESC | 1ull << VIRTIO_F_EVENT_IDX)) fail("rng init");
    struct virtq *q = virtio_queue(d, 0, 64);
    if (!q) fail("rng: no queue");
    virtio_driver_ok(d);
    u64 want = cmdline_u64("bytes", 65536), got = 0;
    u32 chunk = 4096;
    u8 *buf = alloc(want + chunk, 4096);
    u64 t0 = rdtsc();
    while (got < want) {
        struct vbuf v = {buf + got, chunk};
        if (vq_add(q, &v, 0, 1, buf + got)) fail("rng: queue full");
        vq_kick(q);
        u32 len = 0;
        if (!vq_wait(q, &len, tsc_ms(10000))) fail("rng: no data after 10 s");
        if (len > chunk) fail("rng: device claims %u bytes in a %u-byte buffer", len, chunk);
        got += len;
    }
    u64 us = elapsed_us(t0);
    u32 counts[256] = {0};
    u64 ones = 0;
    for (u64 i = 0; i < want; i++) {
        counts[buf[i]]++;
        for (u8 x = buf[i]; x; x &= (u8)(x - 1)) ones++; /* no popcnt: not emulated at CPL0 */
    }
    unsigned distinct = 0;
    for (int i = 0; i < 256; i++) distinct += counts[i] != 0;
    u8 h[32];
    char hex[65];
    sha256_ctx c;
    sha256_init(&c);
    sha256_update(&c, buf, want);
    sha256_final(&c, h);
    hexstr(hex, h, 32);
    printf("RESULT rng_bytes=%lu distinct=%u ones_permille=%lu us=%lu sha256=%s\n",
           (unsigned long)want, distinct, (unsigned long)(ones * 1000 / (want * 8)),
           (unsigned long)us, hex);
}

void sc_console_echo(void) {
    /* Echo whatever arrives on port 0 back to the host until the stream ends with "END\n". */
    struct vdev *d = virtio_find(VIRTIO_ID_CONSOLE, 0);
    if (!d) fail("no virtio-console device");
    if (virtio_init(d, 1ull << VIRTIO_F_INDIRECT_DESC | 1ull << VIRTIO_F_EVENT_IDX)) fail("console init");
    struct virtq *rx = virtio_queue(d, 0, 64), *tx = virtio_queue(d, 1, 64);
    if (!rx || !tx) fail("console: missing queues");
    virtio_driver_ok(d);
    const u32 nbuf = 16, bsz = 4096;
    u8 *rxb = alloc((u64)nbuf * bsz, 4096), *txb = alloc((u64)nbuf * bsz, 4096);
    for (u32 i = 0; i < nbuf; i++) {
        struct vbuf v = {rxb + i * bsz, bsz};
        vq_add(rx, &v, 0, 1, rxb + i * bsz);
    }
    vq_kick(rx);
    printf("READY console-echo\n");
    u64 rx_bytes = 0, tx_bytes = 0, chunks = 0;
    char tail[4] = {0};
    u32 txn = 0;
    u64 deadline = rdtsc() + tsc_ms(cmdline_u64("timeout_ms", 30000));
    for (;;) {
        u32 len;
        u8 *p = vq_get(rx, &len);
        if (!p) {
            if (rdtsc() > deadline) fail("console-echo: timeout after %lu bytes", (unsigned long)rx_bytes);
            while (vq_get(tx, NULL)) {
            }
            cpu_relax();
            continue;
        }
        if (len > bsz) fail("console: device claims %u bytes in a %u-byte buffer", len, bsz);
        rx_bytes += len;
        chunks++;
        for (u32 i = 0; i < len; i++) {
            memmove(tail, tail + 1, 3);
            tail[3] = (char)p[i];
        }
        /* copy out so the rx buffer can go straight back to the device */
        u8 *t = txb + (txn++ % nbuf) * bsz;
        memcpy(t, p, len);
        struct vbuf v = {p, bsz};
        vq_add(rx, &v, 0, 1, p);
        vq_kick(rx);
        while (!tx->num_free) vq_wait(tx, NULL, tsc_ms(5000));
        struct vbuf o = {t, len};
        if (len) {
            vq_add(tx, &o, 1, 0, t);
            vq_kick(tx);
            tx_bytes += len;
        }
        if (!memcmp(tail, "END\n", 4)) break;
    }
    while (tx->num_free != tx->size)
        if (!vq_wait(tx, NULL, tsc_ms(5000))) break;
    printf("RESULT console_rx=%lu console_tx=%lu chunks=%lu\n", (unsigned long)rx_bytes,
           (unsigned long)tx_bytes, (unsigned long)chunks);
}
