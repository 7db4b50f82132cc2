#include "guest.h"
#include "scenarios.h"
void sc_net_echo(void) { fail("todo"); }
void sc_balloon(void) { fail("todo"); }
void sc_vsock_echo(void) { fail("todo"); }
