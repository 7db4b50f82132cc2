import kvm


def test_kvm_has_version() -> None:
    assert kvm.__version__.count(".") == 2
