from __future__ import annotations

import errno
import pickle

import pytest

from sys_util import errors


@pytest.mark.parametrize(
    "err",
    [
        errors.Error(),
        errors.Error(errno.ENOSPC, "disk full"),
        errors.InvalidArgument("bad size"),
        errors.GuestMemoryError(0xFFFF_FFFF_F000, 0x2000),
        errors.GuestMemoryError(1, 2, "a negative length"),
        errors.MessageTruncated("fds"),
        errors.PollError(errno.ENOENT, 7, "fd 7 is not in the poll context"),
        errors.SysfsError("/sys/x", "bad"),
    ],
)
def test_errors_pickle_with_fields(err: errors.Error) -> None:
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is type(err)
    assert str(clone) == str(err)
    assert clone.errno == err.errno
    assert vars(clone) == vars(err)
    assert isinstance(clone, OSError)
    assert isinstance(clone, errors.Error)


def test_guest_memory_error_fields_and_message() -> None:
    err = errors.GuestMemoryError(0xDEAD_B000, 16)
    assert (err.address, err.length) == (0xDEAD_B000, 16)
    assert err.errno == errno.EFAULT
    assert "0xdeadb000" in str(err)


def test_default_message_is_strerror() -> None:
    assert errors.Error(errno.EBUSY).strerror == "Device or resource busy"
