"""The README's example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


def test_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    match = re.search(r"## Example\n\n```python\n(.*?)```", readme, re.S)
    assert match is not None
    code = compile(match.group(1), "README.md", "exec", dont_inherit=True)
    exec(code, {"__name__": "readme_example"})
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "DiskCommand(disk_index=0, command=Resize(new_size=1073741824))",
        "3",
        "peer hung up",
    ]
