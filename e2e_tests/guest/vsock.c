/*
 * virtio-vsock (virtio 1.2 section 5.10), stream sockets, both directions.
 *
 * vsock-echo: accept one connection from the host on `port` (default 5000), echo what arrives,
 * finish when the stream ends with "END\n" or the host shuts down. Received bytes wait in a
 * pending ring until the host has credit for their echo, and only then count as forwarded
 * (fwd_cnt), so the host can never send more than the ring (buf_alloc) holds and nothing is lost.
 *
 * vsock-connect: connect to the host (CID 2) on `port`, send `bytes` seeded pseudo-random bytes
 * while reading everything the host sends, hash both directions, and close cleanly: SHUTDOWN,
 * then wait for the peer's RST (5.10.6.6). `close=guest` half-closes (SHUTDOWN SEND) as soon as
 * everything is sent; `close=host` waits for the host's SHUTDOWN first, then sends SHUTDOWN with
 * both flags. A port nobody listens on must be answered with RST (printed, not a failure).
 *
 * Both check the device: a packet beyond the credit we advertised fails the run, so does a
 * packet longer than the buffer it came in.
 */
#include "scenarios.h"
#include "virtio.h"

#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define TYPE_STREAM 1
#define SHUT_RCV 1
#define SHUT_SEND 2
#define HDR 44
#define HOST_CID 2
#define MAX_PKT (64 * 1024) /* largest payload we send in one packet (as Linux) */
#define NRX 32
#define NTX 64

struct __attribute__((packed)) vsock_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
};

/* One stream: our counters and what the peer last told us of its own. */
struct vconn {
    u32 lport, pport;
    u32 buf_alloc, fwd_cnt, fwd_sent, tx_cnt, peer_alloc, peer_fwd;
    u64 rx_total; /* payload bytes received */
};

static struct virtq *rxq, *txq;
static u64 my_cid;
static u32 rx_payload; /* payload room of one rx buffer (rx_buf=, default 64 KiB) */
static u8 *rx_done[NRX]; /* used rx buffers not given back yet */
static u32 rx_ndone, rx_nposted;
static u8 *tx_free[NTX];
static u32 tx_nfree;

static void vs_init(void) {
    struct vdev *d = virtio_find(VIRTIO_ID_VSOCK, 0);
    if (!d) fail("no virtio-vsock device");
    if (virtio_init(d, 1ull << VIRTIO_F_INDIRECT_DESC | 1ull << VIRTIO_F_EVENT_IDX)) fail("vsock init");
    rxq = virtio_queue(d, 0, 64);
    txq = virtio_queue(d, 1, NTX);
    struct virtq *evq = virtio_queue(d, 2, 8);
    if (!rxq || !txq || !evq) fail("vsock: missing queues");
    u8 *ev = alloc(64, 64);
    struct vbuf e = {ev, 4};
    vq_add(evq, &e, 0, 1, ev);
    virtio_driver_ok(d);
    vq_kick(evq);
    my_cid = virtio_cfg64(d, 0);
    rx_payload = (u32)cmdline_u64("rx_buf", 64 * 1024);
    if (rx_payload < 64 || rx_payload > (1u << 20)) fail("vsock: rx_buf=%u out of range", rx_payload);
    u32 nrx = NRX < rxq->size ? NRX : rxq->size;
    rx_nposted = nrx;
    for (u32 i = 0; i < nrx; i++) {
        u8 *b = alloc(HDR + rx_payload, 4096);
        struct vbuf v = {b, HDR + rx_payload};
        vq_add(rxq, &v, 0, 1, b);
    }
    vq_kick(rxq);
    for (u32 i = 0; i < txq->size && i < NTX; i++) tx_free[tx_nfree++] = alloc(HDR + MAX_PKT, 4096);
}

/* Used rx buffers go back in batches, as Linux refills its rx queue: one kick per batch. */
static void rx_flush(void) {
    if (!rx_ndone) return;
    for (u32 i = 0; i < rx_ndone; i++) {
        struct vbuf v = {rx_done[i], HDR + rx_payload};
        vq_add(rxq, &v, 0, 1, rx_done[i]);
    }
    rx_ndone = 0;
    vq_kick(rxq);
}

