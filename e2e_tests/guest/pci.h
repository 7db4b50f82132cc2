#ifndef PCI_H
#define PCI_H
#include "guest.h"

struct pci_dev {
    u8 bus, dev, fn, hdr_type;
    u16 vendor, device;
    u32 class_rev;
    u8 irq_line, irq_pin;
    u64 bar[6], bar_size[6];
    u8 bar_io[6], bar_64[6], bar_assigned[6];
};

u32 pci_read32(const struct pci_dev *d, u8 off);
u16 pci_read16(const struct pci_dev *d, u8 off);
u8 pci_read8(const struct pci_dev *d, u8 off);
void pci_write32(const struct pci_dev *d, u8 off, u32 v);
void pci_write16(const struct pci_dev *d, u8 off, u16 v);
void pci_write8(const struct pci_dev *d, u8 off, u8 v);
/* Enumerate (once), size every BAR and assign unassigned memory BARs from the window. */
int pci_scan(struct pci_dev **out);
/* n-th (0-based) function with this vendor and one of the device ids (0 terminated list). */
struct pci_dev *pci_find(u16 vendor, const u16 *devices, int nth);
u8 pci_find_cap(const struct pci_dev *d, u8 id, u8 start);
void pci_enable(const struct pci_dev *d, int intx);

#endif
