"""Bounded fuzzing of everything that reads bytes from the network (docs/FUZZING.md).

The invariants, for any input:

* ``FrameDecoder.feed``/``feed_eof`` return frames or raise ``FrameError`` -- never another
  exception; a failed decoder stays failed; it holds less than ``HEADER_SIZE + max_payload``
  bytes and allocates in proportion to what it was fed, not to what a length field claims;
  valid streams round-trip under any split.
* ``ServerHandshake`` never raises: bad input becomes ``HandshakeFailed`` plus a REJECT; its
  output is bounded.
* ``ClientSession``/``ServerSession`` never raise from ``receive_data``/``handle_timer``; a link
  they drop is reported (``LinkLost``, ``HandshakeRejected`` or ``SessionClosed``); what they
  deliver is always a prefix of what the peer sent (corruption is caught, never delivered); and
  after any corruption the session heals to deliver every byte exactly once.

The decoder tests run over both cores (``core`` fixture); the engine tests run the engine on each
core in turn.
"""

from __future__ import annotations

import contextlib
import struct
import tracemalloc
from pathlib import Path

import google_crc32c
import pytest
from engine_harness import Harness
from hypothesis import given, settings
from hypothesis import strategies as st

from icafast import events as ev
from icafast import protocol
from icafast.errors import (
    FRAME_ERR_CHECKSUM,
    FRAME_ERR_FLAGS,
    FRAME_ERR_LENGTH,
    FRAME_ERR_RESERVED,
    FRAME_ERR_TRUNCATED,
    FRAME_ERR_TYPE,
    FrameError,
)
from icafast.protocol import (
    MAGIC,
    ClientSession,
    Config,
    ServerHandshake,
)
from icafast.wire import ALLOWED_FLAGS, DEFAULT_MAX_PAYLOAD, FLAG_FIN, HEADER_SIZE, FrameType

ROOT = Path(__file__).resolve().parents[1]
U64 = 2**64 - 1
U32 = 2**32 - 1

CFG = Config(frame_size=100, replay_limit=4096, keepalive_interval=1.0, dead_timeout=3.0,
             reliability_timeout=30.0, handshake_timeout=5.0)

_HDR = struct.Struct(">BBHIQQ")
# docs/PROTOCOL.md 3.1: magic, min/max version, max payload, replay limit, nonce
_HELLO = struct.Struct(">8sHHIQ32s")
_RESUME = struct.Struct(">16s32s")


# -- frames, built independently of both cores ----------------------------------------------


def raw_frame(type, flags=0, seq=0, ack=0, payload=b"", *, reserved=0, length=None, crc=None):
    """A frame with any field values; a correct checksum unless ``crc`` is given."""
    head = _HDR.pack(type, flags, reserved, len(payload) if length is None else length, seq, ack)
    if crc is None:
        crc = google_crc32c.extend(google_crc32c.value(head), payload)
    return head + struct.pack(">I", crc) + payload


def reference_decode(stream: bytes, max_payload: int):
    """(frames, error code or None, error offset) of a whole stream that then ends; a direct
    reading of docs/PROTOCOL.md 2.6 (checks in order type, reserved, flags, length, checksum)."""
    frames = []
    pos = 0
    n = len(stream)
    while pos < n:
        if n - pos < HEADER_SIZE:
            return frames, FRAME_ERR_TRUNCATED, pos
        t, flags, reserved, length, seq, ack = _HDR.unpack_from(stream, pos)
        (crc,) = struct.unpack_from(">I", stream, pos + 24)
        if t not in ALLOWED_FLAGS:
            return frames, FRAME_ERR_TYPE, pos
        if reserved:
            return frames, FRAME_ERR_RESERVED, pos
        if flags & ~ALLOWED_FLAGS[t]:
            return frames, FRAME_ERR_FLAGS, pos
        if length > max_payload:
            return frames, FRAME_ERR_LENGTH, pos
        end = pos + HEADER_SIZE + length
        if end > n:
            return frames, FRAME_ERR_TRUNCATED, pos
        payload = stream[pos + HEADER_SIZE : end]
        if google_crc32c.extend(google_crc32c.value(stream[pos : pos + 24]), payload) != crc:
            return frames, FRAME_ERR_CHECKSUM, pos
        frames.append((t, flags, seq, ack, payload))
        pos = end
    return frames, None, pos


