"""The project's front door for development tasks. A bare ``nox`` runs what CI runs.

Every session installs the nine packages editable, in dependency order, into a venv nox makes.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "build", "e2e"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).resolve().parent
PACKAGES = [
    "sys_util",
    "kvm_sys",
    "kvm",
    "msg_socket",
    "io_jail",
    "qcow",
    "devices",
    "arch",
    "crosvm",
]
TOOLS = ["pip>=24", "hatchling>=1.21", "editables>=0.5", "cffi>=1.17", "build>=1.2"]
TEST_DEPS = ["pytest>=8", "pytest-xdist>=3", "pytest-timeout>=2", "hypothesis>=6"]


def install_workspace(session: nox.Session, *extra: str) -> None:
    session.install(*TOOLS, *TEST_DEPS, *extra)
    editables = [arg for pkg in PACKAGES for arg in ("-e", f"packages/{pkg}")]
    session.install("--no-build-isolation", *editables)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    install_workspace(session, "mypy>=1.11")
    session.run("mypy", *[f"packages/{pkg}/src/{pkg}" for pkg in PACKAGES])


@nox.session
def tests(session: nox.Session) -> None:
    """Every package's unit tests, in parallel."""
    install_workspace(session)
    paths = session.posargs or [f"packages/{pkg}/tests" for pkg in PACKAGES]
    session.run("pytest", "-n", "auto", "--dist=worksteal", *paths)


@nox.session
def e2e(session: nox.Session) -> None:
    """Whole-VM tests: boot real guests under crosvm (and QEMU, the peer)."""
    install_workspace(session)
    session.run("pytest", "-n", "auto", "--dist=loadgroup", *(session.posargs or ["e2e_tests"]))


@nox.session
def build(session: nox.Session) -> None:
    """Build every wheel and sdist, then install and import each package alone in a fresh venv."""
    session.install(*TOOLS)
    dist = ROOT / "dist"
    session.run("python", "tools/wheels.py", "build", str(dist))
    session.run("python", "tools/wheels.py", "check", str(dist))


@nox.session
def demo(session: nox.Session) -> None:
    """Boot the default guest and show its console."""
    install_workspace(session)
    session.run("python", "e2e_tests/kit/demo.py", *session.posargs, external=False)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against the peers (QEMU, qemu-io, a C floor), printed as ratios."""
    install_workspace(session)
    session.run(
        "python", "benchmarks/run.py", *session.posargs, env={"PYTHONUNBUFFERED": "1", **os.environ}
    )
