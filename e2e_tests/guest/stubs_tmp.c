#include "guest.h"
#include "scenarios.h"
void sc_vsock_echo(void) { fail("todo"); }