/* A used rx buffer (NULL if none) after checking the length the device claims it wrote. */
static u8 *rx_get(struct vsock_hdr *h) {
    u32 len;
    u8 *b = vq_get(rxq, &len);
    if (!b) {
        rx_flush(); /* idle: give back what we hold */
        return NULL;
    }
    if (len > HDR + rx_payload) fail("vsock: device wrote %u bytes into a %u-byte buffer", len, HDR + rx_payload);
    if (len < HDR) fail("vsock: device used an rx buffer with %u bytes (less than a header)", len);
    memcpy(h, b, HDR);
    if (h->len > len - HDR) fail("vsock: packet len %u but only %u payload bytes written", h->len, len - HDR);
    return b;
}

static void rx_put(u8 *b) {
    rx_done[rx_ndone++] = b;
    if (rx_ndone >= rx_nposted / 2) rx_flush();
}

static void tx_reclaim(void) {
    u8 *b;
    while ((b = vq_get(txq, NULL))) tx_free[tx_nfree++] = b;
}

/* A free tx buffer: waits for the device to consume one if all are in flight. */
static u8 *tx_buf(void) {
    tx_reclaim();
    u64 t0 = rdtsc();
    while (!tx_nfree) {
        vq_kick(txq);
        u8 *b = vq_wait(txq, NULL, tsc_ms(1000));
        if (b) tx_free[tx_nfree++] = b;
        else if (rdtsc() - t0 > tsc_ms(30000)) fail("vsock: the device stopped taking tx packets");
    }
    return tx_free[--tx_nfree];
}

/* Send the packet in `b` (payload already at b + HDR). */
static void tx_send(u8 *b, u64 dst_cid, u32 sport, u32 dport, u16 op, u32 flags, u32 len,
                    u32 buf_alloc, u32 fwd_cnt) {
    struct vsock_hdr h = {
        .src_cid = my_cid, .dst_cid = dst_cid, .src_port = sport, .dst_port = dport, .len = len,
        .type = TYPE_STREAM, .op = op, .flags = flags, .buf_alloc = buf_alloc, .fwd_cnt = fwd_cnt,
    };
    memcpy(b, &h, HDR);
    struct vbuf v = {b, HDR + len};
    if (vq_add(txq, &v, 1, 0, b)) fail("vsock: tx queue full");
    vq_kick(txq);
}

/* Answer a packet that has no connection here with RST (never an RST with an RST). */
static void reply_rst(const struct vsock_hdr *in) {
    if (in->op == OP_RST) return;
    tx_send(tx_buf(), in->src_cid, in->dst_port, in->src_port, OP_RST, 0, 0, 0, 0);
}

static void conn_send(struct vconn *c, u8 *b, u16 op, u32 flags, u32 len) {
    tx_send(b, HOST_CID, c->lport, c->pport, op, flags, len, c->buf_alloc, c->fwd_cnt);
    c->fwd_sent = c->fwd_cnt;
    if (op == OP_RW) c->tx_cnt += len;
}

static void conn_ctrl(struct vconn *c, u16 op, u32 flags) { conn_send(c, tx_buf(), op, flags, 0); }

static u32 conn_credit(const struct vconn *c) {
    u32 in_flight = c->tx_cnt - c->peer_fwd;
    return in_flight >= c->peer_alloc ? 0 : c->peer_alloc - in_flight;
}

/* After our SHUTDOWN: wait for the peer's RST (5.10.6.6), which our device sends only once
 * everything we sent reached the host. Returns 1 if it came; otherwise we reset. */
static int wait_rst(struct vconn *c, u32 *peer_shut) {
    u64 t0 = rdtsc(), limit = tsc_ms(cmdline_u64("rst_wait_ms", 10000));
    while (rdtsc() - t0 < limit) {
        struct vsock_hdr h;
        u8 *b = rx_get(&h);
        if (!b) {
            tx_reclaim();
            cpu_relax();
            continue;
        }
        int ours = h.dst_port == c->lport && h.src_port == c->pport;
        u16 op = h.op;
        if (ours && op == OP_SHUTDOWN) *peer_shut |= h.flags & (SHUT_RCV | SHUT_SEND);
        if (ours && op == OP_RW && h.len) fail("vsock: %u data bytes after we shut down", h.len);
        if (!ours) reply_rst(&h);
        rx_put(b);
        if (ours && op == OP_RST) return 1;
    }
    conn_ctrl(c, OP_RST, 0);
    return 0;
}

