/*
 * virtio-net driver (virtio 1.2 section 5.1, no offloads, no mergeable buffers) and the
 * net-echo / net-bench scenarios. Frames of EtherType 0x88B5 (IEEE local experimental) are
 * echoed back with the MAC addresses swapped; a frame whose payload starts "END" ends the run.
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

static void net_open(struct net *n) {
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
    n->rxb = alloc((u64)NRX * RXBUF, 4096);
    n->txb = alloc((u64)n->tx->size * RXBUF, 4096);
    for (u32 i = 0; i < NRX; i++) {
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
    net_open(&n);
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

void sc_net_bench(void) {
    /* Transmit `frames` test frames of `size` bytes to the broadcast address as fast as the
     * queue allows; the host counts what arrives. Reports the guest-side send rate. */
    struct net n;
    net_open(&n);
    u64 frames = cmdline_u64("frames", 10000);
    u32 size = (u32)cmdline_u64("size", 1514);
    if (size < 60 || size > RXBUF - NET_HDR) fail("net-bench: bad frame size %u", size);
    u8 f[RXBUF];
    memset(f, 0xFF, 6);
    memcpy(f + 6, n.mac, 6);
    f[12] = ETH_TEST >> 8, f[13] = ETH_TEST & 0xFF;
    for (u32 i = 14; i < size; i++) f[i] = (u8)i;
    printf("READY net-bench\n");
    u64 t0 = rdtsc();
    for (u64 i = 0; i < frames; i++) {
        memcpy(f + 14, &i, 8);
        while (net_send(&n, f, size)) {
            vq_kick(n.tx);
            cpu_relax();
        }
        if ((i & 15) == 15) vq_kick(n.tx);
    }
    vq_kick(n.tx);
    while (n.tx->num_free != n.tx->size) vq_wait(n.tx, NULL, tsc_ms(5000));
    u64 us = elapsed_us(t0);
    printf("RESULT net_bench_frames=%lu size=%u us=%lu pps=%lu mb_per_s=%lu\n", (unsigned long)frames,
           size, (unsigned long)us, (unsigned long)(us ? frames * 1000000 / us : 0),
           (unsigned long)(us ? frames * size / us : 0));
}
