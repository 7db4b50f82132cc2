/*
 * CPL0 part of the test guest: the two entry points, the descriptor tables, the identity page
 * tables and the interrupt stubs. Everything here runs through the host's instruction emulator
 * on an emulating-KVM host (~1M instructions/s), so it is kept to a few hundred instructions:
 * the page tables and GDT are assembled into .data (no loops at boot), only the IDT and the
 * TSS descriptor are filled at run time. Then `iretq` drops to CPL3 with IOPL=3.
 *
 * Only plain integer instructions are used (no xsave, cmpxchg16b, int3, fwait, popcnt).
 */
#include "layout.h"

#define PTE_P   0x001
#define PTE_RW  0x002
#define PTE_US  0x004
#define PTE_PWT 0x008
#define PTE_PCD 0x010
#define PTE_PS  0x080
#define PTE_RAM (PTE_P | PTE_RW | PTE_US | PTE_PS)
#define PTE_MMIO (PTE_RAM | PTE_PWT | PTE_PCD)

    .section .text.boot, "ax"
    .code64
    .globl _start64
/* Linux 64-bit boot protocol: long mode, paging on (identity map), rsi = struct boot_params. */
_start64:
    cli
    cld
    movq %rsi, boot_info(%rip)
    movl $BOOT_LINUX64, boot_kind(%rip)
    jmp common64

/* PVH (XEN_ELFNOTE_PHYS32_ENTRY): 32-bit protected mode, paging off, ebx = hvm_start_info. */
    .code32
    .globl _start32
_start32:
    cli
    cld
    movl %ebx, boot_info
    movl $BOOT_PVH, boot_kind
    lgdt gdt_desc
    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax                 /* PAE */
    movl %eax, %cr4
    movl $0xC0000080, %ecx          /* EFER */
    rdmsr
    orl $0x100, %eax                /* LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* PG | PE */
    movl %eax, %cr0
    ljmp $SEL_KCODE, $common64

    .code64
common64:
    lgdt gdt_desc(%rip)
    movl $SEL_KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movq $pml4, %rax
    movq %rax, %cr3
    movq $(kstacks + (1 << KSTACK_SHIFT)), %rsp
    pushq $SEL_KCODE
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:
    /* CR0: WP on, no FPU emulation (the guest is built -mgeneral-regs-only anyway). */
    movq %cr0, %rax
    orq $0x10000, %rax
    movq %rax, %cr0

    xorl %edi, %edi
    call load_tss

    /* IDT: 256 interrupt gates; stub i is at isr_stubs + 16*i. */
    leaq idt(%rip), %rdi
    movq $isr_stubs, %rdx
    xorl %ecx, %ecx
2:
    movq %rdx, %rax
    andl $0xFFFF, %eax
    orl $(SEL_KCODE << 16), %eax
    movq %rdx, %rsi
    shrq $16, %rsi
    shlq $48, %rsi
    orq %rsi, %rax
    movq $0x00008E0000000000, %rsi  /* present, DPL0, 64-bit interrupt gate */
    cmpl $VEC_SYSCALL, %ecx
    jne 3f
    movq $0x0000EE0000000000, %rsi  /* DPL3: reachable by `int $0x80` from CPL3 */
3:
    orq %rsi, %rax
    movq %rax, (%rdi)
    movq $0, 8(%rdi)
    addq $16, %rdi
    addq $16, %rdx
    incl %ecx
    cmpl $256, %ecx
    jne 2b
    lidt idt_desc(%rip)
    xorl %edi, %edi

    /* To CPL3 with IOPL=3 (port I/O where the host honours it) and interrupts enabled. */
    pushq $SEL_UDATA
    pushq $(ustacks + (1 << USTACK_SHIFT))
    pushq $0x3202                   /* IOPL=3, IF=1 (sources stay masked until used) */
    pushq $SEL_UCODE
    pushq $user_entry
    iretq

/*
 * load_tss(rdi = cpu): point TSS descriptor `cpu` at tss + cpu*TSS_SIZE, set that TSS's rsp0
 * to the top of the cpu's kernel stack, and `ltr` it.
 */
load_tss:
    imulq $TSS_SIZE, %rdi, %rax
    addq $tss, %rax
    movq %rdi, %rcx
    incq %rcx
    shlq $KSTACK_SHIFT, %rcx
    addq $kstacks, %rcx
    movq %rcx, 4(%rax)              /* rsp0 */
    movq %rdi, %rcx
    shlq $4, %rcx
    addq $gdt_tss, %rcx
    movw %ax, 2(%rcx)
    shrq $16, %rax
    movb %al, 4(%rcx)
    movb %ah, 7(%rcx)
    shrq $16, %rax
    movl %eax, 8(%rcx)
    movq %rdi, %rax
    shlq $4, %rax
    addq $SEL_TSS, %rax
    ltr %ax
    ret

