"""Hatchling build hook: compile this package's cffi module (out-of-line API mode).

The C source is assembled by ``ffi/build.py`` from the real system headers, so struct layouts and
ioctl numbers come from the C compiler, never from hand-copied numbers. A normal wheel gets the
compiled module through ``force_include``; an editable install gets it copied next to the sources
(git-ignored), because an editable install imports straight from ``src/``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CffiBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        spec = importlib.util.spec_from_file_location("_ffi_build", root / "ffi" / "build.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        builder = module.build_ffi()
        self._tmp = tempfile.mkdtemp(prefix="cffi-build-")
        built = Path(builder.compile(tmpdir=self._tmp, verbose=False))
        package, _, stem = module.MODULE_NAME.rpartition(".")
        relative = f"{package.replace('.', '/')}/{stem}{sysconfig.get_config_var('EXT_SUFFIX')}"
        if version == "editable":
            # Never overwrite the module in place: processes that have it mapped would run
            # changed code (and crash). A rename gives the new module a new inode instead.
            dest = root / "src" / relative
            staging = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
            shutil.copy2(built, staging)
            os.replace(staging, dest)
        else:
            build_data["force_include"][str(built)] = relative
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
