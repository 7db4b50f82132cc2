import qcow


def test_qcow_has_version() -> None:
    assert qcow.__version__.count(".") == 2
