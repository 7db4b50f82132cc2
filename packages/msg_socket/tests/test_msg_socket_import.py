import msg_socket


def test_msg_socket_has_version() -> None:
    assert msg_socket.__version__.count(".") == 2
