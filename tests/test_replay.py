"""ReplayBuffer against a reference model (bytes + start offset), for both cores."""

from __future__ import annotations

import ctypes
import os
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from icafast.errors import ReplayBufferError, ReplayFullError, ReplayRangeError

MAX_OFFSET = 2**64 - 1
INITIAL = 16 * 1024


def blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


class ReplayModel(RuleBasedStateMachine):
    """The buffer holds ``self.data`` at stream offsets ``[self.start, self.start+len(data))``."""

    core = None  # set by the factory below

    def __init__(self) -> None:
        super().__init__()
        self.rb = None

    @initialize(
        limit=st.sampled_from([1, 5, 100, INITIAL, INITIAL + 1, 40_000, 70_000, 2**40 - 256]),
        start=st.sampled_from([0, 1, 12345, MAX_OFFSET - 50_000, MAX_OFFSET]),
    )
    def init(self, limit, start):
        self.rb = self.core.ReplayBuffer(limit, start)
        self.limit = limit
        self.start = start
        self.data = b""
        self.cap = 0  # the growth policy, modelled
        self.wv = None  # the last write_view, while a commit may follow
        self.held = []  # (offset, expected bytes, views) still to be valid

    # -- model helpers ---------------------------------------------------------------------
    @property
    def end(self):
        return self.start + len(self.data)

    @property
    def free(self):
        return self.limit - len(self.data)

    def reserve(self, extra):
        size = len(self.data)
        if size + extra <= self.cap:
            return
        newcap = max(self.cap, INITIAL)
        while newcap < size + extra:
            newcap *= 2
        self.cap = min(newcap, self.limit)

    # -- rules -----------------------------------------------------------------------------
    @rule(n=st.integers(0, 45_000), seed=st.integers(0, 2**16))
    def append(self, n, seed):
        self.wv = None
        data = blob(n, seed)
        if n > self.free:
            with pytest.raises(ReplayFullError) as info:
                self.rb.append(data)
            assert str(info.value) == (
                f"append of {n} bytes exceeds the {self.free} bytes free (limit {self.limit})"
            )
            assert isinstance(info.value, BufferError) and isinstance(info.value, ReplayBufferError)
        elif self.end + n > MAX_OFFSET:
            with pytest.raises(ValueError, match=r"^stream offset would pass 2\*\*64-1$"):
                self.rb.append(data)
        else:
            assert self.rb.append(bytearray(data) if seed % 2 else data) is None
            if n:
                self.reserve(n)
                self.data += data

    @rule(extra=st.integers(1, 1000))
    def append_too_big(self, extra):
        n = self.free + extra
        if n > 100_000:
            n = self.free + 1
            if n > 100_000:
                return
        self.wv = None
        with pytest.raises(ReplayFullError):
            self.rb.append(bytes(n))

    @rule(
        max_bytes=st.none() | st.integers(0, 50_000), fill=st.floats(0, 1), seed=st.integers(0, 99)
    )
    def write_view_commit(self, max_bytes, fill, seed):
        # an odd seed takes the relay's path: recv_window + _commit (C integers; the compiled
        # core's window object is reused); otherwise write_view + commit
        window = seed % 2 == 1 and max_bytes is not None
        self._write_view(max_bytes, window)
        v = self.wv
        k = int(len(v) * fill)
        if self.end + k > MAX_OFFSET:
            return  # see test_commit_past_max_offset
        data = blob(k, seed)
        with memoryview(v) as m:
            m[:k] = data
        (self.rb._commit if window else self.rb.commit)(k)
        if window and self.core.IMPLEMENTATION == "cython":
            assert len(v) == 0  # committed: the window shows nothing any more
        self.wv = None
        self.data += data

    @rule(max_bytes=st.none() | st.integers(0, 50_000), window=st.booleans())
    def write_view_only(self, max_bytes, window):
        self._write_view(max_bytes, window and max_bytes is not None)

    def _write_view(self, max_bytes, window=False):
        want = self.free if max_bytes is None else min(max_bytes, self.free)
        if self.free * 2 > 300_000 and max_bytes is None:
            want = min(self.free, 50_000)  # keep huge limits cheap
            max_bytes = want
        v = self.rb.recv_window(max_bytes) if window else self.rb.write_view(max_bytes)
        with memoryview(v) as m:
            assert not m.readonly and m.format == "B" and m.ndim == 1 and m.contiguous
            assert m.nbytes == len(v)
        if not window or self.core.IMPLEMENTATION == "python":
            assert type(v) is memoryview
        assert len(v) <= want
        if want:
            assert len(v) > 0
            self.reserve(want)
        self.wv = v

    @rule(n=st.integers(-2, 60_000))
    def commit(self, n):
        offered = len(self.wv) if self.wv is not None else 0
        if self.end + n > MAX_OFFSET:
            return  # see test_commit_past_max_offset
        if 0 <= n <= offered:
            if self.wv is None:  # (n == 0: committing nothing needs no view)
                before = b""
            else:
                with memoryview(self.wv) as m:
                    before = bytes(m[:n])
            self.rb.commit(n)
            self.data += before
            self.wv = None
        else:
            with pytest.raises(ValueError) as info:
                self.rb.commit(n)
            assert str(info.value) == (
                f"commit of {n} bytes, but the last write_view offered {offered}"
            )

    @rule(max_bytes=st.integers(-100, -1))
    def write_view_negative(self, max_bytes):
        with pytest.raises(ValueError, match="^max_bytes must not be negative$"):
            self.rb.write_view(max_bytes)

    @rule(frac=st.floats(0, 1), typed=st.booleans())
    def ack(self, frac, typed):
        # (typed: the engine's entry point, which the compiled core takes as a C integer)
        k = int(len(self.data) * frac)
        assert (self.rb._ack_at if typed else self.rb.ack)(self.start + k) == k
        if k:
            self.wv = None
            self.start += k
            self.data = self.data[k:]
            if not self.data:
                pass  # storage index resets; nothing to model

    @rule(below=st.booleans(), by=st.integers(1, 2**70), typed=st.booleans())
    def ack_out_of_range(self, below, by, typed):
        offset = self.start - by if below else self.end + by
        typed = typed and 0 <= offset <= MAX_OFFSET  # (_ack_at takes 64-bit offsets only)
        with pytest.raises(ReplayRangeError) as info:
            (self.rb._ack_at if typed else self.rb.ack)(offset)
        assert str(info.value) == (
            f"ack {offset} outside the unacknowledged range [{self.start}, {self.end}]"
        )
        assert isinstance(info.value, ValueError)

    @rule(frac=st.none() | st.floats(0, 1), max_bytes=st.none() | st.integers(0, 50_000))
    def views(self, frac, max_bytes):
        if frac is None:
            offset = None
            rel = 0
            vs = self.rb.views() if max_bytes is None else self.rb.views(max_bytes=max_bytes)
        else:
            rel = int(len(self.data) * frac)
            offset = self.start + rel
            vs = self.rb.views(offset, max_bytes)
        expected = self.data[rel:] if max_bytes is None else self.data[rel : rel + max_bytes]
        assert type(vs) is list and len(vs) <= 2
        assert all(type(v) is memoryview and v.readonly and len(v) > 0 for v in vs)
        assert b"".join(vs) == expected
        if expected:
            self.held.append((self.start + rel, expected, vs))
            del self.held[:-6]

    @rule(below=st.booleans(), by=st.integers(1, 10**6))
    def views_out_of_range(self, below, by):
        offset = self.start - by if below else self.end + by
        if offset < 0:
            offset = -1
        with pytest.raises(ReplayRangeError) as info:
            self.rb.views(offset)
        assert str(info.value) == (
            f"replay from {offset} outside the buffered range [{self.start}, {self.end}]"
        )

    @rule(frac=st.floats(0, 1), n=st.integers(0, 3000), fin=st.booleans(),
          ack=st.sampled_from([0, 1, MAX_OFFSET]), typed=st.booleans())
    def frame(self, frac, n, fin, ack, typed):
        """A whole DATA frame straight from the ring: what encode_frame makes of those bytes,
        across the ring's wrap too; out of range: ReplayRangeError, nothing changed. (typed:
        the engine's entry point, which the compiled core takes as C integers.)"""
        frame = self.rb._frame_at if typed else self.rb.frame
        rel = int(len(self.data) * frac)
        offset = self.start + rel
        if rel + n <= len(self.data):
            got = frame(0x10, int(fin), offset, n, ack)
            assert type(got) is bytes
            assert got == self.core.encode_frame(0x10, int(fin), offset, ack,
                                                 self.data[rel:rel + n])
        else:
            with pytest.raises(ReplayRangeError) as info:
                frame(0x10, 0, offset, n, ack)
            assert str(info.value) == (
                f"frame of {n} bytes from {offset} outside the buffered range "
                f"[{self.start}, {self.end}]"
            )

    @rule()
    def views_negative_max(self):
        with pytest.raises(ValueError, match="^max_bytes must not be negative$"):
            self.rb.views(max_bytes=-1)

    @rule()
    def shrink(self):
        self.wv = None
        self.rb.shrink()
        size = len(self.data)
        if size == 0:
            self.cap = 0
            return
        want = INITIAL
        while want < size:
            want *= 2
        want = min(want, self.limit)
        if want < self.cap:
            self.cap = want

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def state_matches(self):
        if self.rb is None:
            return
        rb = self.rb
        assert (rb.start, rb.end, len(rb), rb.free, rb.limit) == (
            self.start,
            self.end,
            len(self.data),
            self.free,
            self.limit,
        )
        assert rb.capacity == self.cap
        assert len(self.data) <= rb.capacity <= self.limit
        assert repr(rb) == (
            f"ReplayBuffer(start={self.start}, end={self.end}, limit={self.limit}, "
            f"capacity={self.cap})"
        )

    @invariant()
    def held_views_stay_valid(self):
        if self.rb is None:
            return
        keep = []
        for offset, expected, vs in self.held:
            if offset >= self.start:  # none of its bytes acknowledged yet
                assert b"".join(vs) == expected
                keep.append((offset, expected, vs))
        self.held = keep

    @precondition(lambda self: self.rb is not None)
    @rule()
    def all_views_match(self):
        assert b"".join(self.rb.views()) == self.data


