/*
 * The C floor for benchmarks/kvm_exits.py: the same guest as the Python side, a tight
 * `out %al,$0x10; jmp` loop, run through bare ioctl(KVM_RUN) with the exit decoded from the
 * mmapped kvm_run page. Prints one line per repeat: "ns_per_exit <float>".
 *
 * usage: kvm_pio_loop <real|user> <exits per repeat> <repeats>
 *   real: the loop in real mode (emulated on PVM hosts, as in peer-figures.md section 7.2)
 *   user: the loop at CPL3 in 64-bit mode (IOPL 3), where the jmp runs natively
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define RAM_SIZE 0x200000
#define CODE 0x10000

static void die(const char *what)
{
    fprintf(stderr, "kvm_pio_loop: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void seg(struct kvm_segment *s, uint16_t sel, uint8_t type, uint8_t dpl, int code)
{
    memset(s, 0, sizeof(*s));
    s->limit = 0xffffffff;
    s->selector = sel;
    s->type = type;
    s->present = 1;
    s->dpl = dpl;
    s->s = 1;
    s->g = 1;
    s->l = code;
    s->db = !code;
}

static void setup_user(int vcpu, uint8_t *ram)
{
    static const uint64_t gdt[] = {0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF,
                                   0x00AFFB000000FFFF, 0x00CFF3000000FFFF};
    struct kvm_sregs sregs;
    struct kvm_regs regs;
    uint64_t *pml4 = (uint64_t *)(ram + 0x9000), *pdpt = (uint64_t *)(ram + 0xa000);
    uint64_t *pd = (uint64_t *)(ram + 0xb000);

    memcpy(ram + 0x500, gdt, sizeof(gdt));
    pml4[0] = 0xa000 | 7;
    pdpt[0] = 0xb000 | 7;
    for (int i = 0; i < 512; i++)
        pd[i] = ((uint64_t)i << 21) | 0x87;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    seg(&sregs.cs, 0x1b, 11, 3, 1);
    seg(&sregs.ds, 0x23, 3, 3, 0);
    sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
    sregs.gdt.base = 0x500;
    sregs.gdt.limit = sizeof(gdt) - 1;
    sregs.cr3 = 0x9000;
    sregs.cr4 = 1 << 5;
    sregs.cr0 = 0x80000033;
    sregs.efer = 0x500;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    memset(&regs, 0, sizeof(regs));
    regs.rip = CODE;
    regs.rsp = 0x8000;
    regs.rflags = 0x3002;
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");
}

static void setup_real(int vcpu)
{
    struct kvm_sregs sregs;
    struct kvm_regs regs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    sregs.cs.base = CODE; /* real mode: cs = CODE >> 4, ip = 0 */
    sregs.cs.selector = CODE >> 4;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    memset(&regs, 0, sizeof(regs));
    regs.rip = 0;
    regs.rflags = 2;
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");
}

int main(int argc, char **argv)
{
    static const uint8_t loop[] = {0xe6, 0x10, 0xeb, 0xfc}; /* out %al,$0x10; jmp .-2 */
    struct kvm_userspace_memory_region region;
    struct timespec t0, t1;
    struct kvm_run *run;
    long exits, repeats;
    int kvm, vm, vcpu, user;
    uint8_t *ram;
    size_t run_size;

    if (argc != 4)
        return fprintf(stderr, "usage: %s <real|user> <exits> <repeats>\n", argv[0]), 2;
    user = strcmp(argv[1], "user") == 0;
    exits = atol(argv[2]);
    repeats = atol(argv[3]);

    kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (ram == MAP_FAILED)
        die("mmap");
    memcpy(ram + CODE, loop, sizeof(loop));
    region = (struct kvm_userspace_memory_region){0, 0, 0, RAM_SIZE, (uintptr_t)ram};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");
    if (user)
        setup_user(vcpu, ram);
    else
        setup_real(vcpu);

    for (long r = -1; r < repeats; r++) { /* r == -1: warm-up */
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (long i = 0; i < exits; i++) {
            if (ioctl(vcpu, KVM_RUN, 0) < 0)
                die("KVM_RUN");
            if (run->exit_reason != KVM_EXIT_IO || run->io.port != 0x10
                || run->io.direction != KVM_EXIT_IO_OUT) {
                fprintf(stderr, "kvm_pio_loop: unexpected exit %u\n", run->exit_reason);
                return 1;
            }
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (r >= 0)
            printf("ns_per_exit %.1f\n",
                   ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / exits);
    }
    return 0;
}
