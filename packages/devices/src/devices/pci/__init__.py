"""PCI: configuration space, bus 0 root with a host bridge, 0xCF8 config I/O, MSI-X.

Typical wiring (in ``arch``)::

    root = PciRoot()
    io_bus.insert(PciConfigIo(root), PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_SIZE)
    addr = root.add_device(virtio_pci_device)
"""

from devices.pci._config import NUM_BARS, BarType, PciBar, PciClass, PciConfiguration
from devices.pci._config_io import PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_SIZE, PciConfigIo
from devices.pci._device import BarAllocator, PciAddress, PciDevice
from devices.pci._errors import BarAllocationError, CapabilitySpaceFull, PciError, PciSlotsExhausted
from devices.pci._msix import MSIX_CAP_ID, MsixConfig
from devices.pci._root import PciHostBridge, PciRoot

__all__ = [
    "MSIX_CAP_ID",
    "NUM_BARS",
    "PCI_CONFIG_IO_BASE",
    "PCI_CONFIG_IO_SIZE",
    "BarAllocationError",
    "BarAllocator",
    "BarType",
    "CapabilitySpaceFull",
    "MsixConfig",
    "PciAddress",
    "PciBar",
    "PciClass",
    "PciConfigIo",
    "PciConfiguration",
    "PciDevice",
    "PciError",
    "PciHostBridge",
    "PciRoot",
    "PciSlotsExhausted",
]
