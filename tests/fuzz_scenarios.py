"""Fuzzing scenarios shared by tests/test_fuzz.py (hypothesis) and fuzz/*.py (atheris).

Each ``check_*``/``scenario_*`` function takes plain values (bytes, lists of small tuples, ints),
runs the code under test and asserts its invariants (docs/FUZZING.md); an ``AssertionError`` or
any exception escaping is a finding. Frames and the reference decoder are built here from the
wire format alone (google-crc32c), independently of both cores.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import struct
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import google_crc32c
from engine_harness import Harness

from icafast import _impl, protocol
from icafast import events as ev
from icafast._impl import compiled_modules
from icafast.errors import (
    FRAME_ERR_CHECKSUM,
    FRAME_ERR_FLAGS,
    FRAME_ERR_LENGTH,
    FRAME_ERR_RESERVED,
    FRAME_ERR_TRUNCATED,
    FRAME_ERR_TYPE,
    FrameError,
)
from icafast.protocol import MAGIC, Config, ServerHandshake, State
from icafast.wire import ALLOWED_FLAGS, DEFAULT_MAX_PAYLOAD, FLAG_FIN, HEADER_SIZE, FrameType

U32 = 2**32 - 1
U64 = 2**64 - 1

#: Small frames and buffers, so that short inputs reach every state.
CFG = Config(frame_size=100, replay_limit=4096, keepalive_interval=1.0, dead_timeout=3.0,
             reliability_timeout=30.0, handshake_timeout=5.0)

_HDR = struct.Struct(">BBHIQQ")
#: docs/PROTOCOL.md 3.1: magic, min/max version, max payload, replay limit, nonce
HELLO = struct.Struct(">8sHHIQ32s")
RESUME = struct.Struct(">16s32s")


# -- frames, built independently of both cores ----------------------------------------------


def raw_frame(type: int, flags: int = 0, seq: int = 0, ack: int = 0, payload: bytes = b"", *,
              reserved: int = 0, length: int | None = None, crc: int | None = None) -> bytes:
    """A frame with any field values; a correct checksum unless ``crc`` is given."""
    head = _HDR.pack(type, flags, reserved, len(payload) if length is None else length, seq, ack)
    if crc is None:
        crc = google_crc32c.extend(google_crc32c.value(head), payload)
    return head + struct.pack(">I", crc) + payload


def client_hello(vmin: int = 1, vmax: int = 1, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 limit: int = 8 << 20, nonce: bytes = b"\x11" * 32, magic: bytes = MAGIC) -> bytes:
    return raw_frame(FrameType.HELLO, 0, 0, 0, HELLO.pack(magic, vmin, vmax, max_payload, limit,
                                                          nonce))


def reference_decode(stream: bytes, max_payload: int) -> tuple[list[tuple], int | None, int]:
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


# -- mutations ----------------------------------------------------------------------------------

#: Mutation kinds and their integer arguments, as ``(kind, *args)`` tuples:
#:   flip pos bit | set pos byte | truncate pos | delete pos n | insert pos bytes |
#:   splice from n to (copy a range elsewhere) | length frame value (edit a length field) |
#:   dup_frame frame to | drop_frame frame | swap_frames frame frame |
#:   recrc frame (re-checksum a frame: a peer speaking the format but sending nonsense).
#: Positions and frame numbers are taken modulo what exists, so any integers are valid.
MUTATION_KINDS = ("flip", "set", "truncate", "delete", "insert", "splice", "length",
                  "dup_frame", "drop_frame", "swap_frames", "recrc")


def frame_starts(data: bytes) -> list[int]:
    """Offsets of the headers in ``data``, walking length fields (however broken)."""
    starts = []
    pos = 0
    while pos + HEADER_SIZE <= len(data):
        starts.append(pos)
        pos += HEADER_SIZE + int.from_bytes(data[pos + 4 : pos + 8], "big")
    return starts


def mutate(data: bytes, ops: Sequence[tuple]) -> bytes:
    b = bytearray(data)
    for op in ops:
        kind = op[0]
        n = len(b)
        starts = frame_starts(bytes(b))
        if kind == "flip" and n:
            b[op[1] % n] ^= 1 << (op[2] % 8)
        elif kind == "set" and n:
            b[op[1] % n] = op[2] % 256
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
            b[s + 4 : s + 8] = (op[2] % 2**32).to_bytes(4, "big")
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


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (taken modulo its length + 1)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


# -- the frame decoder ---------------------------------------------------------------------------


def _raises_frame_error(fn: Any) -> FrameError:
    try:
        fn()
    except FrameError as e:
        return e
    raise AssertionError("a failed decoder accepted more input")


def run_decoder(core: ModuleType, chunks: Sequence[bytes], max_payload: int,
                eof: bool = True) -> tuple[list[tuple], int | None, int]:
    """Feed ``chunks`` checking the decoder's invariants; (frames, error code, error offset).

    Any exception other than FrameError propagates: that is a finding.
    """
    dec = core.FrameDecoder(max_payload)
    frames: list[tuple] = []
    fed = 0
    err = None
    try:
        for c in chunks:
            got = dec.feed(c)
            fed += len(c)
            # payloads may point into ``c``: copy them before anything else
            frames.extend((f.type, f.flags, f.seq, f.ack, bytes(f.payload)) for f in got)
            # never a whole header and payload held (a complete frame is returned at once)
            assert 0 <= dec.buffered < HEADER_SIZE + max_payload, (dec.buffered, max_payload)
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
        e2 = _raises_frame_error(again)
        assert (e2.code, e2.offset, str(e2)) == (err.code, err.offset, str(err))
    return frames, err.code, err.offset


def check_decoder(core: ModuleType, stream: bytes, cuts: Sequence[int], max_payload: int) -> None:
    """Decoding ``stream`` cut at ``cuts`` gives what the reference decoder gives."""
    want_frames, want_code, want_offset = reference_decode(stream, max_payload)
    frames, code, offset = run_decoder(core, split(stream, cuts), max_payload)
    assert (code, offset) == (want_code, want_offset), ((code, offset), (want_code, want_offset))
    if code is None:
        assert frames == want_frames
    else:  # frames completed by the call that raised are not returned (the link is dropped)
        assert frames == want_frames[: len(frames)]


# -- the engine ------------------------------------------------------------------------------------

_ENGINE_NAMES = ("FrameDecoder", "ReplayBuffer", "encode_header", "encode_frame")
_HERE = {os.path.dirname(os.path.abspath(__file__)),
         os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz")}


@functools.cache
def _source_engine() -> ModuleType:
    """A second copy of the session engine, imported from protocol.py whatever was compiled."""
    spec = importlib.util.spec_from_file_location("icafast._protocol_source",
                                                  Path(protocol.__file__).with_name("protocol.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look their module up while it runs)
    spec.loader.exec_module(mod)
    return mod


def engines() -> list[ModuleType]:
    """The engine modules ``engine_on`` runs: icafast.protocol, and where that is compiled, the
    copy from source that stands in for it on the pure core (patch module globals in both)."""
    return [protocol, _source_engine()] if compiled_modules()["icafast.protocol"] else [protocol]


def _test_modules() -> list[ModuleType]:
    """The loaded test and fuzz-harness modules (they name engine classes as globals)."""
    return [m for m in list(sys.modules.values())
            if os.path.dirname(getattr(m, "__file__", None) or "") in _HERE]


@contextlib.contextmanager
def engine_on(core: ModuleType | None) -> Iterator[None]:
    """Run the session engine on ``core`` (None: the one icafast loaded).

    The compiled engine calls the compiled core's types directly (icafast/protocol.pxd), so it
    runs on that core only. For another core, the engine is the one from source (as under
    ICAFAST_PURE_PYTHON=1): within the block, the engine names the test modules imported from
    icafast.protocol (ClientSession, Config, State, ...) stand for the source engine's.
    """
    if core is None:
        yield
        return
    engine = protocol
    rebound: list[tuple[ModuleType, str, Any]] = []
    if compiled_modules()["icafast.protocol"] and core is not _impl.core:
        engine = _source_engine()
        for m in _test_modules():
            for name, value in list(vars(m).items()):
                if (not name.startswith("__") and isinstance(value, type)
                        and getattr(protocol, name, None) is value
                        and isinstance(getattr(engine, name, None), type)):
                    rebound.append((m, name, value))
                    setattr(m, name, getattr(engine, name))
    saved = {n: getattr(engine, n) for n in _ENGINE_NAMES}
    try:
        for n in _ENGINE_NAMES:
            setattr(engine, n, getattr(core, n))
        assert type(engine.ClientSession(CFG, 0.0).tx) is core.ReplayBuffer, \
            "engine ignores the patch"
        yield
    finally:
        for n, v in saved.items():
            setattr(engine, n, v)
        for m, name, value in rebound:
            setattr(m, name, value)


def pattern(tag: int, n: int, start: int = 0) -> bytes:
    return bytes((tag * 31 + i * 7 + (i >> 8)) & 0xFF for i in range(start, start + n))


def events_of(kind: Any, events: Sequence[Any]) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


#: The most a ServerHandshake ever writes: its HELLO, then one REJECT.
HS_OUTPUT_MAX = (HEADER_SIZE + HELLO.size) + (HEADER_SIZE + 2 + 256)


def check_server_handshake(hs: ServerHandshake, chunks: Sequence[bytes],
                           now: float = 0.0) -> tuple[list[Any], list[tuple]]:
    """Feed ``chunks`` (must not raise), then its timer; check what it says and writes."""
    events: list[Any] = []
    out = b""
    for c in chunks:
        hs.receive_data(c, now)
        out += b"".join(bytes(x) for x in hs.data_to_send())
        events.extend(iter(hs.next_event, None))
    if not hs.done:
        t = hs.get_timer()
        assert t is not None
        hs.handle_timer(t)
        out += b"".join(bytes(x) for x in hs.data_to_send())
        events.extend(iter(hs.next_event, None))
    assert hs.done and hs.get_timer() is None
    assert len(out) <= HS_OUTPUT_MAX, len(out)
    frames, code, _ = reference_decode(out, DEFAULT_MAX_PAYLOAD)
    assert code is None
    types = [f[0] for f in frames]
    assert types in ([], [FrameType.HELLO], [FrameType.REJECT],
                     [FrameType.HELLO, FrameType.REJECT]), types
    requests = events_of((ev.NewSessionRequested, ev.ResumeRequested), events)
    failed = events_of(ev.HandshakeFailed, events)
    assert len(requests) <= 1 and len(failed) <= 1, events
    assert len(requests) + len(failed) >= 1, "the handshake ended without saying how"
    # every REJECT it sends comes with HandshakeFailed, so that the connection gets closed;
    # a HandshakeFailed without one is the timeout's (no REJECT then: PROTOCOL.md 3.5)
    if types[-1:] == [FrameType.REJECT]:
        assert failed, (types, events)
    elif failed:
        assert failed[0].reason == "handshake timed out", (types, events)
    return events, frames


def client_handshake_stream(second: str, tail: Sequence[bytes] = ()) -> bytes:
    """A client's side of a handshake: HELLO, then NEW/RESUME/nothing, then ``tail``."""
    stream = client_hello()
    if second == "new":
        stream += raw_frame(FrameType.NEW)
    elif second == "resume":
        stream += raw_frame(FrameType.RESUME, 0, 0, 77, RESUME.pack(b"i" * 16, b"p" * 32))
    return stream + b"".join(tail)


