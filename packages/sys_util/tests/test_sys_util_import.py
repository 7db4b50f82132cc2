import sys_util


def test_sys_util_has_version() -> None:
    assert sys_util.__version__.count(".") == 2
