"""Every integer ``KVM_*`` constant and ioctl request of <linux/kvm.h> and <asm/kvm.h>.

The names come from ``ffi/kvm_constants.txt`` (written by ``ffi/generate.py``); each is declared
``#define NAME ...`` so the C compiler supplies the value when the module is built.
"""

from pathlib import Path

_LIST = Path(__file__).resolve().parent.parent / "kvm_constants.txt"
_NAMES = [
    line.strip()
    for line in _LIST.read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

INCLUDES = "#include <linux/kvm.h>\n"
TYPES = "".join(f"#define {name} ...\n" for name in _NAMES)
FUNCTIONS = ""
CUSTOMIZATIONS = ""
