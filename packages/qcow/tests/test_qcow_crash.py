"""Crash safety: SIGKILL a writer mid-stream, then check the image with qemu-img.

The child replays a deterministic stream of 4 KiB slot writes and whole-cluster discards and
prints how many operations were done at each completed ``flush()``. After the kill, every slot
must hold either what the last flushed operation left there or what a later operation wrote:
never another slot's data, never data of a discarded generation from before the flush.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CS = 65536
SLOT = 4096
SIZE = 16 << 20
NSLOTS = SIZE // SLOT
SLOTS_PER_CLUSTER = CS // SLOT


def _ops(seed: int) -> Iterator[tuple[str, int, bytes]]:
    """("w", slot, content) or ("d", cluster, b"")."""
    rng = random.Random(seed)
    i = 0
    while True:
        i += 1
        if rng.random() < 0.08:
            yield "d", rng.randrange(SIZE // CS), b""
        else:
            slot = rng.randrange(NSLOTS)
            stamp = slot.to_bytes(4, "little") + i.to_bytes(8, "little") + b"GEN!"
            yield "w", slot, stamp * (SLOT // len(stamp))


def _child(path: str, seed: int, lazy: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from qcow import QcowFile

    img = QcowFile.create(path, SIZE, cluster_size=CS, lazy_refcounts=lazy)
    for done, (kind, where, content) in enumerate(_ops(seed), start=1):
        if kind == "w":
            img.write_at(content, where * SLOT)
        else:
            img.discard(where * CS, CS)
        if done % 400 == 0:
            img.flush()
            print(done, flush=True)


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy-refcounts"])
def test_sigkill_during_writes(tmp_path: Path, lazy: bool) -> None:
    from qcow import QcowFile

    path = tmp_path / "crash.qcow2"
    seed = 4242 + lazy
    proc = subprocess.Popen(
        [sys.executable, __file__, str(path), str(seed), "1" if lazy else "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    flushed = 0
    try:
        while flushed < 1600:
            line = proc.stdout.readline()
            assert line, "writer died early"
            flushed = int(line)
        time.sleep(random.Random(seed).uniform(0.0, 0.05))  # land in the middle of writes
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
        slots = (
            [where]
            if kind == "w"
            else range(where * SLOTS_PER_CLUSTER, (where + 1) * SLOTS_PER_CLUSTER)
        )
        for s in slots:
            value = content if kind == "w" else zero
            if i < flushed:
                before[s] = value
            else:
                after.setdefault(s, set()).add(value)
    with QcowFile.open(path) as img:
        assert img.check().ok
        data = img.read_at(0, SIZE)
    bad = []
    for s in range(NSLOTS):
        got = data[s * SLOT : (s + 1) * SLOT]
        if got != before.get(s, zero) and got not in after.get(s, set()):
            bad.append(s)
    assert not bad, f"{len(bad)} slots hold data that was never theirs (first: {bad[:5]})"


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1")
