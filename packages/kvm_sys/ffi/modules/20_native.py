"""Typed C entry points: ioctl wrappers and the vCPU run loop's hot path.

``ioctl`` is variadic, which cffi's API mode cannot call portably, and ``fcntl.ioctl`` is slow and
cannot pass an argument >= 2**31 (``KVM_SET_TSS_ADDR(0xfffbd000)``). So every ioctl goes through
``kvm_ioctl_ptr`` / ``kvm_ioctl_val``, which return the result or ``-errno`` (never touching the
thread's saved errno, so the caller needs no second call to learn the error).

``struct kvm_vcpu_handle`` owns a vCPU fd and its mmapped ``kvm_run`` page. ``kvm_vcpu_run`` does
``KVM_RUN`` and decodes the exit into one 64-bit code in the same C call (the Python side then
needs one dict lookup for the common exits). The handle is reference counted so ``close()`` from
another thread while ``KVM_RUN`` is in flight unmaps the page only after the run returns, and
``kvm_vcpu_kick`` signals the thread only while it is inside ``kvm_vcpu_run``, under a mutex, so it
never signals a thread that has exited.

Exit code layout (``uint64_t``):

    bits  0..7   tag: the KVM_EXIT_* reason (< 0xf0), 0xfe unknown reason, 0xff error
    error:       bits 8..31 errno
    KVM_EXIT_IO: bit 8 direction (1 = out), bit 9 "long form" (count != 1: read the page),
                 bits 12..15 size, bits 16..31 port, bits 32..63 the data of a count-1 out
    KVM_EXIT_MMIO: bit 8 is_write, bits 12..15 len; phys_addr in aux0, data (LE) in aux1
"""

INCLUDES = r"""
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/kvm.h>
"""

TYPES = r"""
#define KVM_CODE_UNKNOWN ...
#define KVM_CODE_ERROR ...
#define KVM_CODE_IO_OUT ...
#define KVM_CODE_IO_LONG ...
#define KVM_CODE_MMIO_WRITE ...

struct kvm_vcpu_handle {
    int fd;
    int kick_sig;
    size_t run_size;
    uint64_t aux0;
    uint64_t aux1;
    ...;
};
"""

FUNCTIONS = r"""
int kvm_ioctl_ptr(int fd, unsigned long req, void *arg);
int kvm_ioctl_val(int fd, unsigned long req, unsigned long val);

int kvm_kick_signal(void);
int kvm_install_kick_handler(int sig);
int kvm_block_signal(int sig);
int kvm_set_signal_mask_unblocking(int vcpu_fd, int sig);

int kvm_vcpu_open(struct kvm_vcpu_handle *h, int fd, size_t run_size, int kick_sig);
uint64_t kvm_vcpu_run(struct kvm_vcpu_handle *h);
int kvm_vcpu_close(struct kvm_vcpu_handle *h);
int kvm_vcpu_kick(struct kvm_vcpu_handle *h);
int kvm_vcpu_read_run(struct kvm_vcpu_handle *h, size_t offset, void *dst, size_t len);
int kvm_vcpu_set_immediate_exit(struct kvm_vcpu_handle *h, int value);
int kvm_vcpu_set_io_data(struct kvm_vcpu_handle *h, const char *buf, size_t len);
int kvm_vcpu_set_mmio_data(struct kvm_vcpu_handle *h, const char *buf, size_t len);
"""

