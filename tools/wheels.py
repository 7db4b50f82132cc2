"""Build the packages' wheels and prove that each one installs and imports alone.

    python tools/wheels.py build DIST_DIR             build wheel + sdist of every package
    python tools/wheels.py check DIST_DIR [PKG ...]   per package: fresh venv, install only that
                                                      wheel and its declared dependencies, import it
    python tools/wheels.py install DIST_DIR PKG       build PKG and its sibling deps, install them
                                                      into the running interpreter (used by tox)

Sibling packages are only ever taken from DIST_DIR (``--no-index``), so a same-named project on a
package index can never stand in for ours; third-party dependencies are first downloaded as wheels
into DIST_DIR/thirdparty.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["sys_util", "kvm_sys", "kvm", "msg_socket", "io_jail", "qcow", "devices", "arch", "crosvm"]


def project(pkg: str) -> dict:  # type: ignore[type-arg]
    return tomllib.loads((ROOT / "packages" / pkg / "pyproject.toml").read_text())["project"]


DIST_TO_PKG = {project(p)["name"]: p for p in ORDER}


def requirement_name(req: str) -> str:
    match = re.match(r"[A-Za-z0-9_.-]+", req)
    assert match is not None
    return match.group(0)


def sibling_closure(pkg: str) -> list[str]:
    """PKG and every sibling it depends on, transitively, in build order."""
    seen: set[str] = set()
    stack = [pkg]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        for req in project(current).get("dependencies", []):
            name = requirement_name(req)
            if name in DIST_TO_PKG:
                stack.append(DIST_TO_PKG[name])
    return [p for p in ORDER if p in seen]


def third_party(pkgs: list[str]) -> list[str]:
    reqs = {
        req
        for p in pkgs
        for req in project(p).get("dependencies", [])
        if requirement_name(req) not in DIST_TO_PKG
    }
    return sorted(reqs)


def run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def build(dist: Path, pkgs: list[str], sdist: bool = True) -> None:
    dist.mkdir(parents=True, exist_ok=True)
    for pkg in pkgs:
        kinds = ["--wheel", "--sdist"] if sdist else ["--wheel"]
        run(
            sys.executable,
            "-m",
            "build",
            "--no-isolation",
            *kinds,
            "--outdir",
            str(dist),
            str(ROOT / "packages" / pkg),
        )
    deps = third_party(pkgs)
    if deps:
        run(
            sys.executable,
            "-m",
            "pip",
            "download",
            "--only-binary=:all:",
            "-q",
            "-d",
            str(dist / "thirdparty"),
            *deps,
        )


def install_args(dist: Path, pkg: str) -> list[str]:
    return [
        "install",
        "-q",
        "--no-index",
        "--find-links",
        str(dist),
        "--find-links",
        str(dist / "thirdparty"),
        project(pkg)["name"],
    ]


def check(dist: Path, pkgs: list[str]) -> None:
    failures = []
    for pkg in pkgs:
        with tempfile.TemporaryDirectory(prefix=f"wheelcheck-{pkg}-") as tmp:
            venv.create(tmp, with_pip=True)
            py = str(Path(tmp) / "bin" / "python")
            try:
                run(py, "-m", "pip", *install_args(dist, pkg))
                listed = subprocess.run(
                    [py, "-m", "pip", "list", "--format=freeze"],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                installed = {line.split("==")[0] for line in listed.split()}
                extra = (installed & set(DIST_TO_PKG)) - {
                    project(p)["name"] for p in sibling_closure(pkg)
                }
                if extra:
                    raise RuntimeError(f"{pkg} pulled in undeclared siblings {sorted(extra)}")
                run(
                    py,
                    "-I",
                    "-c",
                    f"import {pkg}; print('{pkg}', {pkg}.__version__, 'imports alone')",
                )
            except (subprocess.CalledProcessError, RuntimeError) as err:
                print(f"FAILED {pkg}: {err}", flush=True)
                failures.append(pkg)
    print(
        f"wheel check: {len(pkgs) - len(failures)} of {len(pkgs)} packages install and import alone"
    )
    if failures:
        sys.exit(f"wheel check failed for: {', '.join(failures)}")


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    command, dist = sys.argv[1], Path(sys.argv[2]).resolve()
    pkgs = sys.argv[3:] or ORDER
    if command == "build":
        build(dist, pkgs)
    elif command == "check":
        check(dist, pkgs)
    elif command == "install":
        (pkg,) = pkgs
        closure = sibling_closure(pkg)
        build(dist, closure, sdist=False)
        run(sys.executable, "-m", "pip", *install_args(dist, pkg))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
