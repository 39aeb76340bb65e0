"""Differential tests: the compiled core against its pure-Python twin (the specification).

For random inputs, split at random points, both must give identical frames, identical errors
(class, code, offset, message), identical CRCs and identical ReplayBuffer states.
"""

from __future__ import annotations

import random
import struct

import google_crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from icafast.wire import FLAG_FIN, FrameType


def outcome(fn, *args, **kwargs):
    """What a call did: its result, or its exception's class, message, code and offset."""
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as e:  # noqa: BLE001 - comparing every exception is the point
        return ("raised", type(e), str(e), getattr(e, "code", None), getattr(e, "offset", None))


def frame_key(f):
    p = f.payload
    view = type(p) is memoryview  # (a small payload may be a bytes copy: copy_below)
    return (
        type(f).__name__,
        f.type,
        f.flags,
        f.seq,
        f.ack,
        type(p),
        bytes(p),
        p.readonly if view else None,
        p.format if view else None,
        type(p.obj).__name__ if view else None,
        repr(f),
    )


ODD_VALUES = [None, "x", 1.5, 16.0, [1], True, b"1", -0.0, float("nan")]
ints = st.integers(-(2**65), 2**65)
edge_ints = st.sampled_from([0, 1, 0x10, 0x11, 0xFF, 0x100, -1, 2**32 - 1, 2**32, 2**64 - 1, 2**64])
anything = st.one_of(edge_ints, ints, st.sampled_from(ODD_VALUES), st.sampled_from(list(FrameType)))


# -- CRC32C --------------------------------------------------------------------------------------


@settings(max_examples=150)
@given(data=st.binary(max_size=2000), value=st.one_of(st.integers(0, 2**32 - 1), anything))
def test_crc32c(ccore, pcore, data, value):
    assert outcome(ccore.crc32c, data, value) == outcome(pcore.crc32c, data, value)


@given(data=st.sampled_from(ODD_VALUES + [12, bytearray(b"ab"), memoryview(b"abcd")[::2]]))
def test_crc32c_odd_data(ccore, pcore, data):
    assert outcome(ccore.crc32c, data) == outcome(pcore.crc32c, data)


# -- encoding ------------------------------------------------------------------------------------


@settings(max_examples=300)
@given(
    t=st.one_of(st.sampled_from(list(FrameType)), anything),
    flags=st.one_of(st.sampled_from([0, FLAG_FIN]), anything),
    seq=st.one_of(st.integers(0, 2**64 - 1), anything),
    ack=st.one_of(st.integers(0, 2**64 - 1), anything),
    payload=st.one_of(st.binary(max_size=300), st.sampled_from(["str", None, 5])),
)
def test_encode(ccore, pcore, t, flags, seq, ack, payload):
    for name in ("encode_header", "encode_frame"):
        c = outcome(getattr(ccore, name), t, flags, seq, ack, payload)
        p = outcome(getattr(pcore, name), t, flags, seq, ack, payload)
        assert c == p, name


# -- decoding ------------------------------------------------------------------------------------