def frame_starts(data: bytes) -> list[int]:
    """Offsets of the headers in ``data``, walking length fields (however broken)."""
    starts = []
    pos = 0
    while pos + HEADER_SIZE <= len(data):
        starts.append(pos)
        pos += HEADER_SIZE + int.from_bytes(data[pos + 4 : pos + 8], "big")
    return starts


# -- mutations ----------------------------------------------------------------------------------

LENGTHS = st.sampled_from([0, 1, 27, 28, 48, 255, 1023, 1024, 65535, DEFAULT_MAX_PAYLOAD,
                           DEFAULT_MAX_PAYLOAD + 1, 2**31, U32 - 1, U32]) | st.integers(0, U32)
POS = st.integers(0, 2**16)

#: Mutations a broken network or a broken peer could apply to a byte stream.
MUTATION = st.one_of(
    st.tuples(st.just("flip"), POS, st.integers(0, 7)),
    st.tuples(st.just("set"), POS, st.integers(0, 255)),
    st.tuples(st.just("truncate"), POS),
    st.tuples(st.just("delete"), POS, st.integers(1, 80)),
    st.tuples(st.just("insert"), POS, st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("splice"), POS, st.integers(1, 300), POS),  # copy a range elsewhere
    st.tuples(st.just("length"), POS, LENGTHS),  # edit a header's length field
    st.tuples(st.just("dup_frame"), POS, POS),  # copy a whole frame to a frame boundary
    st.tuples(st.just("drop_frame"), POS),
    st.tuples(st.just("swap_frames"), POS, POS),
)
#: Also re-checksums a header: a peer that speaks the frame format but sends nonsense.
RECRC = st.tuples(st.just("recrc"), POS)


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op in ops:
        kind = op[0]
        n = len(b)
        starts = frame_starts(bytes(b))
        if kind == "flip" and n:
            b[op[1] % n] ^= 1 << op[2]
        elif kind == "set" and n:
            b[op[1] % n] = op[2]
        elif kind == "truncate":
            del b[op[1] % (n + 1) :]
        elif kind == "delete" and n:
            i = op[1] % n
            del b[i : i + op[2]]
        elif kind == "insert":
            i = op[1] % (n + 1)
            b[i:i] = op[2]
        elif kind == "splice" and n:
            i = op[1] % n
            j = op[3] % (n + 1)
            b[j:j] = b[i : i + op[2]]
        elif kind == "length" and starts:
            s = starts[op[1] % len(starts)]
            b[s + 4 : s + 8] = op[2].to_bytes(4, "big")
        elif kind in ("dup_frame", "drop_frame", "swap_frames", "recrc") and starts:
            bounds = [*starts, max(n, starts[-1])]
            frames = [bytes(b[x:y]) for x, y in zip(bounds, bounds[1:], strict=False)]
            k = op[1] % len(frames)
            if kind == "dup_frame":
                frames.insert(op[2] % (len(frames) + 1), frames[k])
            elif kind == "drop_frame":
                del frames[k]
            elif kind == "swap_frames":
                j = op[2] % len(frames)
                frames[k], frames[j] = frames[j], frames[k]
            else:
                f = frames[k]
                length = int.from_bytes(f[4:8], "big")
                crc = google_crc32c.extend(google_crc32c.value(f[:24]), f[28 : 28 + length])
                frames[k] = f[:24] + struct.pack(">I", crc) + f[28:]
            b = bytearray(b"".join(frames))
    return bytes(b)


def split(data: bytes, cuts) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


CUTS = st.lists(st.integers(0, 2**16), max_size=12)


@st.composite
def frame_specs(draw, max_payload=300):
    t = int(draw(st.sampled_from(list(FrameType))))
    flags = draw(st.sampled_from([0, FLAG_FIN])) if t == FrameType.DATA else 0
    nums = st.sampled_from([0, 1, 2**32, U64 - 1, U64]) | st.integers(0, U64)
    return (t, flags, draw(nums), draw(nums), draw(st.binary(max_size=max_payload)))


# -- the frame decoder ---------------------------------------------------------------------------


