"""Crash safety: SIGKILL a writer mid-stream, then check the image with qemu-img.

The child replays a deterministic stream of 4 KiB slot writes and whole-cluster discards and
prints how many operations were done at each completed ``flush()``. After the kill, every slot
must hold either what the last flushed operation left there or what a later operation wrote:
never another slot's data, never data of a discarded generation from before the flush.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SLOT = 4096
DISCARD = 65536
SIZE = 16 << 20
NSLOTS = SIZE // SLOT


def _ops(seed: int) -> Iterator[tuple[str, int, bytes]]:
    """("w", slot, content) or ("d", first slot of a 64 KiB range, b"")."""
    rng = random.Random(seed)
    i = 0
    while True:
        i += 1
        if rng.random() < 0.08:
            yield "d", rng.randrange(SIZE // DISCARD) * (DISCARD // SLOT), b""
        else:
            slot = rng.randrange(NSLOTS)
            stamp = slot.to_bytes(4, "little") + i.to_bytes(8, "little") + b"GEN!"
            yield "w", slot, stamp * (SLOT // len(stamp))


def _child(path: str, seed: int, mode: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from qcow import QcowFile

    if mode == "small-cache":
        # 4 KiB clusters, 8 L2 tables and a 4-table cache: dirty tables are evicted (and the
        # whole write-back sequence runs) all the time, in the middle of requests.
        img = QcowFile.create(path, SIZE, cluster_size=4096, cache_bytes=16384)
    else:
        img = QcowFile.create(path, SIZE, cluster_size=65536, lazy_refcounts=mode == "lazy")
    for done, (kind, where, content) in enumerate(_ops(seed), start=1):
        if kind == "w":
            img.write_at(content, where * SLOT)
        else:
            img.discard(where * SLOT, DISCARD)
        if done % 500 == 0:
            img.flush()
            print(done, flush=True)


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eager", "lazy", "small-cache"])
def test_sigkill_during_writes(tmp_path: Path, mode: str) -> None:
    from qcow import QcowFile

    lazy = mode == "lazy"
    path = tmp_path / "crash.qcow2"
    seed = 4242 + len(mode)
    proc = subprocess.Popen(
        [sys.executable, __file__, str(path), str(seed), mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    flushed = 0
    try:
        last = time.monotonic()
        cycle = 0.0
        while flushed < 2000:
            line = proc.stdout.readline()
            assert line, "writer died early"
            flushed = int(line)
            now = time.monotonic()
            cycle, last = now - last, now
        # land anywhere between two flushes (that is where the ordering matters)
        time.sleep(random.uniform(0.05, 0.95) * cycle)
    finally:
        proc.send_signal(signal.SIGKILL)
        rest = proc.stdout.read()
        proc.wait()
        proc.stdout.close()
    for line in rest.split():
        flushed = int(line)

    check = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    if not lazy:
        # no corruption, at worst leaks (exit 3)
        assert check.returncode in (0, 3), check.stdout + check.stderr
    else:
        # the dirty bit is set: opening it writable rebuilds the refcounts (our repair)
        ours = tmp_path / "ours-repaired.qcow2"
        shutil.copyfile(path, ours)
        with QcowFile.open(ours, writable=True) as img:
            assert not img.header.incompatible_features & 1
        ours_check = subprocess.run(
            ["qemu-img", "check", str(ours)], capture_output=True, text=True
        )
        assert ours_check.returncode == 0, ours_check.stdout + ours_check.stderr
    repair = subprocess.run(
        ["qemu-img", "check", "-r", "all", str(path)], capture_output=True, text=True
    )
    assert repair.returncode == 0, repair.stdout + repair.stderr
    again = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert again.returncode == 0, again.stdout

    # What may each slot hold? The flushed state, or anything written after the flush.
    before: dict[int, bytes] = {}
    after: dict[int, set[bytes]] = {}
    zero = bytes(SLOT)
    limit = flushed + 5000
    for i, (kind, where, content) in enumerate(_ops(seed)):
        if i >= limit:
            break
        slots = [where] if kind == "w" else range(where, where + DISCARD // SLOT)
        for s in slots:
            value = content if kind == "w" else zero
            if i < flushed:
                before[s] = value
            else:
                after.setdefault(s, set()).add(value)
    with QcowFile.open(path) as img:
        assert img.check().ok
        data = img.read_at(0, SIZE)
    if lazy:
        with QcowFile.open(tmp_path / "ours-repaired.qcow2") as img:
            assert img.read_at(0, SIZE) == data  # same guest content as qemu's repair
    bad = []
    for s in range(NSLOTS):
        got = data[s * SLOT : (s + 1) * SLOT]
        if got != before.get(s, zero) and got not in after.get(s, set()):
            bad.append(s)
    assert not bad, f"{len(bad)} slots hold data that was never theirs (first: {bad[:5]})"


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), sys.argv[3])