/* The device may have at most buf_alloc bytes unconsumed by our last advertised fwd_cnt. */
static void check_credit(const struct vconn *c, u32 plen) {
    u32 unacked = (u32)c->rx_total - c->fwd_sent; /* received but not yet told consumed */
    if ((u64)unacked + plen > c->buf_alloc)
        fail("vsock: host overran our credit (%u unacked + %u > buf_alloc %u)", unacked, plen, c->buf_alloc);
}

static u32 read_u32_param(const char *key, u32 dflt, u32 lo, u32 hi) {
    u64 v = cmdline_u64(key, dflt);
    if (v < lo || v > hi) fail("vsock: %s=%lu out of range [%u, %u]", key, (unsigned long)v, lo, hi);
    return (u32)v;
}

/* ---- vsock-echo ---------------------------------------------------------------------------- */

void sc_vsock_echo(void) {
    vs_init();
    u32 port = (u32)cmdline_u64("port", 5000);
    u32 buf_alloc = read_u32_param("buf_alloc", 1u << 20, 4096, 64u << 20);
    u8 *pending = alloc(buf_alloc, 4096); /* received, not yet echoed (a ring) */
    u32 p_head = 0, p_len = 0;
    printf("READY vsock-echo cid=%lu port=%u\n", (unsigned long)my_cid, port);
    struct vconn c = {.lport = port, .buf_alloc = buf_alloc};
    int connected = 0, done = 0, end_seen = 0, credit_asked = 0, rst = 0;
    u32 peer_shut = 0;
    u8 tail[4] = {0};
    u64 deadline = rdtsc() + tsc_ms(cmdline_u64("timeout_ms", 30000));
    while (!done) {
        struct vsock_hdr h;
        u8 *b = rx_get(&h);
        if (!b) {
            if (rdtsc() > deadline) fail("vsock-echo: timeout (connected=%d)", connected);
            tx_reclaim();
            cpu_relax();
            continue;
        }
        u32 plen = h.len;
        if (h.dst_cid != my_cid) {
            /* not for us: drop */
        } else if (h.dst_port != port || (connected ? h.src_port != c.pport : h.op != OP_REQUEST)) {
            reply_rst(&h); /* another connection, or nothing listening there */
        } else {
            c.peer_alloc = h.buf_alloc, c.peer_fwd = h.fwd_cnt;
            switch (h.op) {
            case OP_REQUEST:
                if (connected) { reply_rst(&h); break; }
                connected = 1;
                c.pport = h.src_port;
                conn_ctrl(&c, OP_RESPONSE, 0);
                break;
            case OP_RW: {
                check_credit(&c, plen);
                if (plen > buf_alloc - p_len) fail("vsock-echo: pending ring overflow");
                c.rx_total += plen;
                u32 at = (p_head + p_len) % buf_alloc, first = buf_alloc - at;
                if (first > plen) first = plen;
                memcpy(pending + at, b + HDR, first);
                memcpy(pending, b + HDR + first, plen - first);
                p_len += plen;
                for (u32 i = plen > 4 ? plen - 4 : 0; i < plen; i++) {
                    tail[0] = tail[1], tail[1] = tail[2], tail[2] = tail[3];
                    tail[3] = b[HDR + i];
                }
                if (!memcmp(tail, "END\n", 4)) end_seen = 1;
                break;
            }
            case OP_CREDIT_REQUEST:
                conn_ctrl(&c, OP_CREDIT_UPDATE, 0);
                break;
            case OP_SHUTDOWN:
                conn_ctrl(&c, OP_RST, 0);
                done = 1;
                break;
            case OP_RST:
                rst = 1;
                done = 1;
                break;
            default:
                break;
            }
        }
        rx_put(b);
        /* Echo what the host has credit for; ask for its counters once when it has none. */
        while (p_len && !done) {
            u32 credit = conn_credit(&c);
            if (!credit) {
                if (!credit_asked) conn_ctrl(&c, OP_CREDIT_REQUEST, 0);
                credit_asked = 1;
                break;
            }
            credit_asked = 0;
            u32 n = p_len < credit ? p_len : credit;
            if (n > MAX_PKT) n = MAX_PKT;
            if (n > buf_alloc - p_head) n = buf_alloc - p_head; /* contiguous part of the ring */
            u8 *t = tx_buf();
            memcpy(t + HDR, pending + p_head, n);
            c.fwd_cnt += n; /* consumed from our buffer: the header below tells the host */
            conn_send(&c, t, OP_RW, 0, n);
            p_head = (p_head + n) % buf_alloc;
            p_len -= n;
        }
        if (end_seen && !p_len && !done) {
            conn_ctrl(&c, OP_SHUTDOWN, SHUT_RCV | SHUT_SEND);
            rst = wait_rst(&c, &peer_shut);
            done = 1;
        }
    }
    u64 t0 = rdtsc();
    while (tx_nfree != txq->size && rdtsc() - t0 < tsc_ms(2000)) tx_reclaim();
    printf("RESULT vsock_cid=%lu vsock_rx=%lu vsock_tx=%u rst=%d\n", (unsigned long)my_cid,
           (unsigned long)c.rx_total, c.tx_cnt, rst);
}