@st.composite
def streams(draw, whole=False):
    """Valid frames, sometimes damaged, sometimes garbage; split at random points (``whole``:
    each frame, or each piece of garbage, in a chunk of its own)."""
    out = b""
    pieces = []
    for _ in range(draw(st.integers(0, 5))):
        pieces.append(len(out))
        kind = draw(st.sampled_from(["frame"] * 6 + ["flip", "garbage", "raw"]))
        if kind == "garbage":
            out += draw(st.binary(max_size=60))
            continue
        t = draw(st.sampled_from(list(FrameType)))
        flags = draw(st.sampled_from([0, FLAG_FIN])) if t == FrameType.DATA else 0
        payload = draw(st.binary(max_size=400))
        seq = draw(st.integers(0, 2**64 - 1))
        if kind == "raw":  # arbitrary header fields with a valid checksum
            head = struct.pack(
                ">BBHIQQ",
                draw(st.one_of(st.sampled_from([int(x) for x in FrameType]), st.integers(0, 255))),
                draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, 255))),
                draw(st.sampled_from([0, 0, 1, 0x8000])),
                draw(
                    st.sampled_from(
                        [len(payload), len(payload) + 5, max(len(payload) - 1, 0), 2**32 - 1]
                    )
                ),
                seq,
                seq ^ 0xFFFF,
            )
            out += (
                head
                + struct.pack(">I", google_crc32c.extend(google_crc32c.value(head), payload))
                + payload
            )
            continue
        f = bytearray(struct.pack(">BBHIQQ", int(t), flags, 0, len(payload), seq, 7))
        f += (
            struct.pack(">I", google_crc32c.extend(google_crc32c.value(bytes(f)), payload))
            + payload
        )
        if kind == "flip":
            i = draw(st.integers(0, len(f) - 1))
            f[i] ^= 1 << draw(st.integers(0, 7))
        out += f
    if whole:
        cuts = [*pieces, len(out)]
        return [out[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    if draw(st.booleans()) and out:
        out = out[: draw(st.integers(0, len(out)))]  # truncate
    cuts = sorted(set(draw(st.lists(st.integers(0, len(out)), max_size=8))) | {0, len(out)})
    return [out[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def as_input(chunk: bytes, mode: str):
    if mode == "bytearray":
        return bytearray(chunk)
    if mode == "strided":  # every other byte of a twice-as-long buffer
        return memoryview(bytes(b for x in chunk for b in (x, 0x5A)))[::2]
    return chunk


def _feed_one_first(dec, data):
    """What a relay does with each receive: ``feed_one``, and ``feed`` when that declines."""
    f = dec.feed_one(data)
    return dec.feed(data) if f is None else [f]


def run_decoder(core, max_payload, chunks, mode, copy_below=0, one=False):
    steps = []
    dec = outcome(core.FrameDecoder, max_payload, copy_below)
    if dec[0] != "ok":
        return [dec]
    dec = dec[1]
    for c in chunks:
        data = as_input(c, mode)
        r = outcome(_feed_one_first, dec, data) if one else outcome(dec.feed, data)
        if r[0] == "ok":
            r = ("ok", [frame_key(f) for f in r[1]],
                 [getattr(f.payload, "obj", None) is data for f in r[1]])
        steps.append((r, dec.offset, dec.buffered, dec.max_payload))
    r = outcome(dec.feed_eof)
    steps.append((r, dec.offset, dec.buffered))
    steps.append((outcome(dec.feed, b"more"), dec.offset, dec.buffered))
    return steps


@settings(max_examples=300)
@given(
    chunks=streams(),
    max_payload=st.one_of(
        st.sampled_from([0, 1, 100, 399, 400, 2**18, 2**32 - 1]),
        st.sampled_from([100.5, -1, 2**32, None, "x"]),
    ),
    mode=st.sampled_from(["bytes", "bytes", "bytearray", "strided"]),
    copy_below=st.one_of(st.sampled_from([0, 0, 1, 50, 2048, 2**32 - 1]),
                         st.sampled_from([-1, 2**32, 1.5, None, "x"])),
)
def test_decoder(ccore, pcore, chunks, max_payload, mode, copy_below):
    assert run_decoder(ccore, max_payload, chunks, mode, copy_below) == run_decoder(
        pcore, max_payload, chunks, mode, copy_below
    )


@settings(max_examples=300)
@given(
    chunks=st.one_of(streams(), streams(whole=True)),
    max_payload=st.sampled_from([0, 100, 400, 2**18]),
    mode=st.sampled_from(["bytes", "bytes", "bytearray", "strided"]),
    copy_below=st.sampled_from([0, 1, 50, 2048]),
)
def test_decoder_feed_one(ccore, pcore, chunks, max_payload, mode, copy_below):
    """``feed_one`` then ``feed`` when it declines: in both twins, the same frames, errors and
    states as ``feed`` alone (the specification)."""
    spec = run_decoder(pcore, max_payload, chunks, mode, copy_below)
    assert run_decoder(pcore, max_payload, chunks, mode, copy_below, one=True) == spec
    assert run_decoder(ccore, max_payload, chunks, mode, copy_below, one=True) == spec


def test_decoder_feed_one_declines(ccore, pcore):
    """None, with nothing consumed, unless the buffer is exactly one whole frame."""
    for core in (ccore, pcore):
        frame = core.encode_frame(int(FrameType.DATA), 0, 5, 7, b"abc")
        dec = core.FrameDecoder()
        for data in (b"", frame[:27], frame[:-1], frame + frame, frame + b"x", "text", 12):
            assert dec.feed_one(data) is None
            assert (dec.offset, dec.buffered) == (0, 0)
        f = dec.feed_one(frame)
        assert (f.type, f.seq, f.ack, bytes(f.payload)) == (int(FrameType.DATA), 5, 7, b"abc")
        assert dec.offset == len(frame)
        assert dec.feed(frame[:10]) == []
        assert dec.feed_one(frame) is None  # a partial frame is buffered
        assert dec.buffered == 10


# -- replay buffer -------------------------------------------------------------------------------

MAX = 2**64 - 1

ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 40_000), st.integers(0, 99)),
        st.tuples(st.just("append_big"), st.integers(1, 10)),
        st.tuples(
            st.just("write_view"),
            st.one_of(st.none(), st.integers(-3, 40_000), st.sampled_from([2**70, 1e300, "x"])),
        ),
        st.tuples(st.just("fill"), st.integers(0, 40_000), st.integers(0, 99)),
        st.tuples(
            st.just("commit"),
            st.one_of(st.integers(-2, 40_000), st.sampled_from([None, "x", 2**70])),
        ),
        st.tuples(st.just("ack"), st.floats(-0.2, 1.2)),
        st.tuples(st.just("ack_odd"), st.sampled_from([None, "x", -(2**70), 2**70])),
        st.tuples(
            st.just("views"),
            st.one_of(st.none(), st.floats(-0.2, 1.2)),
            st.one_of(st.none(), st.integers(-2, 40_000), st.sampled_from([2**70, 1e300, "x"])),
        ),
        st.tuples(
            st.just("frame"),
            st.floats(-0.2, 1.2),
            st.one_of(st.integers(-2, 3000), st.sampled_from([2**70, 1.5, "x", None])),
            st.sampled_from([0x10, 0x11, 0x99, "x"]),
            st.sampled_from([0, 1, 2, -1]),
            st.sampled_from([0, 5, MAX, 2**64, "x"]),
        ),
        st.tuples(st.just("shrink")),
    ),
    max_size=30,
)


