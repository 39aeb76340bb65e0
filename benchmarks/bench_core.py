"""Micro-benchmarks of the core: compiled (icafast._core) vs pure (icafast._pure).

    pytest benchmarks/bench_core.py --benchmark-only --benchmark-json=/tmp/bench.json
    python benchmarks/report.py /tmp/bench.json

Not part of the test suite (tests live in tests/). The pure-Python twin runs only at the small
size (it checksums byte by byte in Python); google-crc32c runs next to crc32c for comparison.
Each benchmark records the bytes it processes per call in ``extra_info["bytes"]``; report.py
turns the medians into MB/s.
"""

from __future__ import annotations

import random

import google_crc32c
import pytest

from icafast import _pure
from icafast.wire import FrameType

try:
    from icafast import _core
except ImportError:  # pragma: no cover - bench needs the extension
    _core = None

KIB = 1024
SIZES = [1 * KIB, 16 * KIB, 64 * KIB]
DATA = FrameType.DATA


def cores(sizes_for_pure=(1 * KIB,), sizes=SIZES):
    out = []
    for size in sizes:
        if _core is not None:
            out.append(pytest.param(_core, size, id=f"cython-{size // KIB}KiB"))
        if size in sizes_for_pure:
            out.append(pytest.param(_pure, size, id=f"python-{size // KIB}KiB"))
    return out


def payload(n: int) -> bytes:
    return random.Random(n).randbytes(n)


def run(benchmark, fn, nbytes: int, group: str):
    benchmark.group = group
    benchmark.extra_info["bytes"] = nbytes
    return benchmark(fn)


# -- CRC32C --------------------------------------------------------------------------------------


@pytest.mark.parametrize("core,size", cores())
def test_crc32c(benchmark, core, size):
    data = payload(size)
    assert run(benchmark, lambda: core.crc32c(data), size, f"crc32c-{size // KIB}KiB") == (
        google_crc32c.value(data)
    )


@pytest.mark.parametrize("size", SIZES, ids=[f"google-{s // KIB}KiB" for s in SIZES])
def test_crc32c_google(benchmark, size):
    data = payload(size)
    value = google_crc32c.value
    assert run(benchmark, lambda: value(data), size, f"crc32c-{size // KIB}KiB") == value(data)


# -- frames --------------------------------------------------------------------------------------


@pytest.mark.parametrize("core,size", cores())
def test_encode_header(benchmark, core, size):
    """The vectored-write path: header only (checksum over header + payload), payload not copied."""
    data = payload(size)
    enc = core.encode_header
    run(benchmark, lambda: enc(DATA, 0, 123456, 654321, data), size, f"encode-{size // KIB}KiB")


@pytest.mark.parametrize("core,size", cores())
def test_encode_frame(benchmark, core, size):
    data = payload(size)
    enc = core.encode_frame
    run(benchmark, lambda: enc(DATA, 0, 123456, 654321, data), size, f"encode-{size // KIB}KiB")


@pytest.mark.parametrize("core,size", cores())
def test_decode(benchmark, core, size):
    """One whole frame per feed (zero-copy payload)."""
    frame = core.encode_frame(DATA, 0, 1, 2, payload(size))
    dec = core.FrameDecoder()
    out = run(benchmark, lambda: dec.feed(frame), size, f"decode-{size // KIB}KiB")
    assert len(out) == 1 and len(out[0].payload) == size


@pytest.mark.parametrize("core,size", cores())
def test_decode_split(benchmark, core, size):
    """The frame arrives in two reads: the payload is assembled in an owned buffer."""
    frame = core.encode_frame(DATA, 0, 1, 2, payload(size))
    half = len(frame) // 2
    a, b = frame[:half], frame[half:]
    dec = core.FrameDecoder()

    def go():
        dec.feed(a)
        return dec.feed(b)

    out = run(benchmark, go, size, f"decode-{size // KIB}KiB")
    assert len(out) == 1


@pytest.mark.parametrize("core,size", cores())
def test_encode_decode(benchmark, core, size):
    """encode_frame + feed: both checksums, one payload copy (the encoder's)."""
    data = payload(size)
    enc = core.encode_frame
    dec = core.FrameDecoder()

    def go():
        return dec.feed(enc(DATA, 0, 7, 9, data))

    out = run(benchmark, go, size, f"encode+decode-{size // KIB}KiB")
    assert len(out) == 1 and out[0].seq == 7


# -- replay buffer -------------------------------------------------------------------------------


@pytest.mark.parametrize("core,size", cores(sizes_for_pure=SIZES))
def test_replay_append_views_ack(benchmark, core, size):
    """One send cycle: append the bytes, take the views to write, drop them on ack."""
    data = payload(size)
    rb = core.ReplayBuffer(4 * 1024 * KIB)

    def go():
        rb.append(data)
        views = rb.views()
        rb.ack(rb.end)
        return views

    run(benchmark, go, size, f"replay-{size // KIB}KiB")


@pytest.mark.parametrize("core,size", cores(sizes_for_pure=SIZES))
def test_replay_write_view_commit(benchmark, core, size):
    """The recv_into path: write_view, fill, commit, ack (wrapping around the ring)."""
    data = payload(size)
    rb = core.ReplayBuffer(4 * 1024 * KIB)

    def go():
        v = rb.write_view(size)
        n = len(v)
        v[:] = data[:n]
        rb.commit(n)
        rb.ack(rb.end)

    run(benchmark, go, size, f"replay-{size // KIB}KiB")