def test_replay_buffer_state_machine(core):
    machine = type(f"ReplayModel_{core.IMPLEMENTATION}", (ReplayModel,), {"core": core})
    run_state_machine_as_test(
        machine, settings=settings(max_examples=120, stateful_step_count=40, deadline=None)
    )


# -- direct tests ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "limit,start,msg",
    [
        (0, 0, "limit must be positive and at most 2**40"),
        (-1, 0, "limit must be positive and at most 2**40"),
        (2**40, 0, "limit must be positive and at most 2**40"),
        (10, -1, "start must be in 0..2**64-1"),
        (10, 2**64, "start must be in 0..2**64-1"),
    ],
)
def test_constructor_validation(core, limit, start, msg):
    with pytest.raises(ValueError) as info:
        core.ReplayBuffer(limit, start)
    assert str(info.value) == msg


def test_largest_limit_and_start(core):
    rb = core.ReplayBuffer(2**40 - 256, MAX_OFFSET)
    assert (rb.limit, rb.start, rb.end, rb.free, rb.capacity, len(rb)) == (
        2**40 - 256,
        MAX_OFFSET,
        MAX_OFFSET,
        2**40 - 256,
        0,
        0,
    )
    rb.append(b"")
    with pytest.raises(ValueError, match="stream offset would pass"):
        rb.append(b"x")


