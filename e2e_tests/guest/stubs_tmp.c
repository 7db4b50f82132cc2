#include "guest.h"
#include "scenarios.h"
void sc_pci_list(void) { fail("todo"); }
void sc_blk_read_sha256(void) { fail("todo"); }
void sc_blk_write_pattern(void) { fail("todo"); }
void sc_blk_bench(void) { fail("todo"); }
void sc_rng_read(void) { fail("todo"); }
void sc_console_echo(void) { fail("todo"); }
void sc_net_echo(void) { fail("todo"); }
void sc_balloon(void) { fail("todo"); }
void sc_vsock_echo(void) { fail("todo"); }
void sc_hostile(void) { fail("todo"); }
void sc_irq(void) { fail("todo"); }
