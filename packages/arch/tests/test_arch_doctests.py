"""The examples in arch's docstrings run as written."""

import doctest

import pytest

import arch.allocator
import arch.cmdline


@pytest.mark.parametrize("module", [arch.allocator, arch.cmdline])
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module, verbose=False)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0
