"""Run-state bookkeeping of the run loop, without KVM."""

from __future__ import annotations

import threading
import time

from crosvm.runloop import MainLoop, RunState, StopReason, join_vcpu_threads
from sys_util import EventFd


def test_first_stop_reason_wins() -> None:
    state = RunState([])
    state.stop(StopReason.TRIPLE_FAULT, "vCPU 0")
    state.stop(StopReason.REQUESTED)
    assert state.outcome is not None and state.outcome.reason is StopReason.TRIPLE_FAULT
    assert state.exiting and not state.outcome.reason.ok
    state.stopped_evt.close()


def test_join_gives_up_on_a_stuck_thread() -> None:
    release = threading.Event()
    stuck = threading.Thread(target=release.wait, name="vcpu7", daemon=True)
    stuck.start()
    state = RunState([])
    start = time.monotonic()
    assert join_vcpu_threads([stuck], state, timeout=0.3) == ["vcpu7"]
    assert time.monotonic() - start < 5
    release.set()
    stuck.join()
    state.stopped_evt.close()


def test_main_loop_ends_on_an_exit_event() -> None:
    state = RunState([])
    with EventFd() as reset:
        reset.write(1)
        outcome = MainLoop(state, [reset]).run()
    assert outcome.reason is StopReason.RESET and outcome.reason.ok
    state.stopped_evt.close()


def test_main_loop_serves_extra_sources_then_stops() -> None:
    state = RunState([])
    calls: list[int] = []
    with EventFd() as source:
        source.write(1)

        def on_source() -> None:
            source.read()
            calls.append(1)
            state.stop(StopReason.REQUESTED, "control")

        outcome = MainLoop(state, [], [(source.fileno(), on_source)]).run()
    assert calls == [1] and outcome.reason is StopReason.REQUESTED
    state.stopped_evt.close()
