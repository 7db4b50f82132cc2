"""io_uring(7) through raw syscalls: submit batches of readv/writev/fsync, reap completions.

No liburing: the wheel must not depend on a library the distribution may not ship, and the part
a block device needs (one ring, three opcodes, an eventfd for completions) is small. The ring
memory is shared with the kernel, so the head/tail updates use acquire/release atomics exactly as
io_uring(7) describes. Rings are created disabled, restricted to the opcodes below and only then
enabled (IORING_REGISTER_RESTRICTIONS): io_uring operations bypass seccomp, so a jailed device's
ring must not be able to do more than its policy lets it do with plain syscalls.
"""

INCLUDES = """
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <linux/io_uring.h>
"""
TYPES = """
struct iovec { void *iov_base; size_t iov_len; };
typedef struct sys_util_uring sys_util_uring;
#define IORING_OP_READV ...
#define IORING_OP_WRITEV ...
#define IORING_OP_FSYNC ...
#define IORING_FSYNC_DATASYNC ...
#define IOSQE_IO_DRAIN ...
#define IOSQE_ASYNC ...
"""
FUNCTIONS = """
sys_util_uring *sys_util_uring_new(unsigned entries, int restrict_ops, unsigned max_workers);
void sys_util_uring_free(sys_util_uring *ring);
int sys_util_uring_fd(const sys_util_uring *ring);
unsigned sys_util_uring_sq_entries(const sys_util_uring *ring);
int sys_util_uring_register_eventfd(sys_util_uring *ring, int efd);
int sys_util_uring_prep(sys_util_uring *ring, int op, int fd, const struct iovec *iov,
                        unsigned nr, uint64_t offset, uint32_t op_flags, uint8_t sqe_flags,
                        uint64_t user_data);
int sys_util_uring_submit(sys_util_uring *ring, unsigned min_complete);
int sys_util_uring_reap(sys_util_uring *ring, uint64_t *user_data, int32_t *res, unsigned max);
"""
CUSTOMIZATIONS = r"""
typedef struct sys_util_uring sys_util_uring;

struct sys_util_uring {
    int fd;
    unsigned sq_entries;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_map; size_t sq_map_len;
    void *cq_map; size_t cq_map_len;
    void *sqe_map; size_t sqe_map_len;
    unsigned unsubmitted;
};

static long uring_setup(unsigned entries, struct io_uring_params *p)
{
    return syscall(__NR_io_uring_setup, entries, p);
}

static long uring_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags)
{
    return syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
}

static long uring_register(int fd, unsigned op, const void *arg, unsigned nr)
{
    return syscall(__NR_io_uring_register, fd, op, arg, nr);
}

static void sys_util_uring_free(sys_util_uring *r)
{
    if (r == NULL)
        return;
    if (r->sqe_map != NULL && r->sqe_map != MAP_FAILED)
        munmap(r->sqe_map, r->sqe_map_len);
    if (r->cq_map != NULL && r->cq_map != MAP_FAILED && r->cq_map != r->sq_map)
        munmap(r->cq_map, r->cq_map_len);
    if (r->sq_map != NULL && r->sq_map != MAP_FAILED)
        munmap(r->sq_map, r->sq_map_len);
    if (r->fd >= 0)
        close(r->fd);
    free(r);
}

static int uring_restrict(int fd)
{
    /* Only these opcodes and sqe flags, only an eventfd may be registered; then enable the
     * (disabled) ring. */
    struct io_uring_restriction res[5];
    memset(res, 0, sizeof(res));
    res[0].opcode = IORING_RESTRICTION_SQE_OP;
    res[0].sqe_op = IORING_OP_READV;
    res[1].opcode = IORING_RESTRICTION_SQE_OP;
    res[1].sqe_op = IORING_OP_WRITEV;
    res[2].opcode = IORING_RESTRICTION_SQE_OP;
    res[2].sqe_op = IORING_OP_FSYNC;
    res[3].opcode = IORING_RESTRICTION_SQE_FLAGS_ALLOWED;
    res[3].sqe_flags = IOSQE_IO_DRAIN | IOSQE_ASYNC;
    res[4].opcode = IORING_RESTRICTION_REGISTER_OP;
    res[4].register_op = IORING_REGISTER_EVENTFD;
    if (uring_register(fd, IORING_REGISTER_RESTRICTIONS, res, 5) < 0)
        return -1;
    return (int)uring_register(fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
}

static sys_util_uring *sys_util_uring_new(unsigned entries, int restrict_ops,
                                         unsigned max_workers)
{
    struct io_uring_params p;
    sys_util_uring *r = calloc(1, sizeof(*r));
    int saved;
    if (r == NULL) {
        errno = ENOMEM;
        return NULL;
    }
    r->fd = -1;
    memset(&p, 0, sizeof(p));
    if (restrict_ops)
        p.flags |= IORING_SETUP_R_DISABLED;
    r->fd = (int)uring_setup(entries, &p);
    if (r->fd < 0)
        goto fail;
    if (max_workers) {
        /* Blocking file reads run on the kernel's "bounded" workers: by default 4 per CPU,
         * which caps a deep queue of cold reads at that many disk requests in flight. */
        unsigned workers[2] = {max_workers, 0};
        if (uring_register(r->fd, IORING_REGISTER_IOWQ_MAX_WORKERS, workers, 2) < 0)
            goto fail;
    }
    if (restrict_ops && uring_restrict(r->fd) < 0)
        goto fail;
    r->sq_entries = p.sq_entries;
    r->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cq_map_len > r->sq_map_len)
            r->sq_map_len = r->cq_map_len;
        r->cq_map_len = r->sq_map_len;
    }
    r->sq_map = mmap(NULL, r->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     r->fd, IORING_OFF_SQ_RING);
    if (r->sq_map == MAP_FAILED)
        goto fail;
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        r->cq_map = r->sq_map;
    } else {
        r->cq_map = mmap(NULL, r->cq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                         r->fd, IORING_OFF_CQ_RING);
        if (r->cq_map == MAP_FAILED)
            goto fail;
    }
    r->sqe_map_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqe_map = mmap(NULL, r->sqe_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                      r->fd, IORING_OFF_SQES);
    if (r->sqe_map == MAP_FAILED)
        goto fail;
    r->sq_head = (unsigned *)((char *)r->sq_map + p.sq_off.head);
    r->sq_tail = (unsigned *)((char *)r->sq_map + p.sq_off.tail);
    r->sq_mask = (unsigned *)((char *)r->sq_map + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)((char *)r->sq_map + p.sq_off.array);
    r->cq_head = (unsigned *)((char *)r->cq_map + p.cq_off.head);
    r->cq_tail = (unsigned *)((char *)r->cq_map + p.cq_off.tail);
    r->cq_mask = (unsigned *)((char *)r->cq_map + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)((char *)r->cq_map + p.cq_off.cqes);
    r->sqes = (struct io_uring_sqe *)r->sqe_map;
    return r;
fail:
    saved = errno;
    sys_util_uring_free(r);
    errno = saved;
    return NULL;
}

static int sys_util_uring_fd(const sys_util_uring *r) { return r->fd; }

static unsigned sys_util_uring_sq_entries(const sys_util_uring *r) { return r->sq_entries; }

static int sys_util_uring_register_eventfd(sys_util_uring *r, int efd)
{
    return (int)uring_register(r->fd, IORING_REGISTER_EVENTFD, &efd, 1);
}

/* Queue one sqe; -EBUSY when the submission ring is full. The iovec array must stay valid until
 * the request completes (the caller keeps it). */
static int sys_util_uring_prep(sys_util_uring *r, int op, int fd, const struct iovec *iov,
                               unsigned nr, uint64_t offset, uint32_t op_flags,
                               uint8_t sqe_flags, uint64_t user_data)
{
    unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    unsigned tail = *r->sq_tail;
    unsigned index;
    struct io_uring_sqe *sqe;
    if (tail - head >= r->sq_entries)
        return -EBUSY;
    index = tail & *r->sq_mask;
    sqe = &r->sqes[index];
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = (uint8_t)op;
    sqe->flags = sqe_flags;
    sqe->fd = fd;
    sqe->off = offset;
    sqe->addr = (uint64_t)(uintptr_t)iov;
    sqe->len = nr;
    if (op == IORING_OP_FSYNC)
        sqe->fsync_flags = op_flags;
    else
        sqe->rw_flags = (int)op_flags;
    sqe->user_data = user_data;
    r->sq_array[index] = index;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    r->unsubmitted++;
    return 0;
}

/* Submit everything queued; wait for at least min_complete completions. Returns the number
 * submitted or -errno. */
static int sys_util_uring_submit(sys_util_uring *r, unsigned min_complete)
{
    long n;
    unsigned flags = min_complete ? IORING_ENTER_GETEVENTS : 0;
    for (;;) {
        n = uring_enter(r->fd, r->unsubmitted, min_complete, flags);
        if (n >= 0) {
            r->unsubmitted -= (unsigned)n;
            return (int)n;
        }
        if (errno != EINTR)
            return -errno;
    }
}

static int sys_util_uring_reap(sys_util_uring *r, uint64_t *user_data, int32_t *res,
                               unsigned max)
{
    unsigned head = *r->cq_head;
    unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    unsigned n = 0;
    while (head != tail && n < max) {
        struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
        user_data[n] = cqe->user_data;
        res[n] = cqe->res;
        n++;
        head++;
    }
    __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    return (int)n;
}
"""
