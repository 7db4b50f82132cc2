/* Constants shared by boot.S and the C code. */
#ifndef LAYOUT_H
#define LAYOUT_H

#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA (0x18 | 3)
#define SEL_UCODE (0x20 | 3)
#define SEL_KCODE32 0x28
#define SEL_TSS 0x30 /* + 16 * cpu */

#define MAX_CPUS 8
#define TSS_SIZE 0x68
#define KSTACK_SHIFT 14 /* 16 KiB CPL0 stack per CPU */
#define USTACK_SHIFT 18 /* 256 KiB CPL3 stack per CPU */
#define AP_TRAMP 0x8000 /* real-mode start-up code for the APs (SIPI vector 0x08) */

#define BOOT_LINUX64 1
#define BOOT_PVH 2

#define VEC_SYSCALL 0x80
#define SYS_NOP 0
#define SYS_SPIN 1
#define SYS_HLT 2
#define SYS_INB 3
#define SYS_INW 4
#define SYS_INL 5
#define SYS_OUTB 6
#define SYS_OUTW 7
#define SYS_OUTL 8
#define SYS_MAX 8

/* Interrupt vectors used by the drivers: MSI-X entries get VEC_MSIX_BASE + n, INTx VEC_INTX. */
#define VEC_MSIX_BASE 0x40
#define VEC_INTX 0x30
#define VEC_TIMER 0xEF /* LAPIC timer: bounds SYS_HLT naps */

#endif