class Peer:
    """One side of a Harness, seen generically (the side that is fuzzed, or the other)."""

    def __init__(self, h: Harness, client: bool) -> None:
        self.h = h
        self.client = client

    @property
    def engine(self) -> Any:
        return self.h.client if self.client else self.h.server

    @property
    def events(self) -> list[Any]:
        return self.h.client_events if self.client else self.h.server_events

    def sent(self) -> bytes:
        return bytes(self.h.c_sent if self.client else self.h.s_sent)

    def received(self) -> bytes:
        return bytes(self.h.c_recv if self.client else self.h.s_recv)

    def send(self, n: int) -> None:
        if self.client:
            self.h.client_send(pattern(1, n, len(self.h.c_sent)))
        else:
            self.h.server_send(pattern(2, n, len(self.h.s_sent)))

    def collect(self, w: Any) -> None:
        if self.client:
            self.h._client_out()
        else:
            self.h._server_events(w)
            self.h._server_out(w)


#: Peer operations: ("send", n) | ("recv", n) | ("tick", ms) | ("fin", 0).
PEER_OP_KINDS = ("send", "recv", "tick", "fin")


def run_peer_ops(h: Harness, sender: Peer, receiver: Peer, ops: Sequence[tuple]) -> None:
    """Let ``sender`` produce traffic towards ``receiver`` that is held back (not delivered):
    data, acks of what ``receiver`` sends, keepalives as time passes, its FIN."""
    w = h.wire
    elapsed = 0.0
    for op, arg in ops:
        if op == "send":
            sender.send(arg)
        elif op == "recv":
            receiver.send(arg)
        elif op == "tick" and elapsed + arg / 1000 < CFG.dead_timeout * 0.8:
            elapsed += arg / 1000
            h.advance(arg / 1000)
        elif op == "fin":
            sender.engine.send_eof()
            sender.collect(w)
        # what the receiver sends (data, PINGs) reaches the sender, so the sender acks/pongs
        if receiver.client:
            h.deliver_c2s(w=w)
        else:
            h.deliver_s2c(w=w)
    sender.collect(w)


