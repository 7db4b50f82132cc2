#ifndef SCENARIOS_H
#define SCENARIOS_H

struct scenario {
    const char *name;
    void (*run)(void);
};

void sc_hello(void);
void sc_cpuid(void);
void sc_rtc(void);
void sc_speed(void);
void sc_pci_list(void);
void sc_serial_echo(void);
void sc_blk_read_sha256(void);
void sc_blk_write_pattern(void);
void sc_blk_resize(void);
void sc_blk_bench(void);
void sc_rng_read(void);
void sc_console_echo(void);
void sc_net_echo(void);
void sc_net_bench(void);
void sc_balloon(void);
void sc_vsock_echo(void);
void sc_vsock_connect(void);
void sc_hostile(void);
void sc_irq(void);
void sc_smp(void);

#endif
