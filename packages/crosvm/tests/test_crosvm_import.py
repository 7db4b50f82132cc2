import crosvm


def test_crosvm_has_version() -> None:
    assert crosvm.__version__.count(".") == 2
