"""Jail syscalls for io_jail: namespaces, mounts, pivot_root, prctl, capabilities, seccomp.

The stdlib of Python 3.11 has none of these (``os.unshare`` arrived in 3.12). Every function is a
thin C wrapper so Python never builds a kernel struct by hand: capability sets travel as six
32-bit words, a seccomp program as the raw bytes of its ``struct sock_filter`` array, and the
SIGSYS reporter (for writing policies) is a C handler because it must run inside the faulting
thread, before the process dies, using only async-signal-safe calls.
"""

INCLUDES = """
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/audit.h>
"""

TYPES = """
#define CLONE_NEWNS ...
#define CLONE_NEWUSER ...
#define CLONE_NEWPID ...
#define CLONE_NEWNET ...
#define CLONE_NEWIPC ...
#define CLONE_NEWUTS ...
#define CLONE_NEWCGROUP ...
#define MS_RDONLY ...
#define MS_NOSUID ...
#define MS_NODEV ...
#define MS_NOEXEC ...
#define MS_REMOUNT ...
#define MS_BIND ...
#define MS_REC ...
#define MS_PRIVATE ...
#define MS_SLAVE ...
#define MNT_DETACH ...
#define PR_SET_PDEATHSIG ...
#define PR_SET_NO_NEW_PRIVS ...
#define PR_GET_NO_NEW_PRIVS ...
#define PR_CAPBSET_DROP ...
#define PR_CAPBSET_READ ...
#define PR_CAP_AMBIENT ...
#define PR_CAP_AMBIENT_CLEAR_ALL ...
#define PR_SET_DUMPABLE ...
#define PR_GET_SECCOMP ...
#define SECCOMP_SET_MODE_FILTER ...
#define SECCOMP_FILTER_FLAG_TSYNC ...
#define SECCOMP_RET_KILL_PROCESS ...
#define SECCOMP_RET_KILL_THREAD ...
#define SECCOMP_RET_TRAP ...
#define SECCOMP_RET_ERRNO ...
#define SECCOMP_RET_TRACE ...
#define SECCOMP_RET_LOG ...
#define SECCOMP_RET_ALLOW ...
#define AUDIT_ARCH_X86_64 ...
"""

FUNCTIONS = """
int sys_util_unshare(int flags);
int sys_util_mount(const char *source, const char *target, const char *fstype,
                   unsigned long flags, const char *data);
int sys_util_umount2(const char *target, int flags);
int sys_util_pivot_root(const char *new_root, const char *put_old);
int sys_util_prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4,
                   unsigned long a5);
int sys_util_capget(uint32_t out[6]);
int sys_util_capset(uint32_t eff0, uint32_t eff1, uint32_t prm0, uint32_t prm1,
                    uint32_t inh0, uint32_t inh1);
int sys_util_seccomp_filter(unsigned int flags, const char *program, size_t nbytes);
int sys_util_sock_filter_size(void);
int sys_util_install_sigsys_reporter(int report_fd);
"""

CUSTOMIZATIONS = """
static int sys_util_unshare(int flags) { return unshare(flags); }

static int sys_util_mount(const char *source, const char *target, const char *fstype,
                          unsigned long flags, const char *data)
{
    return mount(source, target, fstype, flags, data);
}

static int sys_util_umount2(const char *target, int flags) { return umount2(target, flags); }

static int sys_util_pivot_root(const char *new_root, const char *put_old)
{
    return (int)syscall(SYS_pivot_root, new_root, put_old);
}

static int sys_util_prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4,
                          unsigned long a5)
{
    return prctl(option, a2, a3, a4, a5);
}

static int sys_util_capget(uint32_t out[6])
{
    struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof(data));
    if (syscall(SYS_capget, &hdr, data) != 0)
        return -1;
    out[0] = data[0].effective; out[1] = data[1].effective;
    out[2] = data[0].permitted; out[3] = data[1].permitted;
    out[4] = data[0].inheritable; out[5] = data[1].inheritable;
    return 0;
}

static int sys_util_capset(uint32_t eff0, uint32_t eff1, uint32_t prm0, uint32_t prm1,
                           uint32_t inh0, uint32_t inh1)
{
    struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct data[2];
    data[0].effective = eff0; data[1].effective = eff1;
    data[0].permitted = prm0; data[1].permitted = prm1;
    data[0].inheritable = inh0; data[1].inheritable = inh1;
    return (int)syscall(SYS_capset, &hdr, data);
}

static int sys_util_sock_filter_size(void) { return (int)sizeof(struct sock_filter); }

static int sys_util_seccomp_filter(unsigned int flags, const char *program, size_t nbytes)
{
    struct sock_fprog prog;
    if (nbytes == 0 || nbytes % sizeof(struct sock_filter) != 0
        || nbytes / sizeof(struct sock_filter) > BPF_MAXINSNS) {
        errno = EINVAL;
        return -1;
    }
    prog.len = (unsigned short)(nbytes / sizeof(struct sock_filter));
    /* The kernel copies the program before returning; `program` only has to live for the call. */
    prog.filter = (struct sock_filter *)program;
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
}

static int sys_util_sigsys_fd = -1;

static void sys_util_sigsys_report(int signum, siginfo_t *info, void *ucontext)
{
    /* Async-signal-safe only: format by hand, write(2), then die of SIGSYS. SA_RESETHAND has
       restored the default action before this runs. */
    char text[64] = "io_jail: seccomp refused syscall ";
    size_t n = strlen(text);
    int nr = info->si_syscall;
    char digits[16];
    int k = 0;
    uint32_t record[2];
    (void)ucontext;
    if (nr < 0) nr = 0;
    do { digits[k++] = (char)('0' + nr % 10); nr /= 10; } while (nr > 0 && k < 15);
    while (k > 0) text[n++] = digits[--k];
    text[n++] = '\\n';
    record[0] = 0x53595321u; /* "!SYS" */
    record[1] = (uint32_t)info->si_syscall;
    if (sys_util_sigsys_fd >= 0) {
        if (write(sys_util_sigsys_fd, record, sizeof(record)) < 0) { /* nothing to do */ }
    }
    if (write(2, text, n) < 0) { /* nothing to do */ }
    /* Die of SIGSYS. A plain raise() is not enough: the init of a PID namespace ignores
       signals it has no handler for, even from itself. A second refused syscall makes the
       kernel force SIGSYS with the default action, which kills even a namespace init. */
    syscall(0x3fffffff);
    raise(signum);
    _exit(128 + signum);
}

static int sys_util_install_sigsys_reporter(int report_fd)
{
    struct sigaction sa;
    sys_util_sigsys_fd = report_fd;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = sys_util_sigsys_report;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_SIGINFO | SA_RESETHAND | SA_NODEFER;
    return sigaction(SIGSYS, &sa, NULL);
}
"""