def test_growth_policy_and_wrap(core):
    rb = core.ReplayBuffer(100_000)
    rb.append(b"a" * 10)
    assert rb.capacity == INITIAL
    rb.append(b"b" * (INITIAL - 10))
    assert rb.capacity == INITIAL
    rb.append(b"c")
    assert rb.capacity == 2 * INITIAL
    rb.append(b"d" * 2 * INITIAL)
    assert rb.capacity == 4 * INITIAL
    rb.append(b"e" * (100_000 - len(rb)))
    assert rb.capacity == 100_000 and rb.free == 0
    # wrap: ack the front, append again, views come in two pieces
    rb.ack(rb.start + 30_000)
    rb.append(b"f" * 20_000)
    vs = rb.views()
    assert len(vs) == 2 and b"".join(vs).endswith(b"e" + b"f" * 20_000)
    rb.ack(rb.end)
    assert len(rb) == 0 and rb.views() == []
    rb.shrink()
    assert rb.capacity == 0


def test_old_views_survive_relocation(core):
    rb = core.ReplayBuffer(1 << 20)
    rb.append(b"x" * 1000)
    (v,) = rb.views()
    rb.append(b"y" * 100_000)  # grows: storage replaced
    assert bytes(v) == b"x" * 1000
    (w,) = rb.views(max_bytes=10)
    rb.shrink()
    assert bytes(w) == b"x" * 10