def run_replay(core, limit, start, program):
    trace = []
    rb = outcome(core.ReplayBuffer, limit, start)
    if rb[0] != "ok":
        return [rb]
    rb = rb[1]
    wv = memoryview(bytearray())
    for op in program:
        name = op[0]
        size = rb.end - rb.start
        if name == "append":
            r = outcome(rb.append, random.Random(op[2]).randbytes(op[1]))
        elif name == "append_big":
            r = outcome(rb.append, bytes(min(rb.free + op[1], 10**6)))
        elif name == "write_view":
            r = outcome(rb.write_view, op[1])
            if r[0] == "ok":
                wv = r[1]
                r = ("ok", len(wv), bytes(wv), wv.readonly)  # contents too: fresh storage is zeroed
        elif name == "fill":
            k = min(op[1], len(wv))
            wv[:k] = random.Random(op[2]).randbytes(k)
            r = ("ok", k)
        elif name == "commit":
            if isinstance(op[1], int) and 0 <= op[1] and rb.end + op[1] > MAX:
                continue  # documented divergence: see test_replay.test_commit_past_max_offset
            r = outcome(rb.commit, op[1])
        elif name == "ack":
            r = outcome(rb.ack, rb.start + int(size * op[1]))
        elif name == "ack_odd":
            r = outcome(rb.ack, op[1])
        elif name == "views":
            off = None if op[1] is None else rb.start + int(size * op[1])
            r = outcome(rb.views, off, op[2])
            if r[0] == "ok":
                r = ("ok", [(bytes(v), v.readonly, type(v.obj).__name__) for v in r[1]])
        elif name == "frame":
            off = rb.start + int(size * op[1])
            r = outcome(rb.frame, op[3], op[4], off, op[2], op[5])
        else:
            r = outcome(rb.shrink)
        trace.append((name, r, rb.start, rb.end, rb.free, rb.capacity, len(rb), repr(rb)))
    trace.append([bytes(v) for v in rb.views()])
    return trace


@settings(max_examples=200)
@given(
    limit=st.sampled_from([1, 3, 100, 16384, 16385, 50_000, 100_000, 2**40 - 256]),
    start=st.sampled_from([0, 99, MAX - 60_000]),
    program=ops,
)
def test_replay_buffer(ccore, pcore, limit, start, program):
    assert run_replay(ccore, limit, start, program) == run_replay(pcore, limit, start, program)


@given(
    limit=st.sampled_from(
        [0, -1, 1, 2**40 - 256, 2**40 - 255, 2**40, 2**70, None, "x", float("nan")]
    ),
    start=st.sampled_from([0, -1, MAX, MAX + 1, None, "x", -1.5]),
)
def test_replay_buffer_constructor(ccore, pcore, limit, start):
    c = outcome(ccore.ReplayBuffer, limit, start)
    p = outcome(pcore.ReplayBuffer, limit, start)
    if c[0] == p[0] == "ok":
        c, p = repr(c[1]), repr(p[1])
    assert c == p
