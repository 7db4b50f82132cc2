"""Property-based test: random operation sequences against a bytearray model of the disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from qcow import QcowFile


class QcowModel(RuleBasedStateMachine):
    """Drives one image (small clusters, so operations cross clusters and L2/refcount blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="qcow-model-")
        self.path = os.path.join(self.dir, "disk.qcow2")
        self.img: QcowFile | None = None
        self.model = bytearray()

    @initialize(
        cluster_size=st.sampled_from([512, 1024, 4096]),
        refcount_bits=st.sampled_from([1, 4, 16, 64]),
        version=st.sampled_from([2, 3]),
        size=st.integers(min_value=1, max_value=300_000),
        backing=st.booleans(),
        lazy=st.booleans(),
    )
    def create(
        self,
        cluster_size: int,
        refcount_bits: int,
        version: int,
        size: int,
        backing: bool,
        lazy: bool,
    ) -> None:
        if version == 2:
            refcount_bits, lazy = 16, False
        backing_name = None
        self.model = bytearray(size)
        if backing:
            content = bytes((i * 7 + 3) & 0xFF for i in range(256)) * (size // 256 + 1)
            bsize = size // 2 + 1  # a backing file shorter than the image: zeros past it
            with open(os.path.join(self.dir, "base.raw"), "wb") as f:
                f.write(content[:bsize])
            self.model[:bsize] = content[:bsize]
            backing_name = "base.raw"
        self.img = QcowFile.create(
            self.path,
            size,
            cluster_size=cluster_size,
            refcount_bits=refcount_bits,
            version=version,
            backing_file=backing_name,
            backing_format="raw" if backing else None,
            lazy_refcounts=lazy,
        )

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        size = len(self.model)
        off = data.draw(st.integers(0, size - 1), label="offset")
        n = data.draw(st.integers(0, min(size - off, 20_000)), label="length")
        return off, n

    @rule(data=st.data(), fill=st.integers(0, 255))
    def write(self, data: st.DataObject, fill: int) -> None:
        assert self.img is not None
        off, n = self._range(data)
        payload = bytes([fill]) * (n // 2) + os.urandom(n - n // 2)
        assert self.img.write_at(payload, off) == n
        self.model[off : off + n] = payload

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        assert self.img is not None
        off, n = self._range(data)
        self.img.discard(off, n)
        self.model[off : off + n] = bytes(n)

    @rule(data=st.data())
    def write_zeroes(self, data: st.DataObject) -> None:
        assert self.img is not None
        off, n = self._range(data)
        self.img.write_zeroes(off, n)
        self.model[off : off + n] = bytes(n)

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        assert self.img is not None
        off, n = self._range(data)
        buf = bytearray(n)
        assert self.img.readinto_at(memoryview(buf), off) == n
        assert buf == self.model[off : off + n]

    @rule()
    def flush(self) -> None:
        assert self.img is not None
        self.img.flush()

    @rule()
    def reopen(self) -> None:
        assert self.img is not None
        self.img.close()
        self.img = QcowFile.open(self.path, writable=True)

    @precondition(lambda self: len(self.model) < 600_000)
    @rule(grow=st.integers(1, 200_000))
    def resize(self, grow: int) -> None:
        assert self.img is not None
        self.img.resize(len(self.model) + grow)
        self.model += bytes(grow)

    @invariant()
    def size_matches(self) -> None:
        if self.img is not None:
            assert self.img.virtual_size == len(self.model)

    def teardown(self) -> None:
        try:
            if self.img is not None:
                assert self.img.read_at(0, len(self.model)) == self.model
                self.img.close()
                with QcowFile.open(self.path) as img:
                    assert img.read_at(0, len(self.model)) == self.model
                    res = img.check()
                    assert res.ok, res.messages
                if shutil.which("qemu-img"):
                    peer = subprocess.run(
                        ["qemu-img", "check", self.path], capture_output=True, text=True
                    )
                    assert peer.returncode == 0, peer.stdout + peer.stderr
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


QcowModel.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_qcow_state_machine = QcowModel.TestCase