def test_write_view_recv_into(core):
    import socket

    a, b = socket.socketpair()
    try:
        a.sendall(b"hello world")
        rb = core.ReplayBuffer(64)
        v = rb.write_view()
        n = b.recv_into(v)
        rb.commit(n)
        assert b"".join(rb.views()) == b"hello world"
        assert rb.write_view(0).nbytes == 0
    finally:
        a.close()
        b.close()


def test_recv_window_recv_into(core):
    import socket

    a, b = socket.socketpair()
    try:
        rb = core.ReplayBuffer(64)
        for part in (b"hello ", b"world"):
            a.sendall(part)
            w = rb.recv_window(100)
            assert len(w) == 64 - len(rb)
            n = b.recv_into(w)
            rb._commit(n)
        assert b"".join(rb.views()) == b"hello world"
        assert len(rb.recv_window(0)) == 0
        with pytest.raises(ValueError, match="^commit of 1 bytes, but the last write_view"):
            rb._commit(1)
    finally:
        a.close()
        b.close()


def test_recv_window_reuse_and_exports(ccore):
    """The compiled core's window: one object per buffer while nobody holds it; one still
    exported is left alone (its length is its views' shape) and replaced, and keeps the storage
    it points into alive."""
    _core = ccore

    rb = _core.ReplayBuffer(1 << 20)
    w = rb.recv_window(100)
    assert type(w) is _core.RecvWindow and len(w) == 100
    assert rb.recv_window(50) is w and len(w) == 50
    rb._commit(0)
    assert len(w) == 0  # committed: it shows nothing any more
    assert rb.recv_window(100) is w
    with memoryview(w) as m:
        m[:3] = b"abc"
        rb.commit(3)
        assert len(w) == 100 and m.nbytes == 100  # exported: untouched
        w2 = rb.recv_window(10)  # ... and replaced
        assert w2 is not w and len(w2) == 10
        rb.append(b"x" * 100_000)  # grows: new storage; the view keeps the old one alive
        assert len(w2) == 0  # (it pointed into the old storage)
        m[3:6] = b"zzz"  # writes into the old storage, not into the buffer
    assert b"".join(rb.views()) == b"abc" + b"x" * 100_000
    w3 = rb.recv_window(10)
    assert w3 is w2 and len(w3) == 10
    rb.ack(rb.end)
    rb.shrink()  # storage given back: the window lets go of it
    assert len(w3) == 0


