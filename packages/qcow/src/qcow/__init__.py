"""A crash-safe qcow2 disk image library, interoperable with qemu-img.

>>> import qcow, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "disk.qcow2")
>>> with qcow.QcowFile.create(path, 1 << 20) as img:
...     img.write_at(b"hello", 4096)
...     img.read_at(4096, 5)
5
b'hello'
"""

from qcow.__about__ import __version__
from qcow._backing import detect_image_type
from qcow._check import CheckResult
from qcow._qcow import QcowFile
from qcow.errors import (
    CorruptImage,
    Error,
    InvalidChain,
    InvalidImage,
    OutOfRange,
    QcowError,
    ReadOnlyImage,
    UnsupportedFeature,
)

__all__ = [
    "CheckResult",
    "CorruptImage",
    "Error",
    "InvalidChain",
    "InvalidImage",
    "OutOfRange",
    "QcowError",
    "QcowFile",
    "ReadOnlyImage",
    "UnsupportedFeature",
    "__version__",
    "detect_image_type",
]
