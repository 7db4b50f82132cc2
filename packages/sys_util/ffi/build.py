"""Assemble the cffi builder for ``sys_util._native`` from the modules in ``ffi/modules/``.

Each module holds one header area and exposes four strings, as pyca/cryptography's ``_cffi_src``
does: ``INCLUDES`` and ``CUSTOMIZATIONS`` go to the C source, ``TYPES`` and ``FUNCTIONS`` to the
cdef. Modules are taken in file-name order. The package version is stamped into the compiled
module so a stale ``.so`` is caught at import.
"""

from __future__ import annotations

import re
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path

import cffi

MODULE_NAME = "sys_util._native"
HERE = Path(__file__).resolve().parent


def _version() -> str:
    about = (HERE.parent / "src" / "sys_util" / "__about__.py").read_text()
    match = re.search(r'__version__ = "([^"]+)"', about)
    assert match is not None
    return match.group(1)


def build_ffi() -> cffi.FFI:
    includes, types, functions, customizations = [], [], [], []
    for path in sorted((HERE / "modules").glob("*.py")):
        spec = spec_from_file_location(f"_ffi_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = module_from_spec(spec)
        spec.loader.exec_module(module)
        includes.append(module.INCLUDES)
        types.append(module.TYPES)
        functions.append(module.FUNCTIONS)
        customizations.append(module.CUSTOMIZATIONS)
    version = _version()
    ffi = cffi.FFI()
    ffi.cdef("\n".join(types + functions) + "\nstatic const char PACKAGE_VERSION[];\n")
    ffi.set_source(
        MODULE_NAME,
        "\n".join(includes + customizations)
        + f'\nstatic const char PACKAGE_VERSION[] = "{version}";\n',
        extra_compile_args=["-O2", "-Wall"],
    )
    return ffi