def test_commit_invalidated_by_other_calls(core):
    rb = core.ReplayBuffer(100)
    rb.write_view(10)
    rb.append(b"x")
    with pytest.raises(ValueError, match="^commit of 1 bytes, but the last write_view offered 0$"):
        rb.commit(1)
    rb.write_view(10)
    rb.views()  # does not invalidate
    rb.ack(rb.start)  # acknowledging nothing does not either
    rb.commit(3)
    assert len(rb) == 4


def test_full_buffer_write_view_is_empty(core):
    rb = core.ReplayBuffer(5)
    rb.append(b"12345")
    v = rb.write_view()
    assert len(v) == 0 and not v.readonly
    with pytest.raises(ReplayFullError):
        rb.append(b"6")
    assert b"".join(rb.views()) == b"12345"


def test_append_buffer_types(core):
    import array

    rb = core.ReplayBuffer(1000)
    rb.append(array.array("H", [1, 2, 3]))
    rb.append(memoryview(b"abcdef")[::2])
    assert b"".join(rb.views()) == array.array("H", [1, 2, 3]).tobytes() + b"ace"
    with pytest.raises(TypeError, match="^expected a bytes-like object, not str$"):
        rb.append("text")


def test_commit_past_max_offset(core):
    rb = core.ReplayBuffer(10, MAX_OFFSET - 1)
    rb.append(b"x")
    v = rb.write_view()
    assert len(v) == 9
    # 64-bit offsets never wrap: both cores refuse, like append does
    with pytest.raises(ValueError, match=r"^stream offset would pass 2\*\*64-1$"):
        rb.commit(1)
    assert rb.end == MAX_OFFSET


def test_frame_across_the_wrap(core):
    """``frame`` copies both pieces when the bytes wrap around the end of the storage."""
    rb = core.ReplayBuffer(100)  # storage of 100 bytes
    first, second = blob(80, 1), blob(60, 2)
    rb.append(first)
    rb.ack(60)
    rb.append(second)  # 20 bytes at the end of the storage, 40 at its start
    assert [len(v) for v in rb.views()] == [40, 40] and rb.capacity == 100
    data = first[60:] + second
    for rel, n in ((0, 80), (10, 50), (39, 2), (40, 40), (0, 0), (79, 1)):
        want = core.encode_frame(0x10, 1, 60 + rel, 7, data[rel:rel + n])
        assert rb.frame(0x10, 1, 60 + rel, n, 7) == want, (rel, n)
        assert rb._frame_at(0x10, 1, 60 + rel, n, 7) == want, (rel, n)


def test_frame_at_checks_and_fails_as_frame(core):
    """The engine's entry point takes C integers in the compiled core, but an invalid frame
    type, flag or range fails there exactly as ``frame`` does."""
    rb = core.ReplayBuffer(100)
    rb.append(b"abc")
    for args in ((0x99, 0, 0, 3, 0), (0x10, 0x80, 0, 3, 0), (0x10, 0, 1, 3, 0),
                 (0x10, 0, 4, 0, 0)):
        with pytest.raises(ValueError) as want:
            rb.frame(*args)
        with pytest.raises(ValueError) as got:
            rb._frame_at(*args)
        assert (type(got.value), str(got.value)) == (type(want.value), str(want.value)), args
    assert rb._frame_at(0x10, 0, 1, 2, 5) == core.encode_frame(0x10, 0, 1, 5, b"bc")


def _vm_flags(addr: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``addr`` (Linux smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                    reason="Linux with transparent huge pages only")
def test_large_storage_asks_for_huge_pages(ccore):
    """Storage of 2 MiB or more is marked for transparent huge pages (madvise) before it is
    first touched: the kernel's copy of each bulk read into the ring then misses the TLB far
    less. The hint changes no byte (the differential tests cover the contents)."""
    rb = ccore.ReplayBuffer(8 << 20)
    rb.append(blob(3 << 20, 1))  # storage grows to 4 MiB
    assert rb.capacity == 4 << 20
    view = rb.write_view(1)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
    assert "hg" in _vm_flags(addr)
    view.release()
