"""Build (once, cached) the Linux guest artefacts the e2e tests and the demo boot.

* :func:`ensure_tiny_kernel` -- Debian's ``linux-source-6.1``, ``tinyconfig`` + our fragment +
  three patches, so it boots where guest kernel code is emulated (build-kernel.sh; ~4-11 min).
* :func:`ensure_initramfs` -- busybox-static + our ``/init`` (guest-init.sh) + ``vsockcat``,
  uncompressed; ``iperf3=True`` adds Debian's iperf3 with its shared libraries and loader.
* :func:`ensure_vsockcat` -- our static AF_VSOCK netcat (tools/vsockcat.c, ``gcc -static``).
* :func:`ensure_stock_kernel` -- Debian's own ``linux-image-*-cloud-amd64`` (downloaded, not
  installed): its bzImage, the ELF vmlinux extracted from it, and an initramfs that insmods its
  virtio modules. For hosts with real (hardware) KVM: on emulating hosts it cannot boot.
* :func:`make_ext4` / :func:`ensure_rootfs` -- ext4 images from a file tree (``mkfs.ext4 -d``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ._cache import KIT_DIR, cache_dir, input_key, locked, log
from .bzimage import extract_vmlinux
from .cpio import Tree
from .modules import module_closure

__all__ = [
    "BUSYBOX",
    "MODES",
    "StockKernel",
    "busybox_tree",
    "ensure_initramfs",
    "ensure_rootfs",
    "ensure_stock_kernel",
    "ensure_tiny_bzimage",
    "ensure_tiny_kernel",
    "ensure_vsockcat",
    "iperf3_closure",
    "make_ext4",
]

BUSYBOX = Path("/bin/busybox")
MODES = ("delegate", "shell", "boot")

#: Applet links in /bin. Every initramfs entry costs the emulated kernel ~30 ms of boot, so
#: only these; Debian's busybox-static runs any other applet from the shell without a link.
_APPLET_LIST = """
    sh ash true false echo printf cat ls dd mount umount sleep usleep reboot poweroff halt
    grep awk sed cut head tail wc setsid cttyhack blockdev ifconfig ip sha256sum md5sum ps
    dmesg uname mkdir rm cp mv ln sync insmod stty
"""
APPLETS = tuple(_APPLET_LIST.split())

_TINY_INPUTS = ["build-kernel.sh", "tiny-guest.config"]
_VSOCKCAT_SRC = "tools/vsockcat.c"
_INITRAMFS_INPUTS = ["guest-init.sh", "cpio.py", "_build.py", _VSOCKCAT_SRC]
IPERF3 = Path("/usr/bin/iperf3")
_STOCK_INPUTS = ["bzimage.py", "modules.py", *_INITRAMFS_INPUTS]

#: The stock kernel's drivers the guest needs (module names as in modules.dep/.modinfo);
#: those built into the kernel are skipped, the rest are loaded with their dependencies.
STOCK_MODULES = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "virtio_balloon",
    "vmw_vsock_virtio_transport",
)


def _dpkg_version(package: str) -> str:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False
    )
    return proc.stdout.strip() if proc.returncode == 0 else "not-installed"


def _file_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# --- the tiny kernel ------------------------------------------------------------------------


def _tiny_dir() -> Path:
    patches = sorted(p.relative_to(KIT_DIR) for p in (KIT_DIR / "patches").glob("*.patch"))
    key = input_key(
        [*_TINY_INPUTS, *patches], [f"linux-source-6.1={_dpkg_version('linux-source-6.1')}"]
    )
    return cache_dir() / f"tiny-kernel-{key}"


def _ensure_tiny() -> Path:
    out = _tiny_dir()
    if (out / "vmlinux").exists():
        return out
    with locked(out.name):
        if (out / "vmlinux").exists():
            return out
        tarball = Path("/usr/src/linux-source-6.1.tar.xz")
        if not tarball.exists():
            raise RuntimeError(f"{tarball} missing: apt-get install linux-source-6.1")
        log(f"building the tiny guest kernel into {out} (4-12 min of `nice make -j2`)")
        subprocess.run([str(KIT_DIR / "build-kernel.sh"), str(out)], check=True)
    return out


def ensure_tiny_kernel() -> Path:
    """The trimmed kernel as an ELF ``vmlinux`` (PVH note; load it directly, no decompressor)."""
    return _ensure_tiny() / "vmlinux"


def ensure_tiny_bzimage() -> Path:
    """The same trimmed kernel as a bzImage (LZ4 payload), for boot-protocol tests."""
    return _ensure_tiny() / "bzImage"


# --- guest tools ----------------------------------------------------------------------------


def _toolchain() -> str:
    """What a static build depends on besides the source: gcc and the static libc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc missing: apt-get install build-essential")
    version = subprocess.run([gcc, "-dumpfullversion"], capture_output=True, text=True).stdout
    return f"gcc={version.strip()} libc6-dev={_dpkg_version('libc6-dev')}"


