import pickle

import pytest

from arch.cmdline import DEFAULT_CMDLINE_LIMIT, Cmdline
from arch.errors import CmdlineError, CmdlineTooLong


def test_builds_space_separated_parameters() -> None:
    c = Cmdline()
    c.insert("console", "ttyS0")
    c.insert("quiet")
    c.insert("panic", -1)
    c.insert_str("  root=/dev/vda rw ")
    assert str(c) == "console=ttyS0 quiet panic=-1 root=/dev/vda rw"
    assert len(c) == len(str(c))
    assert c.to_bytes() == b"console=ttyS0 quiet panic=-1 root=/dev/vda rw\0"
    assert c.limit == DEFAULT_CMDLINE_LIMIT == 2047


def test_empty_cmdline_is_just_nul() -> None:
    c = Cmdline()
    c.insert_str("   ")
    assert len(c) == 0
    assert c.to_bytes() == b"\0"


def test_value_with_space_is_quoted() -> None:
    c = Cmdline()
    c.insert("init.args", "a b")
    assert str(c) == 'init.args="a b"'


@pytest.mark.parametrize(
    ("key", "value"),
    [("", None), ("a b", None), ("a=b", "c"), ('a"', None), ("k", 'x"y'), ("k\0", None)],
)
def test_bad_keys_and_values_rejected(key: str, value: str | None) -> None:
    with pytest.raises(CmdlineError) as info:
        Cmdline().insert(key, value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["a\0b", "tab\there", "caf\u00e9", "new\nline", "\x7f"])
def test_non_printable_text_rejected(text: str) -> None:
    c = Cmdline()
    with pytest.raises(CmdlineError, match="position"):
        c.insert_str(text)
    assert len(c) == 0


def test_limit_is_exact_and_failed_insert_changes_nothing() -> None:
    c = Cmdline(limit=10)
    c.insert("abcd")  # 4
    c.insert("efghi")  # 4 + 1 + 5 = 10: exactly the limit
    assert len(c) == 10
    with pytest.raises(CmdlineTooLong) as info:
        c.insert("x")
    assert (info.value.length, info.value.limit) == (12, 10)
    assert str(c) == "abcd efghi"


def test_with_limit_rechecks() -> None:
    c = Cmdline()
    c.insert_str("x" * 300)
    assert str(c.with_limit(300)) == "x" * 300
    with pytest.raises(CmdlineTooLong):
        c.with_limit(255)


def test_errors_pickle() -> None:
    err = CmdlineTooLong(3000, 2047)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.length, copy.limit, str(copy)) == (3000, 2047, str(err))
    assert isinstance(copy, CmdlineError)
