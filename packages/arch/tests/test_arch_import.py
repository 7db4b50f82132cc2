import arch


def test_arch_has_version() -> None:
    assert arch.__version__.count(".") == 2
