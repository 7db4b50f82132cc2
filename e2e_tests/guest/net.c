/*
 * virtio-net driver (virtio 1.2 section 5.1, no offloads, no mergeable buffers) and the
 * net-echo / net-bench scenarios. Frames of EtherType 0x88B5 (IEEE local experimental) are
 * echoed back with the MAC addresses swapped; a frame whose payload starts "END" ends the run.
 * net-bench measures one direction: dir=tx (guest -> host, default) or dir=rx (host -> guest).
 */
#include "scenarios.h"
#include "virtio.h"

#define NET_F_MAC 5
#define NET_HDR 12 /* struct virtio_net_hdr with VERSION_1 (num_buffers included) */
#define RXBUF 2048
#define NRX 64
#define ETH_TEST 0x88B5

struct net {
    struct vdev *d;
    struct virtq *rx, *tx;
    u8 mac[6];
    u8 *rxb, *txb;
    u32 txn;
};

static void net_open(struct net *n, u32 nrx) {
    /* nrx receive buffers are posted (0: as many as the ring holds). */
    n->d = virtio_find(VIRTIO_ID_NET, 0);
    if (!n->d) fail("no virtio-net device");
    if (virtio_init(n->d, 1ull << NET_F_MAC | 1ull << VIRTIO_F_INDIRECT_DESC |
                              1ull << VIRTIO_F_EVENT_IDX))
        fail("net init");
    n->rx = virtio_queue(n->d, 0, 256);
    n->tx = virtio_queue(n->d, 1, 256);
    if (!n->rx || !n->tx) fail("net: missing queues");
    virtio_driver_ok(n->d);
    for (int i = 0; i < 6; i++)
        n->mac[i] = virtio_has(n->d, NET_F_MAC) ? virtio_cfg8(n->d, i) : (u8)(i == 0 ? 2 : i);
    if (!nrx || nrx > n->rx->size) nrx = n->rx->size;
    n->rxb = alloc((u64)nrx * RXBUF, 4096);
    n->txb = alloc((u64)n->tx->size * RXBUF, 4096);
    for (u32 i = 0; i < nrx; i++) {
        struct vbuf v = {n->rxb + i * RXBUF, RXBUF};
        vq_add(n->rx, &v, 0, 1, n->rxb + i * RXBUF);
    }
    vq_kick(n->rx);
}

static int net_send(struct net *n, const u8 *frame, u32 len) {
    while (vq_get(n->tx, NULL)) {
    }
    if (!n->tx->num_free || len > RXBUF - NET_HDR) return -1;
    u8 *b = n->txb + (u64)(n->txn++ % n->tx->size) * RXBUF;
    memset(b, 0, NET_HDR);
    memcpy(b + NET_HDR, frame, len);
    struct vbuf v = {b, NET_HDR + len};
    if (vq_add(n->tx, &v, 1, 0, b)) return -1;
    return 0;
}

