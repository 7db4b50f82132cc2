import itertools
import random
import threading

import pytest

from arch.allocator import AddressAllocator
from arch.errors import AddressExhausted, AllocatorError


def test_first_fit_with_alignment() -> None:
    a = AddressAllocator(0x1000, 0x10000)
    assert a.allocate(0x10, 0x1000, "a") == 0x1000
    assert a.allocate(0x10, 0x100, "b") == 0x1100
    assert a.allocate(0x2000, 0x2000, "c") == 0x2000
    assert a.allocate(0x100, 1, "d") == 0x1110
    assert [x.tag for x in a.allocations()] == ["a", "b", "d", "c"]


def test_release_makes_room_again() -> None:
    a = AddressAllocator(0, 0x3000)
    first = a.allocate(0x1000, 0x1000, "x")
    a.allocate(0x2000, 0x1000, "y")
    with pytest.raises(AddressExhausted) as info:
        a.allocate(0x1000, 0x1000, "z")
    assert info.value.tag == "z"
    released = a.release(first)
    assert (released.address, released.size, released.tag) == (0, 0x1000, "x")
    assert a.allocate(0x1000, 0x1000, "z") == 0
    with pytest.raises(AllocatorError):
        a.release(0x123)


def test_exhaustion_at_window_end() -> None:
    a = AddressAllocator(0xC000, 0x4000)
    assert a.allocate(0x4000, 0x4000, "all") == 0xC000
    with pytest.raises(AddressExhausted):
        a.allocate(1, 1, "more")


@pytest.mark.parametrize(("size", "align"), [(0, 1), (-1, 1), (1, 0), (1, 3), (1, -4)])
def test_invalid_requests(size: int, align: int) -> None:
    with pytest.raises(AllocatorError):
        AddressAllocator(0, 0x1000).allocate(size, align, "bad")


def test_allocate_at_checks_overlap_and_window() -> None:
    a = AddressAllocator(0x1000, 0x1000)
    assert a.allocate_at(0x1100, 0x100, "fixed") == 0x1100
    for addr, size in [(0x10FF, 2), (0x11FF, 1), (0x1000, 0x1000), (0xFFF, 1), (0x1FFF, 2)]:
        with pytest.raises(AllocatorError):
            a.allocate_at(addr, size, "clash")
    assert a.allocate_at(0x1000, 0x100, "below") == 0x1000
    assert a.allocate_at(0x1200, 0x100, "above") == 0x1200
    assert a.allocate(0x100, 1, "next") == 0x1300
    found = a.find(0x1150)
    assert found is not None and found.tag == "fixed"
    assert a.find(0x1F00) is None


def test_random_operations_never_overlap() -> None:
    rng = random.Random(1234)
    a = AddressAllocator(0xE000_0000, 0x1000_0000)
    live: list[int] = []
    for _ in range(2000):
        if live and rng.random() < 0.4:
            a.release(live.pop(rng.randrange(len(live))))
            continue
        size = rng.choice([0x10, 0x100, 0x1000, 0x4000, 0x10_0000])
        align = rng.choice([1, 0x10, 0x1000, 0x10_0000])
        try:
            addr = a.allocate(size, align, "r")
        except AddressExhausted:
            continue
        assert addr % align == 0
        live.append(addr)
    allocs = a.allocations()
    for left, right in itertools.pairwise(allocs):
        assert left.end <= right.address
    assert all(x.address >= 0xE000_0000 and x.end <= 0xF000_0000 for x in allocs)


def test_thread_safe_allocation() -> None:
    a = AddressAllocator(0, 0x100_0000)
    results: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(200):
            addr = a.allocate(0x100, 0x100, "t")
            with lock:
                results.append(addr)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 800
