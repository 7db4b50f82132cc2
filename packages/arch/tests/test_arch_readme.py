"""The README's examples run as written."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) == 2


def test_loader_example(capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(BLOCKS[0], str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "elf kernel, entry 0x100000" in out
    assert "e820 0x000000000000-0x00000009fc00 RAM" in out
    assert "0x000000100000-0x000010000000 RAM" in out


@pytest.mark.kvm
def test_build_vm_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert os.access("/dev/kvm", os.W_OK)
    exec(compile(BLOCKS[1], str(README), "exec"), {})
    assert "guest reset after 1 reset request" in capsys.readouterr().out
