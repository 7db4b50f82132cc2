import io_jail


def test_io_jail_has_version() -> None:
    assert io_jail.__version__.count(".") == 2