/*
 * Application processors. The BSP copies ap_tramp..ap_tramp_end to AP_TRAMP (below 1 MiB)
 * and sends INIT + SIPI(AP_TRAMP >> 12). Each AP goes real -> protected -> long mode (emulated,
 * ~40 instructions), takes an index, loads its own TSS and stacks, and drops to CPL3 in
 * ap_main(index).
 */
    .code16
    .globl ap_tramp, ap_tramp_end
ap_tramp:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl AP_TRAMP + (ap_gdt_desc - ap_tramp)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $SEL_KCODE32, $ap_start32
    .p2align 2
ap_gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:

    .code32
ap_start32:
    movl $SEL_KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    ljmp $SEL_KCODE, $ap64

    .code64
ap64:
    lgdt gdt_desc(%rip)
    movl $SEL_KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl $1, %eax
    lock xaddl %eax, ap_next(%rip)
    cmpl $MAX_CPUS, %eax
    jae 9f
    movl %eax, %edi
    movq %rdi, %rsp
    incq %rsp
    shlq $KSTACK_SHIFT, %rsp
    addq $kstacks, %rsp
    pushq %rdi
    call load_tss
    popq %rdi
    lidt idt_desc(%rip)
    movq %rdi, %rax
    incq %rax
    shlq $USTACK_SHIFT, %rax
    addq $ustacks, %rax
    pushq $SEL_UDATA
    pushq %rax
    pushq $0x3202
    pushq $SEL_UCODE
    pushq $ap_user_entry
    iretq
9:  cli
    hlt
    jmp 9b

/*
 * Interrupt and exception stubs, 16 bytes each. Vectors with a CPU error code skip the dummy push.
 * Stack on entry to *_common: vector, error code, then the iret frame.
 */
    .p2align 4
    .globl isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    .p2align 4
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21)
    .else
    pushq $0
    .endif
    pushq $vec
    .if vec < 32
    jmp exc_common
    .elseif vec == VEC_SYSCALL
    jmp syscall_common
    .else
    jmp irq_common
    .endif
    .set vec, vec + 1
    .endr

/*
 * Exceptions are fatal: report them from C (emulated, but it happens once) and reset. The one
 * exception is the boot-time IOPL probe: a #GP on the `inb` at io_probe_insn means the host
 * does not honour IOPL=3 for user mode; note it and skip the 1-byte instruction.
 */
exc_common:
    cmpq $6, (%rsp)
    jne 3f
    /* #UD on `int $0x80` at CPL3: the emulating host does not deliver software interrupts from
     * user mode but raises #UD on them. Treat it as the call it was meant to be. */
    pushq %rax
    movq 24(%rsp), %rax
    cmpw $0x80CD, (%rax)
    jne 4f
    addq $2, %rax
    movq %rax, 24(%rsp)
    popq %rax
    jmp syscall_common
4:  popq %rax
3:  cmpq $13, (%rsp)
    jne 1f
    pushq %rax
    movq 24(%rsp), %rax
    cmpq $io_probe_insn, %rax
    jne 2f
    incq %rax
    movq %rax, 24(%rsp)
    movl $1, io_probe_faulted
    popq %rax
    addq $16, %rsp
    iretq
2:  popq %rax
1:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rbx
    pushq %rbp
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    movq %cr2, %rsi
    call kernel_exception
5:  hlt
    jmp 5b

/*
 * Device interrupts: count the vector (CPL3 code polls irq_count), read a registered ISR
 * register (virtio INTx: the read deasserts the level-triggered line), then EOI the LAPIC.
 * About 15 emulated instructions per interrupt.
 */
irq_common:
    pushq %rax
    pushq %rdx
    movq 16(%rsp), %rax
    lock incq irq_count(,%rax,8)
    movq irq_isr_addr(,%rax,8), %rdx
    testq %rdx, %rdx
    jz 5f
    movzbl (%rdx), %edx
    lock orq %rdx, irq_isr_bits(,%rax,8)
5:
    movl $0xFEE000B0, %edx          /* LAPIC EOI (xAPIC MMIO) */
    movl $0, (%rdx)
    popq %rdx
    popq %rax
    addq $16, %rsp
    iretq

/*
 * int $0x80 from CPL3: rax = function, arguments in rdi/rsi/rdx, result in rax.
 *   SYS_NOP:  round trip only.
 *   SYS_SPIN: dec/jnz loop of rdi iterations at CPL0 (the host-profile probe).
 *   SYS_HLT:  if *rdi == rsi: sti; hlt; cli  (sleep until an interrupt).
 *   SYS_IN{B,W,L} / SYS_OUT{B,W,L}: port rdx, value rsi. The emulating host does not honour
 *   RFLAGS.IOPL for guest user mode (in/out at CPL3 raise #GP), so port I/O goes through here
 *   unless the guest found at boot that IOPL=3 works (see io_native in lib.c).
 */
syscall_common:
    cmpq $SYS_MAX, %rax
    ja 7f
    jmp *syscall_table(,%rax,8)
sys_spin:
    movq %rdi, %rcx
    testq %rcx, %rcx
    jz 7f
8:  decq %rcx
    jnz 8b
    jmp 7f
