"""Property tests: whatever the guest writes into the rings, the device side never crashes,
never hands out a buffer outside guest RAM, and keeps serving valid requests afterwards."""

from __future__ import annotations

import logging
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.testing import VirtQueueDriver, make_guest_memory
from devices.virtio import RING_FEATURES

MEM = 1 << 20
QSIZE = 16
_DESC = struct.Struct("<QIHH")

addresses = st.one_of(
    st.integers(0, MEM),  # inside RAM (mostly)
    st.integers(MEM - 64, MEM + 64),  # straddling the end
    st.integers(0, 2**64 - 1),  # anywhere
)
descriptor = st.tuples(
    addresses,
    st.one_of(st.integers(0, 4096), st.integers(0, 2**32 - 1)),
    st.integers(0, 7),  # NEXT | WRITE | INDIRECT in any combination
    st.integers(0, QSIZE + 2),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=st.lists(descriptor, min_size=QSIZE, max_size=QSIZE),
    heads=st.lists(st.integers(0, QSIZE + 4), min_size=1, max_size=8),
    indirect_table=st.lists(descriptor, min_size=1, max_size=8),
)
def test_random_rings_never_crash(
    table: list[tuple[int, int, int, int]],
    heads: list[int],
    indirect_table: list[tuple[int, int, int, int]],
) -> None:
    with make_guest_memory(MEM) as mem:
        drv = VirtQueueDriver(mem, 0x1000, QSIZE, data_base=0x8000, data_size=0x10000)
        q = drv.make_queue(features=RING_FEATURES)
        itable = 0x20000
        for i, d in enumerate(indirect_table):
            mem.write_struct(itable + 16 * i, _DESC, *d)
        for i, (addr, length, flags, nxt) in enumerate(table):
            if i == 0 and flags & 4:  # let descriptor 0 point at a real indirect table
                addr, length = itable, 16 * len(indirect_table)
            drv.write_descriptor(i, addr, length, flags, nxt)
        for h in heads:
            drv.publish(h)
        seen = 0
        while (chain := q.pop()) is not None:
            seen += 1
            for addr, length in chain.readable + chain.writable:
                assert mem.checked_range(addr, length)
            # Reading/writing the whole chain stays inside RAM.
            r, w = chain.reader(), chain.writer()
            r.read_exact(min(r.available_bytes(), 1 << 16))
            n = min(w.available_bytes(), 1 << 16)
            w.write(bytes(n))
            q.add_used(chain.head, n)
        assert seen + q.invalid_chains <= len(heads)
        if q.broken:  # the avail index ran over (heads, or a chain that overwrote the ring)
            assert q.pending() == 0 and q.pop() is None  # stopped until the device is reset
            drv.set_avail_idx(0)
            q = drv.make_queue(features=RING_FEATURES)
        # The queue still works: a valid chain placed in fresh descriptors is served.
        drv._free = list(range(QSIZE))
        good = drv.add_request([b"ok"], [2])
        chain = q.pop()
        assert chain is not None and chain.head == good.head


def test_hostile_flood_is_logged_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    with make_guest_memory(MEM) as mem:
        drv = VirtQueueDriver(mem, 0x1000, QSIZE, data_base=0x8000, data_size=0x10000)
        q = drv.make_queue(features=RING_FEATURES)
        drv.write_descriptor(0, MEM * 4, 16, 0, 0)  # outside RAM
        with caplog.at_level(logging.WARNING):
            for _ in range(200):
                drv.publish(0)
                assert q.pop() is None
        assert q.invalid_chains == 200
        assert len([r for r in caplog.records if "outside guest RAM" in r.getMessage()]) == 1
        assert len(drv.pop_used()) == 200