def server_of(h: Harness) -> Any:
    """The client's session on the server (None before the server has it)."""
    return h.sessions.get(h.client.session_id)


def heal(h: Harness) -> None:
    """Let the session recover: reconnect, resume, replay; until everything is delivered."""
    h.auto_reconnect = True
    for _ in range(300):
        if (h.client.state is State.DISCONNECTED and not h.client.link_id
                and h.client.get_timer() is None):
            h.open_link()  # its ReconnectDue came while the scenario held reconnects back
        h.pump()
        srv = server_of(h)
        if (srv is not None and len(h.s_recv) == len(h.c_sent) and len(h.c_recv) == len(h.s_sent)
                and h.client.unacked == 0 and srv.unacked == 0):
            return
        w = h.wire
        if w is not None and not h.client.established:
            h.advance(CFG.handshake_timeout)
        elif w is not None and w.blackholed:
            h.advance(CFG.dead_timeout)
        else:
            h.advance(0.05)


def assert_healed(h: Harness) -> None:
    heal(h)
    srv = server_of(h)
    assert h.client.state is not State.CLOSED and srv is not None
    assert srv.state is not State.CLOSED
    assert bytes(h.c_recv) == bytes(h.s_sent), "client stream differs after healing"
    assert bytes(h.s_recv) == bytes(h.c_sent), "server stream differs after healing"