def ensure_vsockcat() -> Path:
    """``vsockcat`` (tools/vsockcat.c) built with ``gcc -static -O2``: a netcat for AF_VSOCK
    (``connect <cid> <port>`` / ``listen <port>``, half-close, one-line errors). Busybox has no
    vsock applet, and a static binary is ONE initramfs entry (no libraries to copy)."""
    toolchain = _toolchain()
    out = cache_dir() / f"vsockcat-{input_key([_VSOCKCAT_SRC], [toolchain])}"
    if out.exists():
        return out
    with locked(out.name):
        if not out.exists():
            log(f"gcc -static {_VSOCKCAT_SRC} -> {out.name}")
            partial = Path(str(out) + ".partial")
            proc = subprocess.run(
                ["gcc", "-static", "-O2", "-s", "-Wall", "-Wextra", "-Werror",
                 "-o", str(partial), str(KIT_DIR / _VSOCKCAT_SRC)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                partial.unlink(missing_ok=True)
                raise RuntimeError(f"building vsockcat failed:\n{proc.stderr.strip()}")
            partial.replace(out)
    return out


def iperf3_closure(binary: Path = IPERF3) -> dict[str, Path]:
    """Debian's iperf3 and what it needs to run in the guest: every shared library ``ldd``
    names and the dynamic loader. Maps each guest path (the path ``ldd`` prints, which is where
    the loader looks) to the host file whose contents go there (symlinks resolved)."""
    if not binary.exists():
        raise RuntimeError(f"{binary} missing: apt-get install iperf3")
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ldd {binary}: {proc.stderr.strip() or proc.stdout.strip()}")
    files = {f"bin/{binary.name}": binary.resolve()}
    for line in proc.stdout.splitlines():
        line = line.strip()
        if "=>" in line:  # libfoo.so.1 => /lib/x86_64-linux-gnu/libfoo.so.1 (0x...)
            target = line.split("=>", 1)[1].strip().split(" (", 1)[0]
            if not target.startswith("/"):
                raise RuntimeError(f"ldd {binary}: unresolved library: {line}")
        elif line.startswith("/"):  # the loader: /lib64/ld-linux-x86-64.so.2 (0x...)
            target = line.split(" (", 1)[0]
        else:  # linux-vdso.so.1: provided by the kernel
            continue
        files[target.lstrip("/")] = Path(target).resolve()
    return files


# --- initramfs ------------------------------------------------------------------------------


def busybox_tree(mode: str = "delegate", *, initramfs: bool = True, iperf3: bool = False) -> Tree:
    """The guest's file tree: busybox, applet links, /init, ``/etc/kit-mode`` and
    ``/bin/vsockcat``; with ``iperf3``, also ``/bin/iperf3`` and its libraries (~7 MB: opt-in,
    because every byte and entry of an initramfs costs the emulated kernel boot time)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if not BUSYBOX.exists():
        raise RuntimeError(f"{BUSYBOX} missing: apt-get install busybox-static")
    tree = Tree()
    for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "mnt"):
        tree.add_dir(d)
    tree.add_file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in APPLETS:
        tree.add_symlink(f"bin/{applet}", "busybox")
    tree.add_file("init", (KIT_DIR / "guest-init.sh").read_bytes(), 0o755)
    tree.add_file("etc/kit-mode", f"{mode}\n".encode())
    tree.add_file("bin/vsockcat", ensure_vsockcat().read_bytes(), 0o755)
    if iperf3:
        for guest_path, host_file in iperf3_closure().items():
            tree.add_file(guest_path, host_file.read_bytes(), 0o755)
    if initramfs:
        # the kernel opens /dev/console for init before /init can mount devtmpfs
        tree.add_chardev("dev/console", 5, 1, 0o600)
        tree.add_chardev("dev/null", 1, 3, 0o666)
    else:
        # a disk root: the kernel looks for /sbin/init (DEVTMPFS_MOUNT provides /dev)
        tree.add_dir("sbin")
        tree.add_symlink("sbin/init", "/init")
    return tree


def ensure_initramfs(mode: str = "delegate", *, iperf3: bool = False) -> Path:
    """An uncompressed busybox initramfs whose /init runs ``mode`` (delegate, shell, boot) unless
    the kernel command line says ``guestmode=`` otherwise. ``iperf3=True``: with Debian's
    iperf3 (a separate artefact; see :func:`busybox_tree`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    extra = [mode, _file_sha(BUSYBOX) if BUSYBOX.exists() else "", _toolchain()]
    name = f"initramfs-{mode}"
    if iperf3:
        extra += [f"{p}={_file_sha(f)}" for p, f in sorted(iperf3_closure().items())]
        name += "-iperf3"
    out = cache_dir() / f"{name}-{input_key(_INITRAMFS_INPUTS, extra)}.cpio"
    if out.exists():
        return out
    with locked(out.name):
        if not out.exists():
            log(f"writing {out.name}")
            busybox_tree(mode, iperf3=iperf3).write_cpio(out)
    return out


# --- ext4 images ----------------------------------------------------------------------------


def make_ext4(
    path: Path | str,
    size: int,
    files: Mapping[str, bytes | Path] | Tree | None = None,
    *,
    label: str = "",
) -> Path:
    """Create an ext4 image of ``size`` bytes at ``path`` holding ``files``.

    ``files`` maps paths inside the image to contents (bytes, or a host file to copy), or is a
    :class:`~e2e_tests.kit.cpio.Tree`. Uses ``mkfs.ext4 -d`` (e2fsprogs), so it needs no root
    and no loop device. Everything in the image is owned by root.
    """
    path = Path(path)
    if size < 1 << 20:
        raise ValueError("an ext4 image needs at least 1 MiB")
    mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
    with tempfile.TemporaryDirectory(prefix="kit-ext4-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        if isinstance(files, Tree):
            files.write_dir(root)
        elif files:
            for name, content in files.items():
                dest = root / name.strip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, Path):
                    shutil.copyfile(content, dest)
                else:
                    dest.write_bytes(content)
        tmp_img = Path(str(path) + ".partial")
        with open(tmp_img, "wb") as f:
            f.truncate(size)
        cmd = [mkfs, "-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d", str(root)]
        if label:
            cmd += ["-L", label]
        proc = subprocess.run([*cmd, str(tmp_img)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tmp_img.unlink(missing_ok=True)
            raise RuntimeError(f"mkfs.ext4 failed: {proc.stderr.strip()}")
        tmp_img.replace(path)
    return path


def ensure_rootfs(mode: str = "delegate", size: int = 32 << 20) -> Path:
    """A cached ext4 root filesystem with the busybox guest (``/sbin/init`` -> ``/init``), so
    ``crosvm run -r rootfs.ext4 vmlinux`` boots to the same delegate/shell as the initramfs.
    Attach it read-only (or copy it) -- tests share the cached image."""
    key = input_key(_INITRAMFS_INPUTS, [mode, str(size), "rootfs"])
    out = cache_dir() / f"rootfs-{mode}-{key}.ext4"
    if out.exists():
        return out
    with locked(out.name):
        if not out.exists():
            log(f"writing {out.name}")
            make_ext4(out, size, busybox_tree(mode, initramfs=False), label="kitroot")
    return out


# --- the stock Debian cloud kernel ----------------------------------------------------------


@dataclass(frozen=True)
class StockKernel:
    """Debian's cloud kernel: ``bzimage`` as shipped, ``vmlinux`` extracted from it, and an
    ``initramfs`` (delegate mode) that loads ``modules`` in order before the usual /init."""

    version: str
    bzimage: Path
    vmlinux: Path
    initramfs: Path
    modules: tuple[str, ...]
    config: Path

    def __iter__(self) -> Iterator[Path]:
        """Unpacks as ``bzimage, vmlinux, initramfs``."""
        return iter((self.bzimage, self.vmlinux, self.initramfs))


def _apt_stock_package() -> tuple[str, str]:
    """The concrete ``linux-image-<abi>-cloud-amd64`` package and its candidate version."""

    def depends() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["apt-cache", "depends", "--important", "linux-image-cloud-amd64"],
            capture_output=True,
            text=True,
            check=False,
        )

    proc = depends()
    if proc.returncode != 0 or "Depends:" not in proc.stdout:
        if os.geteuid() != 0:
            raise RuntimeError("apt-cache does not know linux-image-cloud-amd64: apt-get update")
        log("apt-get update (the package lists do not know linux-image-cloud-amd64)")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        proc = depends()
    names = [
        line.split(":", 1)[1].strip()
        for line in proc.stdout.splitlines()
        if line.strip().startswith("Depends:") and "linux-image-" in line
    ]
    if not names:
        raise RuntimeError(f"no linux-image dependency in: {proc.stdout!r}")
    name = names[0]
    pol = subprocess.run(
        ["apt-cache", "policy", name], capture_output=True, text=True, check=True
    ).stdout
    version = next(
        (ln.split(":", 1)[1].strip() for ln in pol.splitlines() if "Candidate:" in ln), "?"
    )
    return name, version


def ensure_stock_kernel() -> StockKernel:
    """Download (``apt-get download``, no install) and unpack Debian's cloud kernel."""
    package, version = _apt_stock_package()
    key = input_key(_STOCK_INPUTS, [package, version, " ".join(STOCK_MODULES), _file_sha(BUSYBOX)])
    out = cache_dir() / f"stock-{key}"
    if not (out / "initramfs.cpio").exists():
        with locked(out.name):
            if not (out / "initramfs.cpio").exists():
                _build_stock(out, package, version)
    release = (out / "release").read_text().strip()
    return StockKernel(
        version=release,
        bzimage=out / "bzImage",
        vmlinux=out / "vmlinux",
        initramfs=out / "initramfs.cpio",
        modules=tuple((out / "modules.txt").read_text().split()),
        config=out / "config",
    )


def _build_stock(out: Path, package: str, version: str) -> None:
    partial = Path(str(out) + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="kit-stock-") as tmp:
        os.chmod(tmp, 0o755)  # apt-get download runs as the _apt user and writes here
        log(f"apt-get download {package}={version}")
        subprocess.run(
            ["apt-get", "download", "-q", f"{package}={version}"],
            cwd=tmp,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (deb,) = Path(tmp).glob("*.deb")
        root = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        (vmlinuz,) = (root / "boot").glob("vmlinuz-*")
        release = vmlinuz.name.removeprefix("vmlinuz-")
        shutil.copyfile(vmlinuz, partial / "bzImage")
        shutil.copyfile(root / "boot" / f"config-{release}", partial / "config")
        fmt = extract_vmlinux(partial / "bzImage", partial / "vmlinux")
        log(f"extracted vmlinux ({fmt} payload) from {vmlinuz.name}")
        moddir = root / "lib" / "modules" / release
        order = module_closure(moddir, STOCK_MODULES)
        tree = busybox_tree("delegate")
        for name, path in order:
            tree.add_file(f"lib/modules/{name}.ko", path.read_bytes())
        tree.add_file(
            "etc/kit-modules", "".join(f"/lib/modules/{n}.ko\n" for n, _ in order).encode()
        )
        tree.write_cpio(partial / "initramfs.cpio")
        (partial / "modules.txt").write_text("\n".join(n for n, _ in order) + "\n")
        (partial / "release").write_text(release + "\n")
        log(f"stock initramfs loads {len(order)} modules: {' '.join(n for n, _ in order)}")
    shutil.rmtree(out, ignore_errors=True)
    partial.replace(out)
