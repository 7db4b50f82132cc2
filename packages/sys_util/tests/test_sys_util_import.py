import sys_util


def test_sys_util_has_version() -> None:
    assert sys_util.__version__.count(".") == 2


def test_native_version_stamp_matches() -> None:
    from sys_util._binding import check_version, ffi, lib

    assert ffi.string(lib.PACKAGE_VERSION).decode() == sys_util.__version__
    check_version("1.2.3", "1.2.3")


def test_version_mismatch_is_an_import_error() -> None:
    import pytest

    from sys_util._binding import check_version

    with pytest.raises(ImportError, match="rebuild"):
        check_version("0.0.1", "0.1.0")


def test_public_api_is_exported() -> None:
    for name in sys_util.__all__:
        assert hasattr(sys_util, name), name