def scenario_corrupted_stream(fuzz_client: bool, ops: Sequence[tuple],
                              mutations: Sequence[tuple], cuts: Sequence[int], seed: int = 0,
                              core: ModuleType | None = None) -> None:
    """An established session is fed what its peer sent, corrupted (``mutations`` without
    recrc): nothing raises, a frame error drops the link and says so, nothing corrupt is ever
    delivered, and after a reconnect every byte arrives exactly once."""
    with engine_on(core):
        h = Harness(CFG, seed=seed)
        h.open_link()
        h.pump()
        me = Peer(h, fuzz_client)
        other = Peer(h, not fuzz_client)
        run_peer_ops(h, other, me, ops)
        w = h.wire
        assert w is not None and h.client.established
        queue = w.s2c if fuzz_client else w.c2s
        original = bytes(queue)
        queue.clear()
        bad = mutate(original, mutations)
        link = me.engine.link_id
        n_events = len(me.events)
        fed = 0
        for chunk in split(bad, cuts):
            if me.engine.link_id != link:
                break
            me.engine.receive_data(chunk, h.now)
            fed += len(chunk)
            me.collect(w)
            got = me.received()
            assert got == other.sent()[: len(got)], "delivered bytes the peer never sent"
        new = me.events[n_events:]
        _, code, _ = reference_decode(bad[:fed], CFG.max_payload)
        if code not in (None, FRAME_ERR_TRUNCATED):
            assert me.engine.link_id != link, "a frame error did not drop the link"
        if me.engine.link_id != link:
            assert [e for e in events_of(ev.LinkLost, new) if e.link_id == link], new
        assert not events_of(ev.SessionClosed, new), new
        h.reset()  # whatever was lost in transit is replayed on the next link
        assert_healed(h)


