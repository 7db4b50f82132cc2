"""timerfd(2): Python 3.11 has no os.timerfd_create."""

INCLUDES = "#include <sys/timerfd.h>\n#include <time.h>\n"
TYPES = """
#define TFD_CLOEXEC ...
#define TFD_NONBLOCK ...
#define TFD_TIMER_ABSTIME ...
#define CLOCK_MONOTONIC ...
#define CLOCK_REALTIME ...
#define CLOCK_BOOTTIME ...

typedef int... time_t;
struct timespec { time_t tv_sec; long tv_nsec; ...; };
struct itimerspec { struct timespec it_interval; struct timespec it_value; };
"""
FUNCTIONS = """
int timerfd_create(int clockid, int flags);
int timerfd_settime(int fd, int flags, const struct itimerspec *new_value,
                    struct itimerspec *old_value);
int timerfd_gettime(int fd, struct itimerspec *curr_value);
"""
CUSTOMIZATIONS = ""