static void mac_str(char *out, const u8 *m) {
    snprintf(out, 18, "%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5]);
}

void sc_net_echo(void) {
    struct net n;
    net_open(&n, NRX);
    char mac[18];
    mac_str(mac, n.mac);
    printf("READY net-echo mac=%s\n", mac);
    u64 rx = 0, tx = 0, ignored = 0, bytes = 0, bad = 0;
    u64 deadline = rdtsc() + tsc_ms(cmdline_u64("timeout_ms", 30000));
    for (;;) {
        u32 len;
        u8 *b = vq_get(n.rx, &len);
        if (!b) {
            if (rdtsc() > deadline) fail("net-echo: timeout after %lu frames", (unsigned long)rx);
            cpu_relax();
            continue;
        }
        int end = 0;
        if (len > RXBUF || len < NET_HDR + 14) {
            bad++;
        } else {
            u8 *f = b + NET_HDR;
            u32 flen = len - NET_HDR;
            if ((f[12] << 8 | f[13]) != ETH_TEST) {
                ignored++;
            } else {
                rx++;
                bytes += flen;
                end = flen >= 17 && !memcmp(f + 14, "END", 3);
                u8 out[RXBUF];
                memcpy(out, f + 6, 6); /* dst = their src */
                memcpy(out + 6, n.mac, 6);
                memcpy(out + 12, f + 12, flen - 12);
                while (net_send(&n, out, flen)) cpu_relax();
                vq_kick(n.tx);
                tx++;
            }
        }
        struct vbuf v = {b, RXBUF};
        vq_add(n.rx, &v, 0, 1, b);
        vq_kick(n.rx);
        if (end) break;
    }
    u64 t0 = rdtsc();
    while (n.tx->num_free != n.tx->size && rdtsc() - t0 < tsc_ms(2000)) vq_get(n.tx, NULL);
    printf("RESULT net_rx=%lu net_tx=%lu net_bytes=%lu ignored=%lu bad=%lu\n", (unsigned long)rx,
           (unsigned long)tx, (unsigned long)bytes, (unsigned long)ignored, (unsigned long)bad);
}

static void bench_tx(struct net *n, u64 frames, u32 size) {
    /* Every transmit slot holds the same frame (header zeroed): per frame the guest only
     * stamps a sequence number and makes the slot available, so the VMM, not the guest, is
     * what is measured. Free slots are refilled in bursts; a kick is only an exit when the
     * device asked for one (EVENT_IDX avail_event), as in a real driver. */
    struct virtq *q = n->tx;
    for (u32 s = 0; s < q->size; s++) {
        u8 *b = n->txb + (u64)s * RXBUF;
        memset(b, 0, NET_HDR);
        u8 *f = b + NET_HDR;
        memset(f, 0xFF, 6);
        memcpy(f + 6, n->mac, 6);
        f[12] = ETH_TEST >> 8, f[13] = ETH_TEST & 0xFF;
        for (u32 i = 14; i < size; i++) f[i] = (u8)i;
    }
    printf("READY net-bench dir=tx\n");
    u64 t0 = rdtsc(), i = 0, full = 0;
    while (i < frames) {
        while (vq_get(q, NULL)) {
        }
        if (!q->num_free) {
            full++;
            vq_kick(q);
            cpu_relax();
            continue;
        }
        while (q->num_free && i < frames) {
            u8 *b = n->txb + (u64)(n->txn++ % q->size) * RXBUF;
            memcpy(b + NET_HDR + 14, &i, 8);
            struct vbuf v = {b, NET_HDR + size};
            if (vq_add(q, &v, 1, 0, b)) fail("net-bench: vq_add");
            i++;
        }
        vq_kick(q);
    }
    while (q->num_free != q->size)
        if (!vq_wait(q, NULL, tsc_ms(5000))) fail("net-bench: transmit completions stopped");
    u64 us = elapsed_us(t0);
    printf("RESULT net_bench_frames=%lu size=%u us=%lu pps=%lu mb_per_s=%lu kicks=%lu "
           "ring_full=%lu\n",
           (unsigned long)frames, size, (unsigned long)us,
           (unsigned long)(us ? frames * 1000000 / us : 0),
           (unsigned long)(us ? frames * size / us : 0), (unsigned long)q->notifies,
           (unsigned long)full);
}

static void bench_rx(struct net *n) {
    /* Count the test frames the host sends as fast as it can (sequence number in the first 8
     * payload bytes) from the first to the last one; a frame whose payload starts "END", or
     * `idle_ms` without frames, ends the run. Buffers go back to the ring at once, with a
     * kick per 32 (again only an exit when the device asked). */
    struct virtq *q = n->rx;
    char mac[18];
    mac_str(mac, n->mac);
    printf("READY net-bench dir=rx mac=%s\n", mac);
    u64 idle = tsc_ms(cmdline_u64("idle_ms", 2000));
    u64 deadline = rdtsc() + tsc_ms(cmdline_u64("timeout_ms", 120000));
    u64 count = 0, bytes = 0, first = 0, last = 0, maxseq = 0, reordered = 0, other = 0;
    u64 prev = ~0ull;
    u32 unkicked = 0;
    for (;;) {
        u32 len;
        u8 *b = vq_get(q, &len);
        if (!b) {
            if (unkicked) {
                vq_kick(q);
                unkicked = 0;
            }
            u64 now = rdtsc();
            if (count && now - last > idle) break;
            if (now > deadline) fail("net-bench rx: timeout after %lu frames", (unsigned long)count);
            cpu_relax();
            continue;
        }
        int end = 0;
        if (len >= NET_HDR + 22 && len <= RXBUF) {
            u8 *f = b + NET_HDR;
            if ((f[12] << 8 | f[13]) != ETH_TEST) {
                other++;
            } else if (!memcmp(f + 14, "END", 3)) {
                end = 1;
            } else {
                u64 now = rdtsc(), seq;
                memcpy(&seq, f + 14, 8);
                if (!count) first = now;
                last = now;
                count++;
                bytes += len - NET_HDR;
                if (seq > maxseq) maxseq = seq;
                if (prev != ~0ull && seq <= prev) reordered++;
                prev = seq;
            }
        } else {
            other++;
        }
        struct vbuf v = {b, RXBUF};
        vq_add(q, &v, 0, 1, b);
        if (++unkicked >= 32) {
            vq_kick(q);
            unkicked = 0;
        }
        if (end && count) break;
    }
    u64 us = count > 1 ? (last - first) * 1000 / tsc_ms(1) : 0;
    printf("RESULT net_rx_frames=%lu bytes=%lu us=%lu pps=%lu mb_per_s=%lu max_seq=%lu "
           "reordered=%lu other=%lu kicks=%lu\n",
           (unsigned long)count, (unsigned long)bytes, (unsigned long)us,
           (unsigned long)(us ? (count - 1) * 1000000 / us : 0),
           (unsigned long)(us ? bytes / us : 0), (unsigned long)maxseq, (unsigned long)reordered,
           (unsigned long)other, (unsigned long)q->notifies);
}

static void linger(void) {
    /* linger_ms: stay up after the RESULT line, so the host can still read the VMM's
     * counters (CPU time per thread) before it exits. */
    u64 t0 = rdtsc(), ms = cmdline_u64("linger_ms", 0);
    while (rdtsc() - t0 < tsc_ms(ms)) cpu_relax();
}

void sc_net_bench(void) {
    /* dir=tx (default): transmit `frames` test frames of `size` bytes to the broadcast
     * address as fast as the queue allows; the host counts what arrives. dir=rx: count the
     * frames the host sends. Both report the guest-side rate. */
    struct net n;
    const char *dir = cmdline_get("dir");
    int rx = dir && !strcmp(dir, "rx");
    net_open(&n, rx ? 0 : NRX);
    if (rx) {
        bench_rx(&n);
        linger();
        return;
    }
    u64 frames = cmdline_u64("frames", 10000);
    u32 size = (u32)cmdline_u64("size", 1514);
    if (size < 60 || size > RXBUF - NET_HDR) fail("net-bench: bad frame size %u", size);
    bench_tx(&n, frames, size);
    linger();
}