def scenario_client_handshake(resume: bool, accept_phase: bool, mutations: Sequence[tuple],
                              cuts: Sequence[int], seed: int = 0,
                              core: ModuleType | None = None) -> None:
    """The client is fed the server's HELLO (or its ACCEPT and what follows), corrupted, on a
    first connection or on a resume: nothing raises, a failure is reported, and the session
    either ends (first connection) or heals."""
    with engine_on(core):
        h = Harness(CFG, seed=seed)
        if resume:
            h.open_link()
            h.pump()
            h.client_send(pattern(1, 300))
            h.server_send(pattern(2, 300))
            h.pump()
            h.client_send(pattern(1, 200, 300))
            h.server_send(pattern(2, 200, 300))  # in flight: replayed after the resume
            h.reset()
            h.auto_reconnect = False
            h.advance(0)
            assert events_of(ev.ReconnectDue, h.client_events)
        h.open_link()
        w = h.wire
        assert w is not None
        h.deliver_c2s(w=w)  # client HELLO; the server answers with its HELLO
        if accept_phase:
            h.deliver_s2c(w=w)  # the client answers NEW/RESUME
            h.deliver_c2s(w=w)  # ACCEPT (+ replayed data)
        original = bytes(w.s2c)
        w.s2c.clear()
        link = h.client.link_id
        n_events = len(h.client_events)
        for chunk in split(mutate(original, mutations), cuts):
            if h.client.link_id != link or h.client.state is State.CLOSED:
                break
            h.client.receive_data(chunk, h.now)
            h._client_out()
            assert bytes(h.c_recv) == bytes(h.s_sent[: len(h.c_recv)])
        if h.client.link_id == link:
            h.pump()  # the handshake goes on over this link
        if h.client.link_id == link and not h.client.established:
            h.advance(CFG.handshake_timeout)  # a handshake that stalls times out
        new = h.client_events[n_events:]
        if h.client.link_id != link:
            assert events_of((ev.HandshakeRejected, ev.LinkLost), new), new
        if h.client.state is State.CLOSED:
            # only a first connection may give up (CFG.connect_retry), and it says so
            assert not resume and events_of(ev.SessionClosed, new), new
            return
        h.reset()  # a frame lost on a live link is replayed only after a break
        assert_healed(h)


#: Offsets a hostile peer's seq/ack are drawn near: ``anchored(engine, anchor, delta)``.
ANCHORS = ("zero", "rx", "rx+1", "tx_start", "tx_end", "tx_end+1", "max")


def anchored(engine: Any, anchor: str, delta: int) -> int:
    base = {
        "zero": 0,
        "rx": engine.bytes_received,
        "rx+1": engine.bytes_received + 1,
        "tx_start": engine.tx.start,
        "tx_end": engine.tx.end,
        "tx_end+1": engine.tx.end + 1,
        "max": U64,
    }[anchor]
    return min(U64, max(0, base + delta))


def scenario_nonsense(fuzz_client: bool, ops: Sequence[tuple], seed: int = 0,
                      core: ModuleType | None = None) -> None:
    """A hostile peer that speaks the frame format, to an established session. ``ops``:
    ("frame", type, fin, (anchor, delta), (anchor, delta), payload) | ("tick", ms) |
    ("send", n). Nothing raises, the session writes only well-formed frames, every dropped link
    and every end is reported, and the delivered stream is consistent."""
    with engine_on(core):
        h = Harness(CFG, seed=seed)
        h.open_link()
        h.pump()
        h.auto_reconnect = False
        engine = Peer(h, fuzz_client).engine
        link = engine.link_id
        delivered = 0
        ended = closed = False
        for op in ops:
            if engine.state is State.CLOSED or engine.link_id != link:
                break
            if op[0] == "frame":
                _, t, fin, seq, ack, payload = op
                flags = FLAG_FIN if fin and t == FrameType.DATA else 0
                engine.receive_data(
                    raw_frame(int(t), flags, anchored(engine, *seq), anchored(engine, *ack),
                              payload), h.now)
            elif op[0] == "tick":
                h.now += op[1] / 1000
                t = engine.get_timer()
                if t is not None and t <= h.now:
                    engine.handle_timer(h.now)
            elif engine.send_free:
                engine.send_data(pattern(3, min(op[1], engine.send_free)))
            out = b"".join(bytes(x) for x in engine.data_to_send())
            _, code, _ = reference_decode(out, DEFAULT_MAX_PAYLOAD)
            assert code is None, "wrote a malformed frame"
            while (e := engine.next_event()) is not None:
                if isinstance(e, ev.DataReceived):
                    assert not ended, "data after the end of the stream"
                    delivered += len(e.data)
                elif isinstance(e, ev.StreamEnded):
                    ended = True
                elif isinstance(e, ev.LinkLost):
                    assert e.link_id == link
                elif isinstance(e, ev.SessionClosed):
                    closed = True
        assert delivered == engine.bytes_received
        assert closed == (engine.state is State.CLOSED)
        if engine.link_id != link and not closed:
            assert engine.state is State.DISCONNECTED


