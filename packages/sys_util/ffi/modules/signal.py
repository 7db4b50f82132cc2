"""Signal handling the stdlib cannot do: a C-level no-op handler for the vCPU "kick" signal.

A Python-level handler would only run in the main thread, between bytecodes; the kick must instead
interrupt a blocking ``KVM_RUN`` ioctl in *any* thread, and do nothing else. Installing a real C
handler (without ``SA_RESTART``) makes the interrupted syscall return ``EINTR`` in that thread.
"""

INCLUDES = "#include <signal.h>\n#include <string.h>\n"
TYPES = ""
FUNCTIONS = """
int sys_util_install_noop_handler(int signum);
int sys_util_has_noop_handler(int signum);
"""
CUSTOMIZATIONS = """
static void sys_util_noop_signal_handler(int signum) { (void)signum; }

static int sys_util_install_noop_handler(int signum)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = sys_util_noop_signal_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: the interrupted syscall must return EINTR */
    return sigaction(signum, &sa, NULL);
}

static int sys_util_has_noop_handler(int signum)
{
    struct sigaction old;
    if (sigaction(signum, NULL, &old) != 0)
        return -1;
    return old.sa_handler == sys_util_noop_signal_handler;
}
"""
