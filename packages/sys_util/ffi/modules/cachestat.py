"""cachestat(2) (Linux 6.5): how much of a file range is in the page cache, without touching it.

No libc wraps it yet, so the call goes through syscall(2); the number is the same on every
architecture (it was allocated after the syscall tables were unified).
"""

INCLUDES = "#include <stdint.h>\n#include <sys/syscall.h>\n#include <unistd.h>\n"
TYPES = ""
FUNCTIONS = """
int sys_util_cachestat(int fd, uint64_t offset, uint64_t len, uint64_t *out);
"""
CUSTOMIZATIONS = """
#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif
struct sys_util_cachestat_range { uint64_t off; uint64_t len; };
/* out: nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted (5 x u64). */
static int sys_util_cachestat(int fd, uint64_t offset, uint64_t len, uint64_t *out)
{
    struct sys_util_cachestat_range range = { offset, len };
    return (int)syscall(__NR_cachestat, fd, &range, out, 0);
}
"""