/* ---- vsock-connect ------------------------------------------------------------------------- */

/* The byte stream the guest sends: splitmix64 of (seed, word index), little-endian words. */
static u64 splitmix(u64 x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static void fill_stream(u8 *dst, u64 seed, u64 off, u32 n) {
    u32 i = 0;
    while (i < n) {
        u64 pos = off + i;
        u64 w = splitmix(seed * 0x100000001B3ull ^ (pos >> 3));
        if (!(pos & 7) && n - i >= 8) {
            memcpy(dst + i, &w, 8);
            i += 8;
        } else {
            dst[i++] = (u8)(w >> (8 * (pos & 7)));
        }
    }
}

void sc_vsock_connect(void) {
    vs_init();
    u32 port = (u32)cmdline_u64("port", 5000);
    u64 total = cmdline_u64("bytes", 1u << 20);
    u64 seed = cmdline_u64("seed", 1);
    int hash = (int)cmdline_u64("hash", 1);
    const char *cl = cmdline_get("close");
    int host_first = cl && !strcmp(cl, "host");
    u64 timeout = tsc_ms(cmdline_u64("timeout_ms", 60000));
    struct vconn c = {
        .lport = (u32)cmdline_u64("local_port", 49152), .pport = port,
        .buf_alloc = read_u32_param("buf_alloc", 256 * 1024, 4096, 64u << 20),
    };
    sha256_ctx sent_h, recv_h;
    sha256_init(&sent_h);
    sha256_init(&recv_h);
    printf("READY vsock-connect cid=%lu port=%u bytes=%lu\n", (unsigned long)my_cid, port,
           (unsigned long)total);
    conn_ctrl(&c, OP_REQUEST, 0);
    enum { CONNECTING, OPEN, CLOSED } state = CONNECTING;
    int reset = 0, rst_rcvd = 0, credit_asked = 0;
    u32 peer_shut = 0, our_shut = 0, stalls = 0, credit_updates = 0, pkts_rx = 0;
    u64 sent = 0, t_open = 0, us = 0, deadline = rdtsc() + timeout;
    while (state != CLOSED) {
        if (rdtsc() > deadline)
            fail("vsock-connect: timeout (state=%d sent=%lu recv=%lu peer_shut=%u our_shut=%u)", state,
                 (unsigned long)sent, (unsigned long)c.rx_total, peer_shut, our_shut);
        int progress = 0;
        struct vsock_hdr h;
        u8 *b;
        /* everything the device has for us */
        while (state != CLOSED && (b = rx_get(&h))) {
            progress = 1;
            if (h.dst_cid != my_cid || h.src_cid != HOST_CID) {
                /* not ours: drop */
            } else if (h.dst_port != c.lport || h.src_port != c.pport) {
                reply_rst(&h);
            } else {
                c.peer_alloc = h.buf_alloc, c.peer_fwd = h.fwd_cnt;
                switch (h.op) {
                case OP_RESPONSE:
                    if (state != CONNECTING) fail("vsock-connect: RESPONSE on an open connection");
                    state = OPEN;
                    t_open = rdtsc();
                    break;
                case OP_RST:
                    if (state == CONNECTING) reset = 1;
                    rst_rcvd = 1;
                    state = CLOSED;
                    break;
                case OP_RW:
                    if (state != OPEN) fail("vsock-connect: data before RESPONSE");
                    if (peer_shut & SHUT_SEND) fail("vsock-connect: data after the host's SHUTDOWN(SEND)");
                    check_credit(&c, h.len);
                    if (hash) sha256_update(&recv_h, b + HDR, h.len);
                    c.rx_total += h.len;
                    c.fwd_cnt += h.len; /* consumed at once */
                    pkts_rx++;
                    break;
                case OP_SHUTDOWN:
                    peer_shut |= h.flags & (SHUT_RCV | SHUT_SEND);
                    break;
                case OP_CREDIT_UPDATE:
                    credit_updates++;
                    break;
                case OP_CREDIT_REQUEST:
                    conn_ctrl(&c, OP_CREDIT_UPDATE, 0);
                    break;
                default:
                    fail("vsock-connect: unexpected op %u from the host", h.op);
                }
            }
            rx_put(b);
        }
        if (state != OPEN) {
            if (!progress) cpu_relax();
            continue;
        }
        /* Return credit once half of our buffer is consumed but not yet advertised. */
        if (c.fwd_cnt - c.fwd_sent >= c.buf_alloc / 2) conn_ctrl(&c, OP_CREDIT_UPDATE, 0);
        /* Send as far as the host's credit goes (one packet per pass keeps rx serviced). */
        if (sent < total && !(peer_shut & SHUT_RCV) && !(our_shut & SHUT_SEND)) {
            u32 credit = conn_credit(&c);
            if (!credit) {
                if (!credit_asked) {
                    stalls++;
                    conn_ctrl(&c, OP_CREDIT_REQUEST, 0);
                }
                credit_asked = 1;
            } else {
                credit_asked = 0;
                u64 n = total - sent;
                if (n > credit) n = credit;
                if (n > MAX_PKT) n = MAX_PKT;
                u8 *t = tx_buf();
                if (hash) {
                    fill_stream(t + HDR, seed, sent, (u32)n);
                    sha256_update(&sent_h, t + HDR, n);
                }
                conn_send(&c, t, OP_RW, 0, (u32)n);
                sent += n;
                progress = 1;
            }
        }
        int sent_all = sent == total || (peer_shut & SHUT_RCV);
        if (sent_all && !our_shut && (!host_first || (peer_shut & SHUT_SEND))) {
            /* guest first: half-close now; host first: the host is done, so close both ways */
            our_shut = host_first ? SHUT_RCV | SHUT_SEND : SHUT_SEND;
            conn_ctrl(&c, OP_SHUTDOWN, our_shut);
            if (!us) us = elapsed_us(t_open);
            progress = 1;
        }
        /* Both directions shut: the peer's RST ends it; if it never comes, we reset. */
        if (our_shut && (peer_shut & SHUT_SEND || our_shut == (SHUT_RCV | SHUT_SEND))) {
            rst_rcvd = wait_rst(&c, &peer_shut);
            state = CLOSED;
        }
        if (!progress) {
            tx_reclaim();
            cpu_relax();
        }
    }
    u64 t0 = rdtsc();
    while (tx_nfree != txq->size && rdtsc() - t0 < tsc_ms(2000)) tx_reclaim();
    if (reset) {
        printf("RESULT vsock_connect=reset port=%u rst=1\n", port);
        return;
    }
    if (!us) us = elapsed_us(t_open);
    char sh[65] = {0}, rh[65] = {0};
    u8 d[32];
    if (hash) {
        sha256_final(&sent_h, d);
        hexstr(sh, d, 32);
        sha256_final(&recv_h, d);
        hexstr(rh, d, 32);
    } else {
        memcpy(sh, "none", 5);
        memcpy(rh, "none", 5);
    }
    printf("RESULT vsock_connect=ok port=%u sent=%lu sent_sha256=%s recv=%lu recv_sha256=%s "
           "peer_shutdown=%u rst=%d credit_stalls=%u credit_updates=%u rx_packets=%u us=%lu\n",
           port, (unsigned long)sent, sh, (unsigned long)c.rx_total, rh, peer_shut, rst_rcvd, stalls,
           credit_updates, pkts_rx, (unsigned long)us);
}
