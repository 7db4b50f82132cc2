from __future__ import annotations

import enum
import errno
import os
import pickle

import pytest

from sys_util import EventFd, PollContext, PollEvents
from sys_util.errors import PollError


class Token(enum.Enum):
    EXIT = enum.auto()
    KICK = enum.auto()


def test_tokens_are_reported() -> None:
    with EventFd() as exit_evt, EventFd() as kick, PollContext[Token]() as ctx:
        ctx.add(exit_evt, Token.EXIT)
        ctx.add(kick.fileno(), Token.KICK)
        assert ctx.wait(0) == []
        kick.write()
        assert ctx.wait(1) == [(Token.KICK, PollEvents.READABLE)]
        exit_evt.write()
        assert {t for t, _ in ctx.wait(1)} == {Token.EXIT, Token.KICK}


def test_build_with_modify_delete() -> None:
    with EventFd() as a, EventFd() as b, PollContext.build_with([(a, 0), (b, 1)]) as ctx:
        assert len(ctx) == 2
        b.write()
        assert ctx.wait(1) == [(1, PollEvents.READABLE)]
        ctx.modify(b, 7)
        assert ctx.wait(1) == [(7, PollEvents.READABLE)]
        ctx.modify(b, 8, PollEvents.WRITABLE)
        assert ctx.wait(1)[0][0] == 8
        ctx.delete(b)
        assert ctx.wait(0) == []
        with pytest.raises(PollError) as info:
            ctx.delete(b)
        assert info.value.errno == errno.ENOENT
        with pytest.raises(PollError):
            ctx.modify(b, 1)
        with pytest.raises(PollError) as info2:
            ctx.add(a, 3)
        assert info2.value.errno == errno.EEXIST
        assert pickle.loads(pickle.dumps(info2.value)).fd == a.fileno()


def test_hangup_of_a_pipe() -> None:
    r, w = os.pipe()
    with PollContext[str]() as ctx:
        ctx.add(r, "pipe")
        os.close(w)
        [(tok, ev)] = ctx.wait(1)
        assert tok == "pipe"
        assert ev & PollEvents.HANGUP
        ctx.delete(r)
    os.close(r)


def test_close_idempotent_then_ebadf() -> None:
    ctx: PollContext[int] = PollContext()
    ctx.close()
    ctx.close()
    assert ctx.closed
    with EventFd() as e:
        for call in (
            ctx.fileno,
            lambda: ctx.wait(0),
            lambda: ctx.add(e, 1),
            lambda: ctx.modify(e, 1),
            lambda: ctx.delete(e),
        ):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == errno.EBADF


def test_adding_a_closed_fd_gives_ebadf() -> None:
    with PollContext[int]() as ctx:
        fd = os.eventfd(0)
        os.close(fd)
        with pytest.raises(OSError) as info:
            ctx.add(fd, 1)
        assert info.value.errno == errno.EBADF
        assert len(ctx) == 0


def test_delete_after_the_fd_was_closed_forgets_it() -> None:
    with PollContext[int]() as ctx:
        e = EventFd()
        fd = e.fileno()
        ctx.add(e, 1)
        e.write()
        e.close()  # the kernel drops it from the epoll set by itself
        ctx.delete(fd)  # EBADF from epoll_ctl: the token is forgotten, no error
        assert len(ctx) == 0
        assert ctx.wait(0) == []
