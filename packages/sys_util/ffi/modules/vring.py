"""Frame batches between an fd and one-descriptor chains of a split virtqueue.

Why C: a virtio-net frame costs the kernel about 1 us to move through a tap; the Python loop
around it (reading the ring, checking the descriptor, slicing a view, storing the used element)
cost as much again, so the device reached 0.6x of QEMU's frame rate. These two functions walk
the rings, check every descriptor and call write/readv for a whole batch with the GIL released.

Safety: every pointer comes from a Python buffer whose length is passed along (``ram_len``, the
ring sizes follow from ``size``), and every guest-controlled number is checked against those
lengths before it is used: a head beyond the table, a descriptor outside RAM, a length overflow
or a chain of another shape stops the batch with SYS_UTIL_VQ_SLOW, leaving the chain for the
caller's full validation. The guest can change the rings at any moment, so each descriptor is
read once, into locals, and only the locals are checked and used.
"""

INCLUDES = "#include <errno.h>\n#include <stdint.h>\n#include <sys/uio.h>\n#include <unistd.h>\n"
TYPES = """
#define SYS_UTIL_VQ_DONE ...
#define SYS_UTIL_VQ_SLOW ...
#define SYS_UTIL_VQ_EMPTY_FD ...
#define SYS_UTIL_VQ_FD_ERROR ...
#define SYS_UTIL_VQ_OVERSIZE ...

struct sys_util_vq {
    uint8_t *ram;
    uint64_t ram_base;
    uint64_t ram_len;
    uint64_t *desc;
    uint16_t *avail;
    uint16_t *used_idx;
    uint32_t *used;
    uint32_t size;
    ...;
};

struct sys_util_vq_batch {
    uint32_t next_avail;
    uint32_t next_used;
    uint64_t frames;
    uint64_t bytes;
    uint64_t errors;
    int32_t last_errno;
    uint32_t head;
    uint64_t offset;
    uint32_t length;
    uint32_t received;
    ...;
};
"""
FUNCTIONS = """
int sys_util_vq_tx(const struct sys_util_vq *vq, int fd, uint32_t budget, uint32_t hdr_len,
                   uint32_t max_len, struct sys_util_vq_batch *batch);
int sys_util_vq_rx(const struct sys_util_vq *vq, int fd, uint32_t budget, uint32_t hdr_len,
                   int clear_flags, uint8_t *stage, uint32_t stage_len,
                   struct sys_util_vq_batch *batch);
"""
CUSTOMIZATIONS = r"""
#define SYS_UTIL_VQ_DONE 0      /* budget used up or the avail ring is empty */
#define SYS_UTIL_VQ_SLOW 1      /* the next chain is not one in-RAM descriptor of the right kind */
#define SYS_UTIL_VQ_EMPTY_FD 2  /* rx: the fd had nothing to read (EAGAIN) */
#define SYS_UTIL_VQ_FD_ERROR 3  /* rx: read failed with last_errno */
#define SYS_UTIL_VQ_OVERSIZE 4  /* rx: frame longer than the buffer; head/offset/length/received */

#define SYS_UTIL_VQ_F_NEXT 1
#define SYS_UTIL_VQ_F_WRITE 2

struct sys_util_vq {
    uint8_t *ram;          /* guest RAM region 0 */
    uint64_t ram_base;     /* its guest physical address */
    uint64_t ram_len;
    uint64_t *desc;        /* size * 2 words: addr, len | flags << 32 | next << 48 */
    uint16_t *avail;       /* flags, idx, ring[size] */
    uint16_t *used_idx;
    uint32_t *used;        /* ring[size]: id, len (4-byte aligned, so two 32-bit stores) */
    uint32_t size;         /* a power of two */
};

struct sys_util_vq_batch {
    uint32_t next_avail;   /* in/out, free running (mod 2^16) */
    uint32_t next_used;    /* in/out */
    uint64_t frames;       /* out: chains completed */
    uint64_t bytes;        /* out: bytes moved, headers included */
    uint64_t errors;       /* out: tx frames the fd refused; rx frames dropped */
    int32_t last_errno;
    uint32_t head;         /* OVERSIZE: the chain (already consumed from avail, not used) */
    uint64_t offset;       /* OVERSIZE: its buffer's offset in ram */
    uint32_t length;       /* OVERSIZE: its buffer's length */
    uint32_t received;     /* OVERSIZE: frame bytes read (the rest is in stage) */
};

static inline uint16_t sys_util_vq_avail_idx(const struct sys_util_vq *vq)
{
    return __atomic_load_n(&vq->avail[1], __ATOMIC_ACQUIRE);
}

/* The one descriptor of chain `head`, or 0 if it is not one in-RAM descriptor with exactly
   `want_flags` and a length in [min_len, max_len]. */
static inline int sys_util_vq_single(const struct sys_util_vq *vq, uint32_t head,
                                     uint32_t want_flags, uint32_t min_len, uint32_t max_len,
                                     uint64_t *off_out, uint32_t *len_out)
{
    if (head >= vq->size)
        return 0;
    uint64_t addr = __atomic_load_n(&vq->desc[2 * head], __ATOMIC_RELAXED);
    uint64_t meta = __atomic_load_n(&vq->desc[2 * head + 1], __ATOMIC_RELAXED);
    uint32_t len = (uint32_t)meta;
    uint32_t flags = (uint32_t)(meta >> 32) & 0xFFFF;
    if (flags != want_flags || len < min_len || len > max_len)
        return 0;
    if (addr < vq->ram_base)
        return 0;
    uint64_t off = addr - vq->ram_base;
    if (off > vq->ram_len || len > vq->ram_len - off)
        return 0;
    *off_out = off;
    *len_out = len;
    return 1;
}

/* How many chains to look at: those available, up to `budget`; none if the driver's index is
   more than a ring ahead (a driver bug the caller's full path reports). Clears the counters. */
static inline uint32_t sys_util_vq_start(const struct sys_util_vq *vq,
                                         struct sys_util_vq_batch *b, uint32_t budget)
{
    uint32_t pending = (uint16_t)(sys_util_vq_avail_idx(vq) - (uint16_t)b->next_avail);
    b->frames = b->bytes = b->errors = 0;
    if (pending > vq->size)
        return 0;
    return pending < budget ? pending : budget;
}

/* Publish the used elements stored so far (release orders them before the index) and hand
   the indices back. */
static inline void sys_util_vq_finish(const struct sys_util_vq *vq, struct sys_util_vq_batch *b,
                                      uint32_t next_avail, uint32_t next_used)
{
    if ((uint16_t)next_used != (uint16_t)b->next_used)
        __atomic_store_n(vq->used_idx, (uint16_t)next_used, __ATOMIC_RELEASE);
    b->next_avail = next_avail & 0xFFFF;
    b->next_used = next_used & 0xFFFF;
}

static int sys_util_vq_tx(const struct sys_util_vq *vq, int fd, uint32_t budget,
                          uint32_t hdr_len, uint32_t max_len, struct sys_util_vq_batch *b)
{
    uint32_t mask = vq->size - 1;
    uint32_t next_avail = b->next_avail, next_used = b->next_used;
    uint32_t pending = sys_util_vq_start(vq, b, budget);
    int status = SYS_UTIL_VQ_DONE;
    for (uint32_t i = 0; i < pending; i++) {
        uint32_t head = __atomic_load_n(&vq->avail[2 + (next_avail & mask)], __ATOMIC_RELAXED);
        uint64_t off;
        uint32_t len;
        if (!sys_util_vq_single(vq, head, 0, hdr_len, max_len, &off, &len)) {
            status = SYS_UTIL_VQ_SLOW;
            break;
        }
        ssize_t n;
        do {
            n = write(fd, vq->ram + off, len);
        } while (n < 0 && errno == EINTR);
        if (n < 0) {
            b->errors++;
            b->last_errno = errno;
        } else {
            b->frames++;
            b->bytes += len;
        }
        vq->used[2 * (next_used & mask)] = head;
        vq->used[2 * (next_used & mask) + 1] = 0;  /* the device wrote nothing */
        next_avail++;
        next_used++;
    }
    sys_util_vq_finish(vq, b, next_avail, next_used);
    return status;
}

static int sys_util_vq_rx(const struct sys_util_vq *vq, int fd, uint32_t budget,
                          uint32_t hdr_len, int clear_flags, uint8_t *stage, uint32_t stage_len,
                          struct sys_util_vq_batch *b)
{
    uint32_t mask = vq->size - 1;
    uint32_t next_avail = b->next_avail, next_used = b->next_used;
    uint32_t pending = sys_util_vq_start(vq, b, budget);
    int status = SYS_UTIL_VQ_DONE;
    for (uint32_t i = 0; i < pending; i++) {
        uint32_t head = __atomic_load_n(&vq->avail[2 + (next_avail & mask)], __ATOMIC_RELAXED);
        uint64_t off;
        uint32_t len;
        if (!sys_util_vq_single(vq, head, SYS_UTIL_VQ_F_WRITE, hdr_len, UINT32_MAX, &off, &len)) {
            status = SYS_UTIL_VQ_SLOW;
            break;
        }
        struct iovec iov[2] = {
            {.iov_base = vq->ram + off, .iov_len = len},
            {.iov_base = stage, .iov_len = stage_len},
        };
        ssize_t n;
        do {
            n = readv(fd, iov, 2);
        } while (n < 0 && errno == EINTR);
        if (n < 0) {
            b->last_errno = errno;
            status = (errno == EAGAIN || errno == EWOULDBLOCK) ? SYS_UTIL_VQ_EMPTY_FD
                                                                : SYS_UTIL_VQ_FD_ERROR;
            break;
        }
        if ((uint64_t)n < hdr_len) {  /* cannot happen with IFF_VNET_HDR; never hand over a stub */
            b->errors++;
            continue;
        }
        if (clear_flags)
            vq->ram[off] = 0;  /* the guest did not ask for DATA_VALID */
        if ((uint64_t)n > len) {
            b->head = head;
            b->offset = off;
            b->length = len;
            b->received = (uint32_t)n;
            next_avail++;
            status = SYS_UTIL_VQ_OVERSIZE;
            break;
        }
        if (hdr_len == 12) {  /* num_buffers = 1: the tap writes only 10 header bytes */
            vq->ram[off + 10] = 1;
            vq->ram[off + 11] = 0;
        }
        vq->used[2 * (next_used & mask)] = head;
        vq->used[2 * (next_used & mask) + 1] = (uint32_t)n;
        b->frames++;
        b->bytes += (uint64_t)n;
        next_avail++;
        next_used++;
    }
    sys_util_vq_finish(vq, b, next_avail, next_used);
    return status;
}
"""
