"""fallocate(2) with mode flags (os.posix_fallocate cannot punch holes or zero ranges)."""

INCLUDES = "#include <fcntl.h>\n#include <linux/falloc.h>\n"
TYPES = """
#define FALLOC_FL_KEEP_SIZE ...
#define FALLOC_FL_PUNCH_HOLE ...
#define FALLOC_FL_ZERO_RANGE ...
"""
FUNCTIONS = """
int sys_util_fallocate(int fd, int mode, int64_t offset, int64_t len);
"""
CUSTOMIZATIONS = """
static int sys_util_fallocate(int fd, int mode, int64_t offset, int64_t len)
{
    return fallocate(fd, mode, (off_t)offset, (off_t)len);
}
"""