def run_decoder(core, chunks, max_payload, eof=True):
    """Feed ``chunks`` checking the decoder's invariants; (frames, error code, error offset)."""
    dec = core.FrameDecoder(max_payload)
    frames = []
    fed = 0
    err = None
    try:
        for c in chunks:
            got = dec.feed(c)
            fed += len(c)
            # payloads may point into ``c``: copy them before anything else
            frames.extend((f.type, f.flags, f.seq, f.ack, bytes(f.payload)) for f in got)
            # never more than one header and one payload (in fact less: a whole frame is returned)
            assert 0 <= dec.buffered < HEADER_SIZE + max_payload
            assert dec.offset == sum(HEADER_SIZE + len(f[4]) for f in frames)
            assert dec.offset + dec.buffered == fed  # every byte is in a frame or buffered
        if eof:
            dec.feed_eof()
    except FrameError as e:
        err = e
    if err is None:
        return frames, None, dec.offset
    # a failed decoder stays failed, with the same error
    for again in (lambda: dec.feed(b""), lambda: dec.feed(b"\x10" * 40), dec.feed_eof):
        with pytest.raises(FrameError) as info:
            again()
        assert (info.value.code, info.value.offset, str(info.value)) == (
            err.code, err.offset, str(err))
    return frames, err.code, err.offset


def check_decoder(core, stream, cuts, max_payload):
    want_frames, want_code, want_offset = reference_decode(stream, max_payload)
    frames, code, offset = run_decoder(core, split(stream, cuts), max_payload)
    assert (code, offset) == (want_code, want_offset)
    if code is None:
        assert frames == want_frames
    else:  # frames completed by the call that raised are not returned (the link is dropped)
        assert frames == want_frames[: len(frames)]


@settings(max_examples=150)
@given(data=st.binary(max_size=400), cuts=CUTS,
       max_payload=st.sampled_from([0, 1, 48, 300, DEFAULT_MAX_PAYLOAD, U32]))
def test_decoder_arbitrary_bytes(core, data, cuts, max_payload):
    check_decoder(core, data, cuts, max_payload)


@settings(max_examples=150)
@given(data=st.binary(max_size=200), cuts=CUTS, head=st.lists(frame_specs(60), max_size=3),
       typ=st.sampled_from(sorted(ALLOWED_FLAGS)))
def test_decoder_plausible_header_then_garbage(core, data, cuts, head, typ):
    # a valid prefix, then bytes that start like a header (a known type byte, zero reserved)
    stream = b"".join(raw_frame(*f) for f in head) + bytes([typ, 0, 0, 0]) + data
    check_decoder(core, stream, cuts, 300)


@settings(max_examples=250)
@given(specs=st.lists(frame_specs(), min_size=1, max_size=6),
       ops=st.lists(MUTATION | RECRC, max_size=4), cuts=CUTS,
       max_payload=st.sampled_from([300, DEFAULT_MAX_PAYLOAD, U32]))
def test_decoder_mutated_streams(core, specs, ops, cuts, max_payload):
    stream = b"".join(raw_frame(*f) for f in specs)
    bad = mutate(stream, ops)
    check_decoder(core, bad, cuts, max_payload)
    if bad == stream:  # no-op mutations: the round trip holds
        frames, code, _ = run_decoder(core, split(bad, cuts), max_payload)
        assert code is None and frames == [tuple(f) for f in specs]


@settings(max_examples=100)
@given(specs=st.lists(frame_specs(), max_size=8), cuts=CUTS)
def test_decoder_roundtrip_under_any_split(core, specs, cuts):
    stream = b"".join(core.encode_frame(*f) for f in specs)
    assert stream == b"".join(raw_frame(*f) for f in specs)
    frames, code, offset = run_decoder(core, split(stream, cuts), DEFAULT_MAX_PAYLOAD)
    assert code is None and offset == len(stream)
    assert frames == [tuple(f) for f in specs]


# -- the engine on each core ---------------------------------------------------------------------

_ENGINE_NAMES = ("FrameDecoder", "ReplayBuffer", "encode_header", "encode_frame")


@contextlib.contextmanager
def engine_on(core):
    """Run the session engine on ``core`` (it binds the core's names at import)."""
    saved = {n: getattr(protocol, n) for n in _ENGINE_NAMES}
    try:
        for n in _ENGINE_NAMES:
            setattr(protocol, n, getattr(core, n))
        assert type(ClientSession(CFG, 0.0).tx) is core.ReplayBuffer, "engine ignores the patch"
        yield
    finally:
        for n, v in saved.items():
            setattr(protocol, n, v)


def pattern(tag: int, n: int, start: int = 0) -> bytes:
    return bytes((tag * 31 + i * 7 + (i >> 8)) & 0xFF for i in range(start, start + n))


def events_of(kind, events):
    return [e for e in events if isinstance(e, kind)]


