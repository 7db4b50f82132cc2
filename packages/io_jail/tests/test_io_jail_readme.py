"""The README's usage example runs and prints what it says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.root
def test_readme_example() -> None:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"## Usage\n\n```python\n(.*?)```", text, re.S)
    assert code is not None
    result = subprocess.run(
        [sys.executable, "-c", code.group(1)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "pid 1, root []",
        "killed by SIGSYS (seccomp refused syscall getppid)",
    ]
