"""A jailed process killed from outside is reported as killed by that signal."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from io_jail import Minijail

pytestmark = pytest.mark.root


@pytest.mark.parametrize("run_as_init", [False, True])
def test_sigkill_of_the_jailed_process_is_reported_as_sigkill(run_as_init: bool) -> None:
    jail = Minijail()
    jail.namespace_user()
    jail.namespace_pids()
    jail.no_new_privs()
    jail.use_caps(0)
    if run_as_init:
        jail.run_as_init()
    pid = jail.fork([])
    if pid == 0:  # the jailed process
        time.sleep(60)
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        children: list[str] = []
        while not children and time.monotonic() < deadline:
            children = subprocess.run(
                ["pgrep", "-P", str(pid)], capture_output=True, text=True
            ).stdout.split()
        assert children, "the intermediate has no jailed child"
        os.kill(int(children[0]), signal.SIGKILL)  # SIGKILL's disposition cannot be changed
        result = jail.wait(pid, 10)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert "killed by SIGKILL" in str(result), result
