"""One-off generator for the package skeletons (kept for reference; safe to re-run: never overwrites)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKGS = {
    # name: (distribution, summary, deps, has_cffi)
    "sys_util": ("crosvm-sys-util", "Safe Linux system utilities for a VMM: eventfd, epoll, mmap, memfd, guest memory, signals.", [], True),
    "kvm_sys": ("crosvm-kvm-sys", "Raw KVM constants, struct layouts and ioctl numbers, compiled from <linux/kvm.h> with cffi.", [], True),
    "kvm": ("crosvm-kvm", "A safe, fast Python binding of the Linux KVM API: Kvm, Vm, Vcpu.", ["crosvm-kvm-sys>=0.1,<0.2", "crosvm-sys-util>=0.1,<0.2"], False),
    "msg_socket": ("crosvm-msg-socket", "Fixed-layout typed messages with file descriptors over SOCK_SEQPACKET.", ["crosvm-sys-util>=0.1,<0.2"], False),
    "io_jail": ("crosvm-io-jail", "A Minijail for Python: namespaces, pivot_root, capabilities and seccomp policies.", ["crosvm-sys-util>=0.1,<0.2"], False),
    "qcow": ("crosvm-qcow", "A crash-safe qcow2 disk image library, interoperable with qemu-img.", ["crosvm-sys-util>=0.1,<0.2"], False),
    "devices": ("crosvm-devices", "Virtual devices for crosvm: bus, serial, i8042, CMOS, PCI, virtio.", ["crosvm-sys-util>=0.1,<0.2", "crosvm-msg-socket>=0.1,<0.2", "crosvm-io-jail>=0.1,<0.2", "crosvm-qcow>=0.1,<0.2"], False),
    "arch": ("crosvm-arch", "VM construction for x86_64: kernel loading, memory layout, boot state.", ["crosvm-sys-util>=0.1,<0.2", "crosvm-kvm>=0.1,<0.2", "crosvm-devices>=0.1,<0.2"], False),
    "crosvm": ("pycrosvm", "crosvm in Python: a virtual machine monitor over KVM with sandboxed virtio devices.", ["crosvm-sys-util>=0.1,<0.2", "crosvm-kvm>=0.1,<0.2", "crosvm-msg-socket>=0.1,<0.2", "crosvm-io-jail>=0.1,<0.2", "crosvm-qcow>=0.1,<0.2", "crosvm-devices>=0.1,<0.2", "crosvm-arch>=0.1,<0.2"], False),
}

PYPROJECT = '''[build-system]
requires = [{requires}]
build-backend = "hatchling.build"

[project]
name = "{dist}"
dynamic = ["version"]
description = "{summary}"
readme = "README.md"
requires-python = ">=3.11"
license = "BSD-3-Clause"
classifiers = [
    "Operating System :: POSIX :: Linux",
    "Programming Language :: Python :: 3",
    "Typing :: Typed",
]
dependencies = [{deps}]
{scripts}
[project.optional-dependencies]
test = ["pytest>=8", "pytest-xdist>=3"]

[tool.hatch.version]
path = "src/{name}/__about__.py"

[tool.hatch.build.targets.wheel]
packages = ["src/{name}"]
{hook}
[tool.hatch.build.targets.sdist]
include = ["/src", "/tests", "/README.md", "/CHANGELOG.md"{sdist_extra}]
'''

HOOK = '''
[tool.hatch.build.targets.wheel.hooks.custom]
path = "hatch_build.py"
dependencies = ["cffi>=1.17"]
'''


def q(items: list[str]) -> str:
    return ", ".join(f'"{i}"' for i in items)


def write(path: Path, text: str) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


for name, (dist, summary, deps, cffi) in PKGS.items():
    base = ROOT / "packages" / name
    requires = ["hatchling>=1.21"] + (["cffi>=1.17"] if cffi else [])
    scripts = ""
    if name == "crosvm":
        scripts = '\n[project.scripts]\ncrosvm = "crosvm.cli:main"\n'
    if name == "qcow":
        scripts = '\n[project.scripts]\nqcow = "qcow.__main__:main"\n'
    write(base / "pyproject.toml", PYPROJECT.format(
        requires=q(requires), dist=dist, summary=summary, deps=q(deps), name=name,
        scripts=scripts, hook=HOOK if cffi else "",
        sdist_extra=', "/ffi", "/hatch_build.py"' if cffi else ""))
    write(base / "src" / name / "__about__.py", '__version__ = "0.1.0"\n')
    write(base / "src" / name / "py.typed", "")
    write(base / "src" / name / "errors.py",
          f'"""Errors raised by {name}. Every error of this package derives from :class:`Error`."""\n\n\n'
          f'class Error(Exception):\n    """Base class of every {name} error."""\n')
    write(base / "src" / name / "__init__.py",
          f'"""{summary}"""\n\nfrom {name}.__about__ import __version__\nfrom {name}.errors import Error\n\n__all__ = ["Error", "__version__"]\n')
    write(base / "CHANGELOG.md", f"# Changelog of {dist}\n\n## 0.1.0 (unreleased)\n\n- First version.\n")
    write(base / "tests" / f"test_{name}_import.py",
          f'import {name}\n\n\ndef test_{name}_has_version() -> None:\n    assert {name}.__version__.count(".") == 2\n')
