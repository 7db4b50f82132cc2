"""The README's usage example is real code: run it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    match = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert match is not None
    exec(compile(match.group(1), str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "refused: [Errno 14] guest memory access at 0x1ffffc" in out
    assert "ready: queue" in out
