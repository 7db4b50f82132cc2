"""``python -m e2e_tests.kit build [--no-stock]``: build every kit artefact ahead of time.
``python -m e2e_tests.kit prune``: build what is missing, then delete cached artefacts of older
inputs (every edit of a kit input leaves the previous build behind)."""

from __future__ import annotations

import argparse
import shutil
import sys
import time

from . import (
    MODES,
    cache_dir,
    ensure_initramfs,
    ensure_rootfs,
    ensure_stock_kernel,
    ensure_tiny_bzimage,
    ensure_tiny_kernel,
    ensure_vsockcat,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e_tests.kit")
    parser.add_argument("command", choices=["build", "prune"])
    parser.add_argument("--no-stock", action="store_true", help="skip Debian's cloud kernel")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    paths = {
        "cache": cache_dir(),
        "tiny_vmlinux": ensure_tiny_kernel(),
        "tiny_bzimage": ensure_tiny_bzimage(),
    }
    for mode in MODES:
        paths[f"initramfs_{mode}"] = ensure_initramfs(mode)
    paths["initramfs_iperf3"] = ensure_initramfs("delegate", iperf3=True)
    paths["vsockcat"] = ensure_vsockcat()
    paths["rootfs_delegate"] = ensure_rootfs("delegate")
    if not args.no_stock:
        stock = ensure_stock_kernel()
        paths["stock_bzimage"] = stock.bzimage
        paths["stock_vmlinux"] = stock.vmlinux
        paths["stock_initramfs"] = stock.initramfs
    for name, path in paths.items():
        size = "" if path.is_dir() else f"  ({path.stat().st_size:,} B)"
        print(f"{name:18} {path}{size}")
    if args.command == "prune":
        keep = {"locks"} | {
            p.name if p.parent == paths["cache"] else p.parent.name for p in paths.values()
        }
        for entry in sorted(paths["cache"].iterdir()):
            if entry.name not in keep and not entry.name.endswith(".lock"):
                print(f"removing {entry}", file=sys.stderr)
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    print(f"done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
