"""Bounded fuzzing of everything that reads bytes from the network (docs/FUZZING.md).

The invariants, for any input:

* ``FrameDecoder.feed``/``feed_eof`` return frames or raise ``FrameError`` -- never another
  exception; a failed decoder stays failed; it holds less than ``HEADER_SIZE + max_payload``
  bytes and allocates in proportion to what it was fed, not to what a length field claims;
  valid streams round-trip under any split.
* ``ServerHandshake`` never raises: bad input becomes ``HandshakeFailed`` plus a REJECT (a
  timeout, ``HandshakeFailed`` alone); its output is bounded.
* ``ClientSession``/``ServerSession`` never raise from ``receive_data``/``handle_timer``; a link
  they drop is reported (``LinkLost``, ``HandshakeRejected`` or ``SessionClosed``); what they
  deliver is always a prefix of what the peer sent (corruption is caught, never delivered); and
  after any corruption the session heals to deliver every byte exactly once.

The decoder tests run over both cores (``core`` fixture); the engine tests run the engine on each
core in turn. The scenarios live in ``fuzz_scenarios.py``, shared with the atheris harnesses in
``fuzz/`` (long runs); a short run of each harness is at the end of this file.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from engine_harness import Harness
from fuzz_scenarios import (
    ANCHORS,
    CFG,
    HELLO,
    RESUME,
    U32,
    U64,
    check_decoder,
    check_server_handshake,
    client_handshake_stream,
    client_hello,
    engine_on,
    events_of,
    mutate,
    raw_frame,
    run_decoder,
    scenario_client_handshake,
    scenario_corrupted_stream,
    scenario_fast_receive,
    scenario_nonsense,
    split,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

from icafast import events as ev
from icafast import protocol
from icafast.errors import FRAME_ERR_LENGTH, FRAME_ERR_TRUNCATED, FrameError
from icafast.protocol import MAGIC, Config, ServerHandshake
from icafast.wire import (
    ALLOWED_FLAGS,
    DEFAULT_MAX_PAYLOAD,
    FLAG_FIN,
    HEADER_SIZE,
    MAX_OFFSET,
    FrameType,
)

ROOT = Path(__file__).resolve().parents[1]

# -- strategies ----------------------------------------------------------------------------------

LENGTHS = st.sampled_from([0, 1, 27, 28, 56, 255, 1023, 1024, 65535, DEFAULT_MAX_PAYLOAD,
                           DEFAULT_MAX_PAYLOAD + 1, 2**31, U32 - 1, U32]) | st.integers(0, U32)
POS = st.integers(0, 2**16)

#: Mutations a broken network or a broken peer could apply to a byte stream.
MUTATION = st.one_of(
    st.tuples(st.just("flip"), POS, st.integers(0, 7)),
    st.tuples(st.just("set"), POS, st.integers(0, 255)),
    st.tuples(st.just("truncate"), POS),
    st.tuples(st.just("delete"), POS, st.integers(1, 80)),
    st.tuples(st.just("insert"), POS, st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("splice"), POS, st.integers(1, 300), POS),
    st.tuples(st.just("length"), POS, LENGTHS),
    st.tuples(st.just("dup_frame"), POS, POS),
    st.tuples(st.just("drop_frame"), POS),
    st.tuples(st.just("swap_frames"), POS, POS),
)
#: Re-checksums a frame: a peer that speaks the frame format but sends nonsense.
RECRC = st.tuples(st.just("recrc"), POS)

CUTS = st.lists(st.integers(0, 2**16), max_size=12)
SEED = st.integers(0, 2**16)


@st.composite
def frame_specs(draw, max_payload=300):
    t = int(draw(st.sampled_from(list(FrameType))))
    flags = draw(st.sampled_from([0, FLAG_FIN])) if t == FrameType.DATA else 0
    nums = st.sampled_from([0, 1, 2**32, U64 - 1, U64]) | st.integers(0, U64)
    return (t, flags, draw(nums), draw(nums), draw(st.binary(max_size=max_payload)))


# -- the frame decoder ---------------------------------------------------------------------------


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


@pytest.mark.parametrize(("length", "flags", "ok"), [
    (4, 0, True),  # ends at the last offset: its ack is the last offset
    (3, FLAG_FIN, True),  # ... and so does a FIN right before it
    (4, FLAG_FIN, False),  # a FIN at the last offset: its ack would pass 64 bits
    (5, 0, False),  # bytes past the last offset
])
def test_data_past_the_last_64_bit_offset_is_refused(core, length, flags, ok):
    """Offsets fit 64 bits (PROTOCOL.md 4.1); the compiled engine keeps them in 64-bit C
    fields, so a frame that would pass the last one must fail the link, in either engine,
    rather than wrap around."""
    with engine_on(core):
        h = Harness(BIG)
        h.open_link()
        h.pump()
        s = h.server
        s._rx = s._rx_acked = MAX_OFFSET - 4
        s.receive_data(protocol.encode_frame(FrameType.DATA, flags, MAX_OFFSET - 4, 0,
                                             b"x" * length), h.now)
        events = list(iter(s.next_event, None))
        lost = events_of(ev.LinkLost, events)
        if ok:
            assert not lost
            assert s._rx == MAX_OFFSET  # (both end there, the FIN counted)
        else:
            assert lost and "last 64-bit offset" in lost[0].reason, events
            assert s._rx == MAX_OFFSET - 4  # nothing of it taken


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


# -- the server handshake ------------------------------------------------------------------------


@settings(max_examples=150)
@given(data=st.binary(max_size=300), cuts=CUTS)
def test_server_handshake_arbitrary_bytes(core, data, cuts):
    with engine_on(core):
        check_server_handshake(ServerHandshake(CFG, 0.0), split(data, cuts))


@settings(max_examples=200)
@given(second=st.sampled_from(["new", "resume", "none"]), ops=st.lists(MUTATION, max_size=3),
       tail=st.lists(frame_specs(60), max_size=2), cuts=CUTS)
def test_server_handshake_mutated_client_handshake(core, second, ops, tail, cuts):
    stream = client_handshake_stream(second, [raw_frame(*f) for f in tail])
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
        payload = HELLO.pack(*draw(HELLO_FIELDS), b"n" * 32)
        # shorter is an error; longer is allowed (later versions may append fields)
        payload = payload[: draw(st.sampled_from([56, 55, 48, 0]))] + draw(
            st.sampled_from([b"", b"\0" * 8, bytes(range(200))]))
    elif kind == "resume":
        payload = RESUME.pack(draw(st.binary(min_size=16, max_size=16)), b"p" * 32)
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


# -- sessions fed corrupted streams ---------------------------------------------------------------

#: What the peer does before what it sent is corrupted: send, receive (so it acks), let time
#: pass (keepalives), end its stream.
PEER_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(1, 500)),
        st.tuples(st.just("recv"), st.integers(1, 500)),
        st.tuples(st.just("tick"), st.integers(0, 700)),
        st.tuples(st.just("fin"), st.just(0)),
    ),
    max_size=8,
)


@settings(max_examples=120)
@given(fuzz_client=st.booleans(), ops=PEER_OPS, mutations=st.lists(MUTATION, max_size=4),
       cuts=CUTS, seed=SEED)
def test_session_fed_corrupted_stream_never_delivers_corruption(core, fuzz_client, ops,
                                                                mutations, cuts, seed):
    scenario_corrupted_stream(fuzz_client, ops, mutations, cuts, seed, core)


@settings(max_examples=80)
@given(resume=st.booleans(), accept_phase=st.booleans(),
       mutations=st.lists(MUTATION, max_size=3), cuts=CUTS, seed=SEED)
def test_client_handshake_fed_corrupted_replies(core, resume, accept_phase, mutations, cuts,
                                                seed):
    scenario_client_handshake(resume, accept_phase, mutations, cuts, seed, core)


# -- sessions fed well-formed nonsense -------------------------------------------------------------

NONSENSE_FRAME = st.tuples(
    st.just("frame"),
    st.sampled_from(list(FrameType)),
    st.booleans(),  # FIN (DATA only)
    st.tuples(st.sampled_from(ANCHORS), st.integers(-3, 3)),  # seq
    st.tuples(st.sampled_from(ANCHORS), st.integers(-3, 3)),  # ack
    st.one_of(st.binary(max_size=120), st.sampled_from([b"", b"\0", b"\0\0", b"\0\0bye"])),
)
NONSENSE_OP = st.one_of(
    NONSENSE_FRAME,
    st.tuples(st.just("tick"), st.integers(0, 4000)),
    st.tuples(st.just("send"), st.integers(1, 300)),
)


@settings(max_examples=120)
@given(fuzz_client=st.booleans(), ops=st.lists(NONSENSE_OP, max_size=12), seed=SEED)
def test_session_fed_well_formed_nonsense(core, fuzz_client, ops, seed):
    scenario_nonsense(fuzz_client, ops, seed, core)


#: Frames as in NONSENSE_OP, plus a cut (split over two receives); and, mostly, the relay's usual
#: frame: DATA in order, acking what was sent, sometimes a little off.
_ANY_FRAME = st.tuples(NONSENSE_FRAME, st.integers(0, 40)).map(lambda fc: (*fc[0], fc[1]))
_USUAL_FRAME = st.tuples(
    st.just("frame"),
    st.sampled_from([FrameType.DATA] * 8 + [FrameType.PING, FrameType.ACK]),
    st.just(False),
    st.just(("rx", 0)),
    st.tuples(st.sampled_from(["tx_start", "tx_end"]), st.just(0)),
    st.binary(min_size=1, max_size=120),
    st.sampled_from([0] * 9 + [10, 30]),
)
_OFF_FRAME = st.tuples(  # ... or a little off: empty, FIN, a gap, an ack past what was sent
    st.just("frame"),
    st.just(FrameType.DATA),
    st.booleans(),
    st.tuples(st.just("rx"), st.integers(-1, 1)),
    st.tuples(st.sampled_from(["tx_start", "tx_end", "tx_end+1"]), st.integers(-1, 1)),
    st.binary(max_size=20),
    st.just(0),
)
_FAST_OPS = {
    "usual": _USUAL_FRAME,
    "off": _OFF_FRAME,
    "any": _ANY_FRAME,
    "send": st.tuples(st.just("send"), st.integers(1, 300)),
    "send_small": st.tuples(st.just("send"), st.integers(1, 90)),  # (one frame: CFG.frame_size)
    "tick": st.tuples(st.just("tick"), st.integers(0, 1500)),
    "backlog": st.tuples(st.just("backlog"), st.integers(0, 400)),
}
FAST_OP = st.sampled_from(
    ["usual"] * 12 + ["off", "any", "send", "send_small", "send_small", "tick", "tick", "backlog"],
).flatmap(_FAST_OPS.__getitem__)


@settings(max_examples=150)
@given(fuzz_client=st.booleans(), ops=st.lists(FAST_OP, max_size=20), seed=SEED)
# Found by a randomized run: stream bytes read after the peer's CLOSE were framed by the send
# shortcut, which did not check that the session was closed (data_to_send does).
@example(fuzz_client=False, seed=0, ops=[
    ("frame", FrameType.DATA, False, ("rx", 0), ("tx_start", 0), b"\x00", 0),
    ("frame", FrameType.CLOSE, False, ("zero", 0), ("zero", 0), b"\x00\x00", 0),
    ("send", 1)])
def test_relay_receive_shortcut_matches_receive_data(core, fuzz_client, ops, seed):
    scenario_fast_receive(fuzz_client, ops, seed, core)


# -- the atheris harnesses (fuzz/), a short bounded run each -------------------------------------


@pytest.mark.parametrize("harness", ["fuzz_decoder.py", "fuzz_engine.py"])
def test_atheris_harness_smoke(harness, tmp_path):
    if importlib.util.find_spec("atheris") is None:
        pytest.skip(f"atheris is not installed: fuzz/{harness} NOT run "
                    "(pip install atheris; wheels exist for CPython on Linux x86-64)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [sys.executable, str(ROOT / "fuzz" / harness), "-atheris_runs=2000", "-seed=1",
           f"-artifact_prefix={tmp_path}{os.sep}", "-rss_limit_mb=2048"]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"fuzz/{harness}: 2000 runs took more than 120 s\n{e.stderr}")
    assert proc.returncode == 0, (
        f"fuzz/{harness} found a crash:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    assert not list(tmp_path.glob("crash-*")), proc.stderr[-6000:]
