import pickle

import pytest

import kvm_sys
from kvm_sys import ffi, lib


def test_kvm_sys_has_version() -> None:
    assert kvm_sys.__version__.count(".") == 2


def test_compiled_module_carries_the_package_version() -> None:
    assert ffi.string(lib.PACKAGE_VERSION).decode() == kvm_sys.__version__


def test_constants_are_reexported_as_ints() -> None:
    assert kvm_sys.KVM_RUN == lib.KVM_RUN
    assert type(kvm_sys.KVM_CAP_IRQFD) is int
    assert "KVM_RUN" in kvm_sys.__all__


def test_version_mismatch_error() -> None:
    err = kvm_sys.VersionMismatch("0.0.1", "0.1.0")
    assert "0.0.1" in str(err) and "rebuild" in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert (back.built, back.expected) == ("0.0.1", "0.1.0")
    assert isinstance(err, kvm_sys.Error)


def test_stale_module_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvm_sys, "__version__", "9.9.9")
    with pytest.raises(ImportError, match="rebuild"):
        kvm_sys._check_version()


@pytest.mark.kvm
def test_readme_example_runs() -> None:
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parent.parent / "README.md"
    block = re.search(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert block is not None
    exec(compile(block.group(1), str(readme), "exec"), {})
