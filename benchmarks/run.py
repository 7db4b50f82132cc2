"""Run the benchmarks (``nox -s bench``): each compares us with a peer in the same run.

    python benchmarks/run.py            run every benchmarks/*.py (except this file)
    python benchmarks/run.py NAME ...   run the named ones (file stems, e.g. kvm_exits qcow_bench)

Each benchmark is its own script that prints its figures and ratios; this runner only sequences
them (never in parallel: they would measure each other) and reports which failed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    scripts = sorted(p for p in HERE.glob("*.py") if p.name != "run.py")
    if argv:
        wanted = set(argv)
        unknown = wanted - {p.stem for p in scripts}
        if unknown:
            print(f"unknown benchmark(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        scripts = [p for p in scripts if p.stem in wanted]
    failed = []
    for script in scripts:
        print(f"\n=== {script.stem} ===", flush=True)
        start = time.monotonic()
        result = subprocess.run([sys.executable, str(script)], check=False)
        print(f"--- {script.stem}: exit {result.returncode} in {time.monotonic() - start:.1f} s")
        if result.returncode != 0:
            failed.append(script.stem)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