def feed_as_relay(engine: Any, data: bytes, now: float) -> None:
    """Link bytes into an engine the way the relay feeds them (``_receive_one``). The bytes it
    returns are queued as the event ``receive_data`` queues for them (it returns bytes only when
    no event is pending), so the caller sees what ``receive_data`` gives."""
    chunk = engine._receive_one(data, now)
    if chunk is not None:
        engine._events.append(chunk)


def engine_view(engine: Any) -> tuple:
    """What a peer, the adapter or a test can observe of an engine (not its random ids)."""
    link = engine._link
    return (
        engine.state, engine.link_id, engine._rx, engine._rx_acked, engine._peer_ack,
        engine._tx_sent, engine.tx.start, engine.tx.end, engine.bytes_received, engine._ack_due,
        engine._ack_now, engine.last_activity, engine._rx_fin, engine._tx_fin_acked,
        engine.get_timer(),
        None if link is None else (link.phase, link.last_rx, link.last_heard, link.confirm_secret,
                                   link.decoder.offset, link.decoder.buffered),
    )


def scenario_fast_receive(fuzz_client: bool, ops: Sequence[tuple], seed: int = 0,
                          core: ModuleType | None = None) -> None:
    """The relay's shortcuts against the general path: two identical sessions fed the same
    frames (ops as in ``scenario_nonsense``; a frame op may add a cut that splits it over two
    receives), one through ``receive_data``, one through ``_receive_one``; and given the same
    bytes to send and the same sink backlog (op ("backlog", n)), framed by ``data_to_send``
    in one, by ``_frame_one`` first in the other. After every op both show the same state,
    write the same frames and report the same events; and where ``_output_idle`` says so,
    ``data_to_send`` writes and changes nothing."""
    with engine_on(core):
        hs = [Harness(CFG, seed=seed) for _ in range(2)]
        for h in hs:
            h.open_link()
            h.pump()
            h.auto_reconnect = False
        engines = [Peer(h, fuzz_client).engine for h in hs]
        for op in ops:
            seen = []
            for relay, (h, engine) in enumerate(zip(hs, engines, strict=True)):
                if op[0] == "frame":
                    _, t, fin, seq, ack, payload, cut = op
                    flags = FLAG_FIN if fin and t == FrameType.DATA else 0
                    data = raw_frame(int(t), flags, anchored(engine, *seq),
                                     anchored(engine, *ack), payload)
                    for chunk in (data[:cut], data[cut:]) if 0 < cut < len(data) else (data,):
                        if relay:
                            feed_as_relay(engine, chunk, h.now)
                        else:
                            engine.receive_data(chunk, h.now)
                elif op[0] == "tick":
                    h.now += op[1] / 1000
                    t = engine.get_timer()
                    if t is not None and t <= h.now:
                        engine.handle_timer(h.now)
                elif op[0] == "backlog":  # what the adapter reads from the sink's transport
                    engine.sink_backlog = min(op[1], engine.bytes_received)
                elif engine.send_free:
                    engine.send_data(pattern(3, min(op[1], engine.send_free)))
                out = None
                if relay and op[0] == "send" and not engine._events:
                    out = engine._frame_one()  # (the adapter writes it, and nothing more)
                idle, before = engine._output_idle(), engine_view(engine)
                if out is None:
                    out = b"".join(bytes(x) for x in engine.data_to_send())
                    if idle:  # (the adapter skips data_to_send then: it must not matter)
                        assert not out and engine_view(engine) == before, op
                frames, code, _ = reference_decode(bytes(out), DEFAULT_MAX_PAYLOAD)
                events = []
                while (e := engine.next_event()) is not None:
                    events.append((type(e).__name__, bytes(e.data)) if isinstance(
                        e, ev.DataReceived) else repr(e))
                seen.append((engine_view(engine), frames, code, events))
            assert seen[0] == seen[1], op
