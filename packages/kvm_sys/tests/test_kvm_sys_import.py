import kvm_sys


def test_kvm_sys_has_version() -> None:
    assert kvm_sys.__version__.count(".") == 2