# -- memory: a length field claiming 4 GB ----------------------------------------------------------

def traced_peak(fn) -> int:
    """Peak bytes Python allocated while running ``fn`` (tracemalloc)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("length", [U32, U32 - 27, 2**31, 64 * 1024 * 1024])
def test_decoder_memory_follows_bytes_received_not_length_claims(core, length):
    head = raw_frame(FrameType.DATA, length=length)[:HEADER_SIZE]
    # default limit: refused from the header alone
    dec = core.FrameDecoder()
    with pytest.raises(FrameError) as info:
        dec.feed(head)
    assert info.value.code == FRAME_ERR_LENGTH
    # the largest limit the wire allows: the claim is believed, but memory follows what arrives
    dec = core.FrameDecoder(U32)
    chunk = bytes(range(256)) * 256  # 64 KiB

    def feed():
        assert dec.feed(head) == []
        for _ in range(16):
            assert dec.feed(chunk) == []

    peak = traced_peak(feed)
    assert dec.buffered == HEADER_SIZE + 16 * len(chunk)
    assert peak < 4 * 1024 * 1024, f"{peak} bytes allocated for 1 MiB received"
    with pytest.raises(FrameError) as info:
        dec.feed_eof()
    assert info.value.code == FRAME_ERR_TRUNCATED


BIG = Config(frame_size=100, replay_limit=4096, keepalive_interval=1.0, dead_timeout=3.0,
             max_payload=U32)


def test_handshake_memory_with_4gb_length_claim(core):
    """A 28-byte header claiming 4 GB costs what arrives, not what it claims."""
    with engine_on(core):
        hs = ServerHandshake(BIG, 0.0)
        head = raw_frame(FrameType.HELLO, length=U32)[:HEADER_SIZE]
        peak = traced_peak(lambda: hs.receive_data(head + b"\0" * 65536, 0.0))
        assert peak < 1024 * 1024, peak
        assert not hs.done
        hs.handle_timer(BIG.handshake_timeout)
        assert events_of(ev.HandshakeFailed, list(iter(hs.next_event, None)))


@pytest.mark.parametrize("fuzz_client", [True, False])
def test_session_memory_with_4gb_length_claim(core, fuzz_client):
    with engine_on(core):
        h = Harness(BIG)
        h.open_link()
        h.pump()
        engine = h.client if fuzz_client else h.server
        head = raw_frame(FrameType.DATA, 0, 0, 0, length=U32)[:HEADER_SIZE]
        chunk = b"x" * 65536
        link = engine.link_id

        def feed():
            engine.receive_data(head, h.now)
            for _ in range(16):
                engine.receive_data(chunk, h.now)

        peak = traced_peak(feed)
        assert peak < 4 * 1024 * 1024, f"{peak} bytes allocated for 1 MiB received"
        assert engine.link_id == link  # still waiting for the rest of the frame
        h.advance(BIG.dead_timeout)  # the claimed 4 GB never arrive: the link dies, and says so
        events = h.client_events if fuzz_client else h.server_events
        assert [e for e in events_of(ev.LinkLost, events) if e.link_id == link]


def client_hello(vmin=1, vmax=1, max_payload=DEFAULT_MAX_PAYLOAD, limit=8 << 20,
                 nonce=b"\x11" * 32, magic=MAGIC) -> bytes:
    payload = _HELLO.pack(magic, vmin, vmax, max_payload, limit, nonce)
    return raw_frame(FrameType.HELLO, 0, 0, 0, payload)


# The largest thing a ServerHandshake ever writes: its HELLO, then one REJECT.
HS_OUTPUT_MAX = (HEADER_SIZE + _HELLO.size) + (HEADER_SIZE + 2 + 256)


def check_server_handshake(hs: ServerHandshake, chunks, now=0.0):
    """Feed ``chunks`` (must not raise) and check what the handshake says and writes."""
    events = []
    out = b""
    for c in chunks:
        hs.receive_data(c, now)
        out += b"".join(bytes(x) for x in hs.data_to_send())
        events.extend(iter(hs.next_event, None))
    if not hs.done:
        assert hs.get_timer() is not None
        hs.handle_timer(hs.get_timer())
        out += b"".join(bytes(x) for x in hs.data_to_send())
        events.extend(iter(hs.next_event, None))
    assert hs.done and hs.get_timer() is None
    assert len(out) <= HS_OUTPUT_MAX
    frames, code, _ = reference_decode(out, DEFAULT_MAX_PAYLOAD)
    assert code is None
    types = [f[0] for f in frames]
    assert types in ([], [FrameType.HELLO], [FrameType.REJECT],
                     [FrameType.HELLO, FrameType.REJECT]), types
    requests = events_of((ev.NewSessionRequested, ev.ResumeRequested), events)
    failed = events_of(ev.HandshakeFailed, events)
    assert len(requests) <= 1 and len(failed) <= 1
    assert len(requests) + len(failed) >= 1, "the handshake ended without saying how"
    # every REJECT it sends comes with HandshakeFailed, so that the connection gets closed
    assert (types[-1:] == [FrameType.REJECT]) == bool(failed)
    return events, frames


@settings(max_examples=150)
@given(data=st.binary(max_size=300), cuts=CUTS)
def test_server_handshake_arbitrary_bytes(core, data, cuts):
    with engine_on(core):
        check_server_handshake(ServerHandshake(CFG, 0.0), split(data, cuts))


@settings(max_examples=200)
@given(second=st.sampled_from(["new", "resume", "none"]), ops=st.lists(MUTATION, max_size=3),
       tail=st.lists(frame_specs(60), max_size=2), cuts=CUTS)
def test_server_handshake_mutated_client_handshake(core, second, ops, tail, cuts):
    stream = client_hello()
    if second == "new":
        stream += raw_frame(FrameType.NEW)
    elif second == "resume":
        stream += raw_frame(FrameType.RESUME, 0, 0, 77, _RESUME.pack(b"i" * 16, b"p" * 32))
    stream += b"".join(raw_frame(*f) for f in tail)
    with engine_on(core):
        events, _ = check_server_handshake(ServerHandshake(CFG, 0.0),
                                           split(mutate(stream, ops), cuts))
    if not ops and not tail and second != "none":
        assert events_of((ev.NewSessionRequested, ev.ResumeRequested), events)


HELLO_FIELDS = st.tuples(
    st.sampled_from([MAGIC, b"ICAFAST\x01", b"\0" * 8]),
    st.sampled_from([0, 1, 2, 0xFFFF]),
    st.sampled_from([0, 1, 2, 0xFFFF]),
    st.sampled_from([0, 1, 1023, 1024, DEFAULT_MAX_PAYLOAD, U32]),
    st.sampled_from([0, 1023, 1024, 8 << 20, U64]),
)


@st.composite
def handshake_frame(draw):
    """A well-checksummed frame a confused or hostile client might send during the handshake."""
    t = int(draw(st.just(FrameType.HELLO) | st.sampled_from(list(FrameType))))
    kind = draw(st.sampled_from(["hello", "resume", "empty", "random"]))
    if kind == "hello":
        payload = _HELLO.pack(*draw(HELLO_FIELDS), b"n" * 32)
        # shorter is an error; longer is allowed (later versions may append fields)
        payload = payload[: draw(st.sampled_from([56, 55, 48, 0]))] + draw(
            st.sampled_from([b"", b"\0" * 8, bytes(range(200))]))
    elif kind == "resume":
        payload = _RESUME.pack(draw(st.binary(min_size=16, max_size=16)), b"p" * 32)
    elif kind == "empty":
        payload = b""
    else:
        payload = draw(st.binary(max_size=80))
    flags = draw(st.sampled_from([0, FLAG_FIN])) if t == FrameType.DATA else 0
    return raw_frame(t, flags, draw(st.integers(0, U64)), draw(st.integers(0, U64)), payload)


@settings(max_examples=200)
@given(frames=st.lists(handshake_frame(), min_size=1, max_size=4), cuts=CUTS)
def test_server_handshake_well_formed_nonsense(core, frames, cuts):
    with engine_on(core):
        check_server_handshake(ServerHandshake(CFG, 0.0), split(b"".join(frames), cuts))


def test_server_handshake_version_mismatch_fails_the_handshake(core):
    # REJECT 1 is sent *instead of* the HELLO, and the server closes (docs/PROTOCOL.md 3.5)
    with engine_on(core):
        events, frames = check_server_handshake(ServerHandshake(CFG, 0.0),
                                                [client_hello(vmin=2, vmax=9)])
    assert [f[0] for f in frames] == [FrameType.REJECT]
    assert int.from_bytes(frames[0][4][:2], "big") == protocol.REJECT_VERSION
    assert [type(e) for e in events] == [ev.HandshakeFailed]
