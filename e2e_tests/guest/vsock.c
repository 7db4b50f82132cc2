/*
 * virtio-vsock (virtio 1.2 section 5.10), stream sockets: accept one connection from the host
 * on `port` (default 5000), echo what arrives, finish when the stream ends with "END\n" or the
 * host shuts down. Credit-based flow control as the spec requires: received bytes wait in a
 * pending ring until the host has credit for their echo, and only then count as forwarded
 * (fwd_cnt), so the host can never send more than the ring (BUF_ALLOC) holds and nothing is lost.
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
#define HDR 44
#define PAYLOAD 4096
#define BUFSZ (HDR + PAYLOAD)
#define NRX 32
#define BUF_ALLOC (64 * 1024)

struct __attribute__((packed)) vsock_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
};

static struct virtq *rxq, *txq;
static u8 *txbufs;
static u32 txn;
static u64 my_cid;
static u32 fwd_cnt, tx_cnt, peer_alloc, peer_fwd;
static u8 pending[BUF_ALLOC]; /* received, not yet echoed (a ring) */
static u32 p_head, p_len;
static int credit_asked;

static void send_pkt(const struct vsock_hdr *in, u16 op, const void *data, u32 len, u32 flags) {
    while (vq_get(txq, NULL)) {
    }
    while (!txq->num_free) {
        vq_kick(txq);
        vq_wait(txq, NULL, tsc_ms(1000));
    }
    u8 *b = txbufs + (u64)(txn++ % txq->size) * BUFSZ;
    struct vsock_hdr h = {
        .src_cid = my_cid, .dst_cid = in->src_cid, .src_port = in->dst_port,
        .dst_port = in->src_port, .len = len, .type = TYPE_STREAM, .op = op, .flags = flags,
        .buf_alloc = BUF_ALLOC, .fwd_cnt = fwd_cnt,
    };
    memcpy(b, &h, HDR);
    if (len) memcpy(b + HDR, data, len);
    struct vbuf v = {b, HDR + len};
    vq_add(txq, &v, 1, 0, b);
    vq_kick(txq);
    if (op == OP_RW) tx_cnt += len;
}

void sc_vsock_echo(void) {
    struct vdev *d = virtio_find(VIRTIO_ID_VSOCK, 0);
    if (!d) fail("no virtio-vsock device");
    if (virtio_init(d, 1ull << VIRTIO_F_INDIRECT_DESC | 1ull << VIRTIO_F_EVENT_IDX)) fail("vsock init");
    rxq = virtio_queue(d, 0, 64);
    txq = virtio_queue(d, 1, 64);
    struct virtq *evq = virtio_queue(d, 2, 8);
    if (!rxq || !txq || !evq) fail("vsock: missing queues");
    u8 *ev = alloc(64, 64);
    struct vbuf e = {ev, 4};
    vq_add(evq, &e, 0, 1, ev);
    virtio_driver_ok(d);
    vq_kick(evq);
    my_cid = virtio_cfg64(d, 0);
    u8 *rxb = alloc((u64)NRX * BUFSZ, 4096);
    txbufs = alloc((u64)txq->size * BUFSZ, 4096);
    for (u32 i = 0; i < NRX; i++) {
        struct vbuf v = {rxb + (u64)i * BUFSZ, BUFSZ};
        vq_add(rxq, &v, 0, 1, rxb + (u64)i * BUFSZ);
    }
    vq_kick(rxq);
    u32 port = (u32)cmdline_u64("port", 5000);
    printf("READY vsock-echo cid=%lu port=%u\n", (unsigned long)my_cid, port);
    int connected = 0, done = 0, end_seen = 0;
    struct vsock_hdr peer = {0};
    u64 rx_bytes = 0;
    char tail[4] = {0};
    u64 deadline = rdtsc() + tsc_ms(cmdline_u64("timeout_ms", 30000));
    while (!done) {
        u32 len;
        u8 *b = vq_get(rxq, &len);
        if (!b) {
            if (rdtsc() > deadline) fail("vsock-echo: timeout (connected=%d)", connected);
            cpu_relax();
            continue;
        }
        struct vsock_hdr h;
        memcpy(&h, b, HDR);
        u32 plen = h.len;
        if (len < HDR || plen > len - HDR || h.dst_cid != my_cid) {
            /* malformed or not for us: drop */
        } else if (h.dst_port != port) {
            if (h.op != OP_RST) send_pkt(&h, OP_RST, NULL, 0, 0);
        } else {
            peer_alloc = h.buf_alloc, peer_fwd = h.fwd_cnt;
            switch (h.op) {
            case OP_REQUEST:
                connected = 1;
                send_pkt(&h, OP_RESPONSE, NULL, 0, 0);
                break;
            case OP_RW: {
                rx_bytes += plen;
                if (plen > BUF_ALLOC - p_len) fail("vsock-echo: host overran our credit");
                for (u32 i = 0; i < plen; i++) {
                    memmove(tail, tail + 1, 3);
                    tail[3] = (char)b[HDR + i];
                    pending[(p_head + p_len + i) % BUF_ALLOC] = b[HDR + i];
                }
                p_len += plen;
                peer = h;
                if (!memcmp(tail, "END\n", 4)) end_seen = 1;
                break;
            }
            case OP_CREDIT_REQUEST:
                send_pkt(&h, OP_CREDIT_UPDATE, NULL, 0, 0);
                break;
            case OP_SHUTDOWN:
                send_pkt(&h, OP_RST, NULL, 0, 0);
                done = 1;
                break;
            case OP_RST:
                done = 1;
                break;
            default:
                break;
            }
        }
        struct vbuf v = {b, BUFSZ};
        vq_add(rxq, &v, 0, 1, b);
        vq_kick(rxq);
        /* Echo what the host has credit for; ask for its counters once when it has none. */
        while (p_len) {
            u32 credit = peer_alloc - (tx_cnt - peer_fwd);
            if (!credit) {
                if (!credit_asked) send_pkt(&peer, OP_CREDIT_REQUEST, NULL, 0, 0);
                credit_asked = 1;
                break;
            }
            credit_asked = 0;
            u32 n = p_len < credit ? p_len : credit;
            if (n > PAYLOAD) n = PAYLOAD;
            if (n > BUF_ALLOC - p_head) n = BUF_ALLOC - p_head; /* contiguous part of the ring */
            fwd_cnt += n; /* consumed from our buffer: the header below tells the host */
            send_pkt(&peer, OP_RW, pending + p_head, n, 0);
            p_head = (p_head + n) % BUF_ALLOC;
            p_len -= n;
        }
        if (end_seen && !p_len && !done) {
            send_pkt(&peer, OP_SHUTDOWN, NULL, 0, 3);
            done = 1;
        }
    }
    u64 t0 = rdtsc();
    while (txq->num_free != txq->size && rdtsc() - t0 < tsc_ms(2000)) vq_get(txq, NULL);
    printf("RESULT vsock_cid=%lu vsock_rx=%lu vsock_tx=%u\n", (unsigned long)my_cid,
           (unsigned long)rx_bytes, tx_cnt);
}