CUSTOMIZATIONS = r"""
#define KVM_CODE_UNKNOWN 0xfeULL
#define KVM_CODE_ERROR 0xffULL
#define KVM_CODE_IO_OUT 0x100ULL
#define KVM_CODE_IO_LONG 0x200ULL
#define KVM_CODE_MMIO_WRITE 0x100ULL

#define KVM_HANDLE_CLOSING 0x40000000

struct kvm_vcpu_handle {
    int fd;
    int kick_sig;
    size_t run_size;
    uint64_t aux0;
    uint64_t aux1;
    struct kvm_run *run;
    int refs;               /* owner reference + one per call in flight; | KVM_HANDLE_CLOSING */
    int in_run;             /* guarded by lock */
    pthread_t thread;       /* guarded by lock; valid while in_run */
    pthread_mutex_t lock;
};

static int kvm_ioctl_ptr(int fd, unsigned long req, void *arg)
{
    int r = ioctl(fd, req, arg);
    return r < 0 ? -errno : r;
}

static int kvm_ioctl_val(int fd, unsigned long req, unsigned long val)
{
    int r = ioctl(fd, req, val);
    return r < 0 ? -errno : r;
}

static int kvm_kick_signal(void) { return SIGRTMIN; }

static void kvm_kick_noop(int sig) { (void)sig; }

/* A no-op handler: the signal only has to interrupt KVM_RUN (no SA_RESTART: KVM_RUN is never
 * restarted anyway). Installed from C so no Python code runs in the main thread per kick. */
static int kvm_install_kick_handler(int sig)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kvm_kick_noop;
    sigemptyset(&sa.sa_mask);
    return sigaction(sig, &sa, NULL) < 0 ? -errno : 0;
}

/* Block sig in the calling thread (it then only arrives while KVM_RUN unblocks it). */
static int kvm_block_signal(int sig)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sig);
    return -pthread_sigmask(SIG_BLOCK, &set, NULL);
}

/* KVM_SET_SIGNAL_MASK: the calling thread's mask minus sig, applied during KVM_RUN only. */
static int kvm_set_signal_mask_unblocking(int vcpu_fd, int sig)
{
    sigset_t cur;
    struct { struct kvm_signal_mask hdr; uint8_t bits[8]; } arg;
    int r = pthread_sigmask(SIG_BLOCK, NULL, &cur);
    if (r)
        return -r;
    sigdelset(&cur, sig);
    arg.hdr.len = 8;            /* the kernel's sigset_t is 64 bits on x86_64 */
    memcpy(arg.bits, &cur, 8);
    return kvm_ioctl_ptr(vcpu_fd, KVM_SET_SIGNAL_MASK, &arg);
}

static int kvm_handle_acquire(struct kvm_vcpu_handle *h)
{
    int cur = __atomic_load_n(&h->refs, __ATOMIC_ACQUIRE);
    do {
        if (cur & KVM_HANDLE_CLOSING || cur == 0)
            return 0;
    } while (!__atomic_compare_exchange_n(&h->refs, &cur, cur + 1, 1,
                                          __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
    return 1;
}

static void kvm_handle_release(struct kvm_vcpu_handle *h)
{
    if (__atomic_sub_fetch(&h->refs, 1, __ATOMIC_ACQ_REL) == KVM_HANDLE_CLOSING) {
        munmap(h->run, h->run_size);
        h->run = NULL;
        close(h->fd);
        pthread_mutex_destroy(&h->lock);
    }
}

/* Takes ownership of fd only on success. */
static int kvm_vcpu_open(struct kvm_vcpu_handle *h, int fd, size_t run_size, int kick_sig)
{
    void *p;
    if (run_size < sizeof(struct kvm_run))
        return -EINVAL;
    p = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return -errno;
    h->fd = fd;
    h->kick_sig = kick_sig;
    h->run_size = run_size;
    h->run = p;
    h->in_run = 0;
    pthread_mutex_init(&h->lock, NULL);
    __atomic_store_n(&h->refs, 1, __ATOMIC_RELEASE);
    return 0;
}

static int kvm_vcpu_close(struct kvm_vcpu_handle *h)
{
    int cur = __atomic_load_n(&h->refs, __ATOMIC_ACQUIRE);
    do {
        if (cur & KVM_HANDLE_CLOSING || cur == 0)
            return 0;
    } while (!__atomic_compare_exchange_n(&h->refs, &cur, cur | KVM_HANDLE_CLOSING, 1,
                                          __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
    /* A run in flight holds a reference (so the page and lock stay valid here): make it
     * return, so the deferred unmap and close happen now rather than never. */
    pthread_mutex_lock(&h->lock);
    __atomic_store_n(&h->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    if (h->in_run)
        pthread_kill(h->thread, h->kick_sig);
    pthread_mutex_unlock(&h->lock);
    kvm_handle_release(h);  /* the owner's reference */
    return 0;
}

/* Eat kick signals left pending (blocked) after KVM_RUN restored the thread's mask. */
static void kvm_eat_kicks(int sig)
{
    sigset_t set, pending;
    struct timespec zero = {0, 0};
    sigemptyset(&set);
    sigaddset(&set, sig);
    for (;;) {
        if (sigpending(&pending) < 0 || !sigismember(&pending, sig))
            return;
        if (sigtimedwait(&set, NULL, &zero) < 0 && errno != EINTR)
            return;
    }
}

static uint64_t kvm_vcpu_run(struct kvm_vcpu_handle *h)
{
    struct kvm_run *run;
    uint64_t code;
    int r, err = 0;

    if (!kvm_handle_acquire(h))
        return KVM_CODE_ERROR | ((uint64_t)EBADF << 8);
    run = h->run;
    pthread_mutex_lock(&h->lock);
    h->thread = pthread_self();
    h->in_run = 1;
    pthread_mutex_unlock(&h->lock);

    r = ioctl(h->fd, KVM_RUN, 0);
    if (r < 0)
        err = errno;

    pthread_mutex_lock(&h->lock);
    h->in_run = 0;
    pthread_mutex_unlock(&h->lock);

    if (r < 0) {
        if (err == EINTR) {
            kvm_eat_kicks(h->kick_sig);
            run->immediate_exit = 0;
            code = KVM_EXIT_INTR;
        } else {
            code = KVM_CODE_ERROR | ((uint64_t)err << 8);
        }
        kvm_handle_release(h);
        return code;
    }

    switch (run->exit_reason) {
    case KVM_EXIT_IO: {
        uint32_t size = run->io.size, count = run->io.count;
        uint64_t off = run->io.data_offset;
        code = KVM_EXIT_IO | ((uint64_t)run->io.port << 16) | ((uint64_t)(size & 0xf) << 12);
        if (run->io.direction == KVM_EXIT_IO_OUT)
            code |= KVM_CODE_IO_OUT;
        if (count != 1 || !(size == 1 || size == 2 || size == 4)
            || off > h->run_size || h->run_size - off < size) {
            code |= KVM_CODE_IO_LONG;
        } else if (run->io.direction == KVM_EXIT_IO_OUT) {
            uint32_t v = 0;
            memcpy(&v, (const uint8_t *)run + off, size);
            code |= (uint64_t)v << 32;
        }
        break;
    }
    case KVM_EXIT_MMIO: {
        uint32_t len = run->mmio.len > 8 ? 0xf : run->mmio.len;
        uint64_t v = 0;
        h->aux0 = run->mmio.phys_addr;
        if (run->mmio.is_write && len <= 8)
            memcpy(&v, run->mmio.data, len);
        h->aux1 = v;
        code = KVM_EXIT_MMIO | ((uint64_t)len << 12);
        if (run->mmio.is_write)
            code |= KVM_CODE_MMIO_WRITE;
        break;
    }
    default:
        code = run->exit_reason < 0xf0 ? run->exit_reason : KVM_CODE_UNKNOWN;
        break;
    }
    kvm_handle_release(h);
    return code;
}

static int kvm_vcpu_kick(struct kvm_vcpu_handle *h)
{
    int r = 0;
    if (!kvm_handle_acquire(h))
        return -EBADF;
    pthread_mutex_lock(&h->lock);
    /* Set before signalling: a run about to start returns at once, one in the guest is
     * interrupted by the signal; either way exactly this run() returns Intr. */
    __atomic_store_n(&h->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    if (h->in_run)
        r = -pthread_kill(h->thread, h->kick_sig);
    pthread_mutex_unlock(&h->lock);
    kvm_handle_release(h);
    return r;
}

static int kvm_vcpu_read_run(struct kvm_vcpu_handle *h, size_t offset, void *dst, size_t len)
{
    if (!kvm_handle_acquire(h))
        return -EBADF;
    if (offset > h->run_size || h->run_size - offset < len) {
        kvm_handle_release(h);
        return -EINVAL;
    }
    memcpy(dst, (const uint8_t *)h->run + offset, len);
    kvm_handle_release(h);
    return 0;
}

static int kvm_vcpu_set_immediate_exit(struct kvm_vcpu_handle *h, int value)
{
    if (!kvm_handle_acquire(h))
        return -EBADF;
    __atomic_store_n(&h->run->immediate_exit, value ? 1 : 0, __ATOMIC_SEQ_CST);
    kvm_handle_release(h);
    return 0;
}

/* The reply to an IN exit: exactly size * count bytes, inside the mapped page. */
static int kvm_vcpu_set_io_data(struct kvm_vcpu_handle *h, const char *buf, size_t len)
{
    struct kvm_run *run;
    int r = 0;
    if (!kvm_handle_acquire(h))
        return -EBADF;
    run = h->run;
    if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_IN)
        r = -EPERM;
    else if ((uint64_t)run->io.size * run->io.count != len
             || run->io.data_offset > h->run_size || h->run_size - run->io.data_offset < len)
        r = -EINVAL;
    else
        memcpy((uint8_t *)run + run->io.data_offset, buf, len);
    kvm_handle_release(h);
    return r;
}

/* The reply to an MMIO read: exactly mmio.len bytes. */
static int kvm_vcpu_set_mmio_data(struct kvm_vcpu_handle *h, const char *buf, size_t len)
{
    struct kvm_run *run;
    int r = 0;
    if (!kvm_handle_acquire(h))
        return -EBADF;
    run = h->run;
    if (run->exit_reason != KVM_EXIT_MMIO || run->mmio.is_write)
        r = -EPERM;
    else if (run->mmio.len != len || len > sizeof(run->mmio.data))
        r = -EINVAL;
    else
        memcpy(run->mmio.data, buf, len);
    kvm_handle_release(h);
    return r;
}
"""