sys_hlt:
    /* rdi = &counter, rsi = value seen: sleep only if no interrupt came since (IF is 0 here,
     * and `sti; hlt` cannot be split by an interrupt, so no wake-up is lost) */
    cmpq %rsi, (%rdi)
    jne 7f
    sti
    hlt
    cli
    jmp 7f
sys_inb:
    xorl %eax, %eax
    inb %dx, %al
    jmp 7f
sys_inw:
    xorl %eax, %eax
    inw %dx, %ax
    jmp 7f
sys_inl:
    inl %dx, %eax
    jmp 7f
sys_outb:
    movl %esi, %eax
    outb %al, %dx
    jmp 7f
sys_outw:
    movl %esi, %eax
    outw %ax, %dx
    jmp 7f
sys_outl:
    movl %esi, %eax
    outl %eax, %dx
7:  addq $16, %rsp
    iretq

    .section .rodata
    .p2align 3
syscall_table:
    .quad 7b, sys_spin, sys_hlt, sys_inb, sys_inw, sys_inl, sys_outb, sys_outw, sys_outl
    .text

/* int io_probe(void): 1 if `in` works at CPL3. */
    .globl io_probe
io_probe:
    movl $0, io_probe_faulted
    movl $0x3FD, %edx
    .globl io_probe_insn
io_probe_insn:
    inb %dx, %al
    movl io_probe_faulted, %eax
    xorl $1, %eax
    ret

/* CPL3 entries: an aligned call into C (rdi = cpu index for APs). */
    .globl user_entry
user_entry:
    call user_main
9:  pause
    jmp 9b
ap_user_entry:
    call ap_main
10: pause
    jmp 10b

/* ---------------------------------------------------------------------------------------- */

    .section .note.pvh, "a"
    .p2align 2
    .long 4                         /* namesz */
    .long 4                         /* descsz */
    .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long _start32

    .section .data.pagetables, "aw"
    .p2align 12
    .globl pml4
pml4:
    .quad pdpt + (PTE_P | PTE_RW | PTE_US)
    .fill 511, 8, 0
pdpt:
    .quad pd0 + (PTE_P | PTE_RW | PTE_US)
    .quad pd1 + (PTE_P | PTE_RW | PTE_US)
    .quad pd2 + (PTE_P | PTE_RW | PTE_US)
    .quad pd3 + (PTE_P | PTE_RW | PTE_US)
    .fill 508, 8, 0
/* 0-3 GiB: RAM (write-back); 3-4 GiB: the PCI hole, LAPIC, IOAPIC (uncached). 2 MiB pages. */
pd0:
    .set i, 0
    .rept 1536
    .quad (i << 21) + PTE_RAM
    .set i, i + 1
    .endr
    .rept 512
    .quad (i << 21) + PTE_MMIO
    .set i, i + 1
    .endr
pd1 = pd0 + 4096
pd2 = pd0 + 8192
pd3 = pd0 + 12288

    .data
    .p2align 4
gdt:
    .quad 0                         /* 0x00 null */
    .quad 0x00AF9A000000FFFF        /* 0x08 kernel code, 64-bit */
    .quad 0x00CF92000000FFFF        /* 0x10 kernel data */
    .quad 0x00CFF2000000FFFF        /* 0x18 user data (DPL3) */
    .quad 0x00AFFA000000FFFF        /* 0x20 user code, 64-bit (DPL3) */
    .quad 0x00CF9A000000FFFF        /* 0x28 kernel code, 32-bit (AP start-up) */
gdt_tss:                            /* 0x30 + 16*cpu: one TSS per CPU (base filled at boot) */
    .rept MAX_CPUS
    .quad 0x0000890000000067
    .quad 0
    .endr
gdt_end:
    .p2align 3
    .word 0
gdt_desc:
    .word gdt_end - gdt - 1
    .quad gdt

    .word 0, 0, 0
idt_desc:
    .word 256 * 16 - 1
    .quad idt

    .p2align 4
    .globl tss
tss:                                /* MAX_CPUS TSSes; rsp0 (offset 4) set by load_tss */
    .fill TSS_SIZE * MAX_CPUS, 1, 0

    .globl boot_info, boot_kind
    .p2align 3
boot_info:  .quad 0
boot_kind:  .long 0
io_probe_faulted: .long 0
    .globl ap_next
ap_next:    .long 1

    .section .idt, "aw", @nobits      /* outside __bss_start..__bss_end: CPL3 clears .bss */
    .p2align 12
idt:
    .fill 256 * 16, 1, 0

    .bss
    .globl irq_count, irq_isr_addr, irq_isr_bits
    .p2align 6
irq_count:      .fill 256, 8, 0
irq_isr_addr:   .fill 256, 8, 0
irq_isr_bits:   .fill 256, 8, 0

    .section .stacks, "aw", @nobits
    .p2align 12
kstacks:                            /* cpu i: [kstacks + i*16K, kstacks + (i+1)*16K) */
    .fill MAX_CPUS << KSTACK_SHIFT, 1, 0
ustacks:                            /* cpu i: 256 KiB each */
    .fill MAX_CPUS << USTACK_SHIFT, 1, 0
