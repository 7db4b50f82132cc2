import devices


def test_devices_has_version() -> None:
    assert devices.__version__.count(".") == 2
