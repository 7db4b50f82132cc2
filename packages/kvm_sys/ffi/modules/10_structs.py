"""Structures of <linux/kvm.h> and <asm/kvm.h> that the VMM passes to ioctls.

Structs end in ``...;`` wherever the kernel has padding or members we never touch, so the C
compiler fixes sizes and offsets; structs holding anonymous unions (``kvm_run``,
``kvm_irq_level``, ``kvm_dirty_log``) cannot be partial in cffi, so they are spelled out whole
and cffi checks every offset and the size against the compiler's at import.
"""

INCLUDES = "#include <linux/kvm.h>\n"
TYPES = r"""
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;
typedef long long __s64;

/* --- system --- */
struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; };
struct kvm_cpuid_entry2 {
    __u32 function; __u32 index; __u32 flags;
    __u32 eax; __u32 ebx; __u32 ecx; __u32 edx;
    ...;
};
struct kvm_cpuid2 { __u32 nent; __u32 padding; struct kvm_cpuid_entry2 entries[]; };

/* --- VM --- */
struct kvm_userspace_memory_region {
    __u32 slot; __u32 flags; __u64 guest_phys_addr; __u64 memory_size; __u64 userspace_addr;
};
struct kvm_irqfd { __u32 fd; __u32 gsi; __u32 flags; __u32 resamplefd; ...; };
struct kvm_ioeventfd { __u64 datamatch; __u64 addr; __u32 len; __s32 fd; __u32 flags; ...; };
struct kvm_irq_routing_irqchip { __u32 irqchip; __u32 pin; };
struct kvm_irq_routing_msi {
    __u32 address_lo; __u32 address_hi; __u32 data; union { __u32 pad; __u32 devid; };
};
struct kvm_irq_routing_entry {
    __u32 gsi; __u32 type; __u32 flags; __u32 pad;
    union {
        struct kvm_irq_routing_irqchip irqchip;
        struct kvm_irq_routing_msi msi;
        __u32 pad[8];
    } u;
    ...;
};
struct kvm_irq_routing { __u32 nr; __u32 flags; struct kvm_irq_routing_entry entries[]; };
struct kvm_irq_level { union { __u32 irq; __s32 status; }; __u32 level; };
struct kvm_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 flags; __u32 devid; ...; };
struct kvm_clock_data { __u64 clock; __u32 flags; ...; };
struct kvm_dirty_log { __u32 slot; __u32 padding1; union { void *dirty_bitmap; __u64 padding2; }; };
struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; ...; };
struct kvm_irqchip { __u32 chip_id; __u32 pad; union { char dummy[512]; } chip; ...; };
struct kvm_pit_config { __u32 flags; ...; };
struct kvm_pit_state2 { __u32 flags; ...; };

/* --- vCPU --- */
struct kvm_regs {
    __u64 rax, rbx, rcx, rdx;
    __u64 rsi, rdi, rsp, rbp;
    __u64 r8,  r9,  r10, r11;
    __u64 r12, r13, r14, r15;
    __u64 rip, rflags;
};
struct kvm_segment {
    __u64 base; __u32 limit; __u16 selector; __u8 type;
    __u8 present, dpl, db, s, l, g, avl;
    __u8 unusable; __u8 padding;
};
struct kvm_dtable { __u64 base; __u16 limit; __u16 padding[3]; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer;
    __u64 apic_base;
    __u64 interrupt_bitmap[4];
};
struct kvm_fpu {
    __u8 fpr[8][16];
    __u16 fcw; __u16 fsw; __u8 ftwx; __u8 pad1; __u16 last_opcode;
    __u64 last_ip; __u64 last_dp;
    __u8 xmm[16][16];
    __u32 mxcsr; __u32 pad2;
};
struct kvm_msr_entry { __u32 index; __u32 reserved; __u64 data; };
struct kvm_msrs { __u32 nmsrs; __u32 pad; struct kvm_msr_entry entries[]; };
struct kvm_lapic_state { char regs[1024]; };
struct kvm_mp_state { __u32 mp_state; };
struct kvm_xsave { __u32 region[1024]; ...; };
struct kvm_xcr { __u32 xcr; __u32 reserved; __u64 value; };
struct kvm_xcrs { __u32 nr_xcrs; __u32 flags; struct kvm_xcr xcrs[16]; ...; };
struct kvm_vcpu_events {
    struct {
        __u8 injected; __u8 nr; __u8 has_error_code; __u8 pending; __u32 error_code;
    } exception;
    struct { __u8 injected; __u8 nr; __u8 soft; __u8 shadow; } interrupt;
    struct { __u8 injected; __u8 pending; __u8 masked; __u8 pad; } nmi;
    __u32 sipi_vector;
    __u32 flags;
    struct { __u8 smm; __u8 pending; __u8 smm_inside_nmi; __u8 latched_init; } smi;
    struct { __u8 pending; } triple_fault;
    __u8 reserved[26];
    __u8 exception_has_payload;
    __u64 exception_payload;
};
struct kvm_debugregs { __u64 db[4]; __u64 dr6; __u64 dr7; __u64 flags; ...; };
struct kvm_signal_mask { __u32 len; __u8 sigset[]; };
struct kvm_guest_debug_arch { __u64 debugreg[8]; };
struct kvm_guest_debug { __u32 control; __u32 pad; struct kvm_guest_debug_arch arch; };
struct kvm_debug_exit_arch { __u32 exception; __u32 pad; __u64 pc; __u64 dr6; __u64 dr7; };
struct kvm_interrupt { __u32 irq; };

/* --- the shared kvm_run page (only the x86 exits the VMM decodes are named) --- */
struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u8 padding1[6];
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    __u16 flags;
    __u64 cr8;
    __u64 apic_base;
    union {
        struct { __u64 hardware_exit_reason; } hw;
        struct { __u64 hardware_entry_failure_reason; __u32 cpu; } fail_entry;
        struct { __u32 exception; __u32 error_code; } ex;
        struct { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; } io;
        struct { struct kvm_debug_exit_arch arch; } debug;
        struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; } mmio;
        struct { __u32 suberror; __u32 ndata; __u64 data[16]; } internal;
        struct { __u32 type; __u32 ndata; __u64 data[16]; } system_event;
        struct { __u8 error; __u8 pad[7]; __u32 reason; __u32 index; __u64 data; } msr;
        char padding[256];
    };
    __u64 kvm_valid_regs;
    __u64 kvm_dirty_regs;
    union { char padding[2048]; } s;
};
"""
FUNCTIONS = ""
CUSTOMIZATIONS = ""
