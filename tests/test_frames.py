"""Frame codec: encode/decode roundtrips under any split, and every kind of bad input."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import google_crc32c
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from icafast import errors, wire
from icafast.errors import FrameError
from icafast.wire import ALLOWED_FLAGS, FLAG_FIN, HEADER_SIZE, FrameType

# -- helpers -------------------------------------------------------------------------------------


def raw_frame(type, flags=0, seq=0, ack=0, payload=b"", *, reserved=0, length=None, crc=None):
    """A frame built by hand (any field values), with a correct checksum unless ``crc`` given."""
    n = len(payload) if length is None else length
    head = struct.pack(">BBHIQQ", type, flags, reserved, n, seq, ack)
    if crc is None:
        crc = google_crc32c.extend(google_crc32c.value(head), payload)
    return head + struct.pack(">I", crc) + payload


def as_tuple(frame):
    return (frame.type, frame.flags, frame.seq, frame.ack, bytes(frame.payload))


def feed_chunks(dec, chunks):
    out = []
    for c in chunks:
        out.extend(dec.feed(c))
    return out


def split(data: bytes, cuts) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


@st.composite
def frames(draw, max_payload=300):
    t = draw(st.sampled_from(list(FrameType)))
    flags = draw(st.sampled_from([0, FLAG_FIN])) if t == FrameType.DATA else 0
    return (
        int(t),
        flags,
        draw(st.integers(0, 2**64 - 1)),
        draw(st.integers(0, 2**64 - 1)),
        draw(st.binary(max_size=max_payload)),
    )


# -- constants -----------------------------------------------------------------------------------


def test_frame_h_constants_match_python():
    text = (Path(__file__).resolve().parents[1] / "csrc" / "frame.h").read_text()
    defines = {
        m.group(1): int(m.group(2), 0)
        for m in re.finditer(r"^#define\s+(ICAFAST_\w+)\s+(0x[0-9A-Fa-f]+|\d+)\b", text, re.M)
    }
    expected = {
        "ICAFAST_HEADER_SIZE": wire.HEADER_SIZE,
        "ICAFAST_DEFAULT_MAX_PAYLOAD": wire.DEFAULT_MAX_PAYLOAD,
        "ICAFAST_MAX_PAYLOAD_LIMIT": wire.MAX_PAYLOAD_LIMIT,
        "ICAFAST_FLAG_FIN": wire.FLAG_FIN,
        "ICAFAST_CRC_COVERED": wire.HEADER_SIZE - 4,
    }
    for t in FrameType:
        expected[f"ICAFAST_FRAME_{t.name}"] = int(t)
    for name in ("TYPE", "RESERVED", "FLAGS", "LENGTH", "CHECKSUM", "TRUNCATED"):
        expected[f"ICAFAST_FRAME_ERR_{name}"] = getattr(errors, f"FRAME_ERR_{name}")
    assert {k: defines.get(k) for k in expected} == expected
    # and no frame type in the header that Python does not know
    c_types = {
        k for k in defines if re.fullmatch(r"ICAFAST_FRAME_[A-Z]+", k) and k != "ICAFAST_FRAME_OK"
    }
    assert c_types == {f"ICAFAST_FRAME_{t.name}" for t in FrameType}


# -- encoding ------------------------------------------------------------------------------------


@settings(max_examples=100)
@given(f=frames())
def test_encode_matches_hand_built(core, f):
    t, flags, seq, ack, payload = f
    want = raw_frame(t, flags, seq, ack, payload)
    assert core.encode_frame(t, flags, seq, ack, payload) == want
    hdr = core.encode_header(t, flags, seq, ack, payload)
    assert type(hdr) is bytes and hdr == want[:HEADER_SIZE]


def test_encode_defaults_and_buffer_types(core):
    assert core.encode_frame(FrameType.PING) == raw_frame(0x12)
    p = bytearray(b"xyz" * 10)
    for payload in (p, memoryview(p), memoryview(bytes(p))[::1], memoryview(p).cast("B", (5, 6))):
        assert core.encode_frame(0x10, 0, 1, 2, payload) == raw_frame(0x10, 0, 1, 2, bytes(p))
        assert core.encode_header(0x10, 0, 1, 2, payload) == raw_frame(0x10, 0, 1, 2, bytes(p))[:28]


@pytest.mark.parametrize(
    "args,msg",
    [
        ((0x00, 0, 0, 0), "unknown frame type 0"),
        ((0x15, 0, 0, 0), "unknown frame type 21"),
        ((256 + 0x10, 0, 0, 0), "unknown frame type 272"),
        ((-1, 0, 0, 0), "unknown frame type -1"),
        ((0x10, 2, 0, 0), "flags 2 not allowed for frame type 0x10"),
        ((0x10, -1, 0, 0), "flags -1 not allowed for frame type 0x10"),
        ((0x10, 0x101, 0, 0), "flags 257 not allowed for frame type 0x10"),
        ((0x11, 1, 0, 0), "flags 1 not allowed for frame type 0x11"),
        ((0x10, 0, -1, 0), "seq must be in 0..2**64-1"),
        ((0x10, 0, 2**64, 0), "seq must be in 0..2**64-1"),
        ((0x10, 0, 0, -1), "ack must be in 0..2**64-1"),
        ((0x10, 0, 0, 2**64), "ack must be in 0..2**64-1"),
    ],
)
def test_encode_rejects_bad_arguments(core, args, msg):
    with pytest.raises(ValueError) as info:
        core.encode_header(*args, b"")
    assert str(info.value) == msg
    with pytest.raises(ValueError) as info:
        core.encode_frame(*args, payload=b"abc")
    assert str(info.value) == msg


def test_encode_rejects_str_payload(core):
    with pytest.raises(TypeError, match="expected a bytes-like object, not str"):
        core.encode_frame(0x10, payload="abc")


def test_intenum_and_bool_arguments(core):
    assert core.encode_frame(FrameType.DATA, True, 3, 4, b"x") == raw_frame(0x10, 1, 3, 4, b"x")


# -- the Frame object ----------------------------------------------------------------------------


def test_frame_object(core):
    f = core.Frame(0x10, 1, 5, 6, b"abc")
    assert (f.type, f.flags, f.seq, f.ack, f.payload) == (0x10, 1, 5, 6, b"abc")
    assert repr(f) == "Frame(type=0x10, flags=0x01, seq=5, ack=6, payload=<3 bytes>)"
    assert f == core.Frame(0x10, 1, 5, 6, memoryview(b"abc"))
    assert f != core.Frame(0x10, 1, 5, 7, b"abc")
    assert f != core.Frame(0x10, 1, 5, 6, b"abd")
    assert f != "frame"
    assert (f == 3) is False
    with pytest.raises(TypeError):
        hash(f)
    f.seq = 99
    assert f.seq == 99


# -- decoding: roundtrips ------------------------------------------------------------------------


@settings(max_examples=100)
@given(fs=st.lists(frames(), max_size=6), cuts=st.lists(st.integers(0, 3000), max_size=10))
def test_roundtrip_random_splits(core, fs, cuts):
    stream = b"".join(core.encode_frame(*f) for f in fs)
    dec = core.FrameDecoder()
    got = feed_chunks(dec, split(stream, cuts))
    assert [as_tuple(g) for g in got] == fs
    assert dec.offset == len(stream) and dec.buffered == 0
    dec.feed_eof()


@settings(max_examples=30)
@given(fs=st.lists(frames(max_payload=60), max_size=4))
def test_roundtrip_whole_and_bytewise(core, fs):
    stream = b"".join(core.encode_frame(*f) for f in fs)
    dec = core.FrameDecoder()
    assert [as_tuple(g) for g in dec.feed(stream)] == fs
    dec = core.FrameDecoder()
    got = []
    for i in range(len(stream)):
        got.extend(dec.feed(stream[i : i + 1]))
        assert dec.buffered <= HEADER_SIZE + 60
    assert [as_tuple(g) for g in got] == fs


@settings(max_examples=60)
@given(fs=st.lists(frames(), min_size=1, max_size=4), nxt=frames(), k=st.integers(1, 10_000))
def test_trailing_partial_frame(core, fs, nxt, k):
    """h11 style: complete frames plus the start of the next one in the same buffer."""
    tail = core.encode_frame(*nxt)
    k = min(k, len(tail) - 1)
    stream = b"".join(core.encode_frame(*f) for f in fs)
    dec = core.FrameDecoder()
    got = dec.feed(stream + tail[:k])
    assert [as_tuple(g) for g in got] == fs
    assert dec.buffered == k and dec.offset == len(stream)
    with pytest.raises(FrameError) as info:
        dec.feed_eof()
    assert info.value.code == errors.FRAME_ERR_TRUNCATED and info.value.offset == len(stream)
    assert str(info.value) == (
        f"stream ended inside a frame ({k} of {HEADER_SIZE if k < HEADER_SIZE else len(tail)} "
        f"bytes received) (frame at stream offset {len(stream)})"
    )


def test_zero_copy_and_owned_payloads(core):
    a = core.encode_frame(0x10, 0, 0, 0, b"A" * 100)
    b = core.encode_frame(0x10, 0, 100, 0, b"B" * 100)
    data = a + b[:50]
    dec = core.FrameDecoder()
    (fa,) = dec.feed(data)
    assert type(fa.payload) is memoryview and fa.payload.obj is data  # zero copy
    assert fa.payload.readonly
    (fb,) = dec.feed(b[50:])
    assert type(fb.payload) is memoryview
    owned = fb.payload.obj
    assert type(owned) is bytearray and len(owned) == 100  # exact size, owned by the frame
    assert bytes(fb.payload) == b"B" * 100
    # writable input gives writable zero-copy views
    buf = bytearray(a)
    (fw,) = core.FrameDecoder().feed(buf)
    assert fw.payload.obj is buf and not fw.payload.readonly


def test_small_payloads_copied_below_copy_below(core):
    """``copy_below``: a whole payload shorter than that comes as a bytes copy, a longer one as a
    view of the input, and one that spans feeds in its own buffer as before."""
    small = core.encode_frame(0x10, 0, 0, 3, b"s" * 64)
    exact = core.encode_frame(0x10, 0, 64, 3, b"e" * 100)
    big = core.encode_frame(0x10, 0, 164, 3, b"b" * 101)
    empty = core.encode_frame(0x11, 0, 0, 3)
    data = small + exact + big + empty
    dec = core.FrameDecoder(copy_below=101)
    fs, fe, fb, fa = dec.feed(data)  # payloads of 64, 100, 101 and 0 bytes
    assert type(fs.payload) is bytes and fs.payload == b"s" * 64
    assert type(fe.payload) is bytes and fe.payload == b"e" * 100
    assert type(fb.payload) is memoryview and fb.payload.obj is data
    assert type(fa.payload) is bytes and fa.payload == b""
    (fsplit,) = [*dec.feed(small[:40]), *dec.feed(small[40:])]
    assert type(fsplit.payload) is memoryview and bytes(fsplit.payload) == b"s" * 64
    assert dec.offset == len(data) + len(small)
    # the default copies nothing
    assert all(type(f.payload) is memoryview for f in core.FrameDecoder().feed(data))
    for bad in (-1, 2**32):
        with pytest.raises(ValueError, match=r"^copy_below must be in 0\.\.2\*\*32-1$"):
            core.FrameDecoder(copy_below=bad)
    with pytest.raises(TypeError):
        core.FrameDecoder(copy_below=1.5)


def test_non_byte_buffer_input(core):
    import array

    frame = core.encode_frame(0x10, 0, 1, 2, b"12345678")
    assert len(frame) % 4 == 0
    arr = array.array("I")
    arr.frombytes(frame)
    (f,) = core.FrameDecoder().feed(arr)
    assert as_tuple(f) == (0x10, 0, 1, 2, b"12345678")
    assert f.payload.format == "B"
    (g,) = core.FrameDecoder().feed(memoryview(frame + b"x" * len(frame))[::1][: len(frame)])
    assert bytes(g.payload) == b"12345678"


def test_empty_payload_at_end_of_feed(core):
    f = core.encode_frame(0x12, 0, 7, 8)
    dec = core.FrameDecoder()
    assert dec.feed(f[:10]) == []
    (got,) = dec.feed(f[10:])
    assert as_tuple(got) == (0x12, 0, 7, 8, b"")
    assert dec.feed(b"") == []


# -- decoding: errors ----------------------------------------------------------------------------


def expect_error(core, stream: bytes, cuts=(), max_payload=wire.DEFAULT_MAX_PAYLOAD):
    """Feed ``stream`` (split at ``cuts``) and feed_eof; return (frames, FrameError)."""
    dec = core.FrameDecoder(max_payload)
    got = []
    with pytest.raises(FrameError) as info:
        for c in split(stream, cuts):
            got.extend(dec.feed(c))
            assert dec.buffered <= HEADER_SIZE + max_payload
        dec.feed_eof()
    err = info.value
    # poisoned: every later call raises the same error
    with pytest.raises(FrameError) as again:
        dec.feed(b"")
    assert again.value is err
    with pytest.raises(FrameError) as again:
        dec.feed_eof()
    assert again.value is err
    return got, err


@pytest.mark.parametrize("t", [0x00, 0x06, 0x0F, 0x15, 0xFF])
def test_unknown_type(core, t):
    good = core.encode_frame(0x12)
    got, err = expect_error(core, good + raw_frame(t, 0, 1, 2, b"xy"), cuts=[len(good)])
    assert len(got) == 1
    assert (err.code, err.offset) == (errors.FRAME_ERR_TYPE, len(good))
    assert str(err) == f"unknown frame type 0x{t:02x} (frame at stream offset {len(good)})"


@pytest.mark.parametrize("reserved", [1, 0x100, 0xFFFF])
def test_reserved_set(core, reserved):
    _, err = expect_error(core, raw_frame(0x10, 0, 0, 0, b"", reserved=reserved), cuts=[3])
    assert (err.code, err.offset) == (errors.FRAME_ERR_RESERVED, 0)
    assert (
        str(err)
        == f"reserved header field is 0x{reserved:04x}, must be 0 (frame at stream offset 0)"
    )


@pytest.mark.parametrize("t,flags", [(0x10, 0x02), (0x10, 0x81), (0x11, 0x01), (0x01, 0xFF)])
def test_bad_flags(core, t, flags):
    _, err = expect_error(core, raw_frame(t, flags, 0, 0, b"abc"))
    assert err.code == errors.FRAME_ERR_FLAGS
    assert str(err).startswith(f"flags 0x{flags:02x} not allowed for frame type 0x{t:02x} (")


def test_oversize_rejected_at_header(core):
    """The length is checked as soon as the header is complete: nothing of the payload needed."""
    frame = core.encode_frame(0x10, 0, 0, 0, b"z" * 101)
    dec = core.FrameDecoder(100)
    with pytest.raises(FrameError) as info:
        dec.feed(frame[:HEADER_SIZE])
    err = info.value
    assert (err.code, err.offset) == (errors.FRAME_ERR_LENGTH, 0)
    assert str(err) == "payload length 101 exceeds the maximum of 100 (frame at stream offset 0)"
    assert dec.max_payload == 100
    # exactly max_payload is fine; so is max_payload=0 with empty payloads
    (f,) = core.FrameDecoder(101).feed(frame)
    assert len(f.payload) == 101
    assert len(core.FrameDecoder(0).feed(core.encode_frame(0x12))) == 1


def test_huge_length_field(core):
    _, err = expect_error(core, raw_frame(0x10, 0, 0, 0, b"", length=0xFFFFFFFF))
    assert err.code == errors.FRAME_ERR_LENGTH
    assert "payload length 4294967295 exceeds the maximum of 262144" in str(err)


def test_bad_checksum(core):
    good = raw_frame(0x10, 1, 5, 6, b"payload")
    bad = good[:24] + bytes([good[24] ^ 0x80]) + good[25:]
    want = struct.unpack(">I", bad[24:28])[0]
    real = struct.unpack(">I", good[24:28])[0]
    for cuts in ([], [30], [10, 30]):
        _, err = expect_error(core, bad, cuts)
        assert (err.code, err.offset) == (errors.FRAME_ERR_CHECKSUM, 0)
        assert str(err) == (
            f"checksum mismatch: frame says 0x{want:08x}, computed 0x{real:08x} "
            "(frame at stream offset 0)"
        )


def test_max_payload_validation(core):
    for bad in (-1, 2**32, 2**64):
        with pytest.raises(ValueError, match=r"^max_payload must be in 0\.\.2\*\*32-1$"):
            core.FrameDecoder(bad)
    assert core.FrameDecoder().max_payload == wire.DEFAULT_MAX_PAYLOAD
    assert core.FrameDecoder(2**32 - 1).max_payload == 2**32 - 1


@settings(max_examples=150)
@given(
    fs=st.lists(frames(max_payload=200), min_size=1, max_size=4),
    where=st.integers(0, 10**6),
    bit=st.integers(0, 7),
    cuts=st.lists(st.integers(0, 1000), max_size=6),
)
def test_bit_flip_always_detected(core, fs, where, bit, cuts):
    encoded = [core.encode_frame(*f) for f in fs]
    stream = bytearray(b"".join(encoded))
    where %= len(stream)
    stream[where] ^= 1 << bit
    # which frame and which field the flip hit
    start = 0
    for i, e in enumerate(encoded):  # noqa: B007 - i is used after the loop
        if where < start + len(e):
            break
        start += len(e)
    pos = where - start
    codes = {
        0: {errors.FRAME_ERR_TYPE, errors.FRAME_ERR_FLAGS, errors.FRAME_ERR_CHECKSUM},
        1: {errors.FRAME_ERR_FLAGS, errors.FRAME_ERR_CHECKSUM},
        2: {errors.FRAME_ERR_RESERVED},
        3: {errors.FRAME_ERR_RESERVED},
    }.get(pos, {errors.FRAME_ERR_CHECKSUM})
    if 4 <= pos < 8:
        codes = {errors.FRAME_ERR_LENGTH, errors.FRAME_ERR_CHECKSUM, errors.FRAME_ERR_TRUNCATED}
    got, err = expect_error(core, bytes(stream), cuts, max_payload=1000)
    assert err.code in codes
    assert err.offset == start
    assert [as_tuple(g) for g in got] == fs[: len(got)]
    assert len(got) <= i


@settings(max_examples=100)
@given(fs=st.lists(frames(max_payload=100), min_size=1, max_size=3), cut=st.integers(0, 10**6))
def test_truncated_stream(core, fs, cut):
    stream = b"".join(core.encode_frame(*f) for f in fs)
    cut %= len(stream)
    boundaries = {0}
    for f in fs:
        boundaries.add(max(boundaries) + HEADER_SIZE + len(f[4]))
    dec = core.FrameDecoder()
    got = dec.feed(stream[:cut])
    if cut in boundaries:
        dec.feed_eof()
        return
    frame_start = max(b for b in boundaries if b < cut)
    assert len(got) == sorted(boundaries).index(frame_start)
    with pytest.raises(FrameError) as info:
        dec.feed_eof()
    assert (info.value.code, info.value.offset) == (errors.FRAME_ERR_TRUNCATED, frame_start)
    assert dec.buffered == cut - frame_start


@settings(max_examples=150)
@given(
    data=st.binary(max_size=400),
    cuts=st.lists(st.integers(0, 400), max_size=5),
    max_payload=st.integers(0, 300),
)
def test_garbage_only_raises_frame_error(core, data, cuts, max_payload):
    dec = core.FrameDecoder(max_payload)
    try:
        for c in split(data, cuts):
            for f in dec.feed(c):
                assert len(f.payload) <= max_payload
            assert dec.buffered <= HEADER_SIZE + max_payload
        dec.feed_eof()
    except FrameError as e:
        assert 1 <= e.code <= 6 and 0 <= e.offset <= len(data)


@settings(max_examples=50)
@given(t=st.integers(0, 255), flags=st.integers(0, 255), reserved=st.integers(0, 0xFFFF))
def test_header_validation_order(core, t, flags, reserved):
    """type, then reserved, then flags, then length: the first failing check wins."""
    assume(t not in ALLOWED_FLAGS or reserved or flags & ~ALLOWED_FLAGS[t])
    frame = raw_frame(t, flags, 1, 2, b"", reserved=reserved, length=10**6)
    _, err = expect_error(core, frame, max_payload=10)
    if t not in ALLOWED_FLAGS:
        assert err.code == errors.FRAME_ERR_TYPE
    elif reserved:
        assert err.code == errors.FRAME_ERR_RESERVED
    else:
        assert err.code == errors.FRAME_ERR_FLAGS


def test_error_is_frame_error_and_value_error(core):
    _, err = expect_error(core, b"\x00" * 28)
    assert isinstance(err, FrameError) and isinstance(err, ValueError)
    assert isinstance(err, errors.IcafastError)
