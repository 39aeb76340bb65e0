"""Two engines wired together in memory on a fake clock (aioquic-style test helpers).

A ``Harness`` holds one client session and the server's session table. Links are pairs of byte
queues; tests deliver bytes in any split, break links (reset, blackhole, half-open) and advance
time, all without sockets or wall-clock waits.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

from icafast import events as ev
from icafast.protocol import (
    REJECT_BAD_PROOF,
    REJECT_CLOSED,
    REJECT_UNKNOWN_SESSION,
    ClientSession,
    Config,
    ServerHandshake,
    ServerSession,
    State,
)


class Queue:
    """One direction of a Wire: the buffers an engine returned from ``data_to_send``, held as
    they are, as a transport holds what it has not sent yet (asyncio's and uvloop's queue
    memoryviews without copying them). Their bytes are read only when delivered, so an engine
    that changes memory it handed out before its peer has it (a replay ring reusing what an
    ack freed, say) makes its peer see other bytes than it framed: a checksum mismatch, which
    ``Harness`` fails on."""

    def __init__(self) -> None:
        self._bufs: deque[Any] = deque()
        self._skip = 0  # bytes of the first buffer already delivered
        self._len = 0

    def extend(self, bufs: Any) -> None:
        for b in bufs:
            n = len(b) if isinstance(b, (bytes, bytearray)) else memoryview(b).nbytes
            if n:
                self._bufs.append(b)
                self._len += n

    def __iadd__(self, data: Any) -> Queue:
        self.extend([data])
        return self

    def __len__(self) -> int:
        return self._len

    def __bytes__(self) -> bytes:
        return b"".join(bytes(memoryview(b).cast("B")) for b in self._bufs)[self._skip:]

    def clear(self) -> None:
        self._bufs.clear()
        self._skip = self._len = 0

    def take(self, n: int) -> bytes:
        """The first ``n`` bytes (at most all), read now and removed."""
        out = bytearray()
        while n and self._bufs:
            b = memoryview(self._bufs[0]).cast("B")
            k = min(n, len(b) - self._skip)
            out += b[self._skip:self._skip + k]
            self._skip += k
            self._len -= k
            n -= k
            if self._skip == len(b):
                self._bufs.popleft()
                self._skip = 0
        return bytes(out)


class Wire:
    """One TCP connection between client and server, as two queues (see Queue)."""

    def __init__(self, client_link: int, hs: ServerHandshake) -> None:
        self.client_link = client_link
        self.hs = hs
        self.session: ServerSession | None = None
        self.server_link = 0
        self.c2s = Queue()
        self.s2c = Queue()
        self.client_alive = True  # client side still feeds/reads it
        self.server_alive = True
        self.blackholed = False  # bytes written to it vanish


class Harness:
    def __init__(self, config: Config | None = None, server_config: Config | None = None,
                 seed: int = 0) -> None:
        self.now = 1000.0
        self.config = config or Config()
        self.server_config = server_config or self.config
        self.client = ClientSession(self.config, self.now, rng=random.Random(seed))
        self.sessions: dict[bytes, ServerSession] = {}
        self.wires: list[Wire] = []
        self.c_recv = bytearray()  # what the client application received
        self.s_recv = bytearray()  # what the backend received
        self.c_sent = bytearray()  # what the client application sent
        self.s_sent = bytearray()  # what the backend sent
        self.c_eof = False
        self.s_eof = False
        self.client_events: list[Any] = []
        self.server_events: list[Any] = []
        self.auto_reconnect = True
        #: the TCP connection's round trip, as a server adapter would read it from the kernel
        #: for a new session (None: none, and the server's send window stays the replay limit)
        self.tcp_rtt: float | None = None

    # -- helpers -----------------------------------------------------------------------------
    @property
    def wire(self) -> Wire | None:
        for w in reversed(self.wires):
            if w.client_alive and w.client_link == self.client.link_id:
                return w
        return None

    @property
    def server(self) -> ServerSession:
        (s,) = self.sessions.values()
        return s

    def open_link(self) -> Wire:
        self.client.connect(self.now)
        w = Wire(self.client.link_id, ServerHandshake(self.server_config, self.now))
        self.wires.append(w)
        self._client_out()
        return w

    def _client_out(self) -> None:
        w = self.wire
        out = self.client.data_to_send()
        if w is not None:
            w.c2s.extend(out)
        self._client_events()

    def _server_out(self, w: Wire) -> None:
        if w.session is not None and w.session.link_id == w.server_link:
            out = w.session.data_to_send()
        else:
            out = w.hs.data_to_send()
        if w.server_alive:
            w.s2c.extend(out)

    def _client_events(self) -> None:
        while (e := self.client.next_event()) is not None:
            self.client_events.append(e)
            if isinstance(e, ev.DataReceived):
                self.c_recv += bytes(e.data)
            elif isinstance(e, ev.StreamEnded):
                self.c_eof = True
            elif isinstance(e, ev.ReconnectDue) and self.auto_reconnect:
                self.open_link()

    def _server_events(self, w: Wire) -> None:
        hs = w.hs
        while (e := hs.next_event()) is not None:
            self.server_events.append(e)
            if isinstance(e, ev.NewSessionRequested):
                if hs.rtt is None:  # NEW came with the HELLO: the adapter's round trip
                    hs.rtt = self.tcp_rtt
                s = ServerSession(self.server_config, self.now)
                self.sessions[s.session_id] = s
                s.accept(hs, self.now)
                w.session, w.server_link = s, s.link_id
            elif isinstance(e, ev.ResumeRequested):
                s = self.sessions.get(e.session_id)
                if s is None:
                    hs.reject(REJECT_UNKNOWN_SESSION, "unknown session")
                elif s.state is State.CLOSED:
                    hs.reject(REJECT_CLOSED, "session closed")
                elif not s.check_proof(hs, e.proof):
                    hs.reject(REJECT_BAD_PROOF, "bad proof")
                else:
                    s.accept(hs, self.now)
                    w.session, w.server_link = s, s.link_id
            elif isinstance(e, ev.HandshakeFailed):
                w.server_alive = False
        for s in self.sessions.values():
            self._session_events(s)

    def _session_events(self, s: ServerSession) -> None:
        while (e := s.next_event()) is not None:
            self.server_events.append(e)
            if isinstance(e, ev.DataReceived):
                self.s_recv += bytes(e.data)
            elif isinstance(e, ev.StreamEnded):
                self.s_eof = True

    # -- actions -----------------------------------------------------------------------------
    def client_send(self, data: bytes) -> int:
        """The application writes; back-pressure may accept only a prefix. Returns bytes taken."""
        n = min(len(data), self.client.send_free)
        if n:
            self.client.send_data(data[:n])
            self.c_sent += data[:n]
        self._client_out()
        return n

    def server_send(self, data: bytes) -> int:
        s = self.server
        n = min(len(data), s.send_free)
        if n:
            s.send_data(data[:n])
            self.s_sent += data[:n]
        for w in self.wires:
            if w.session is s and s.link_id == w.server_link:
                self._server_out(w)
        return n

    def deliver_c2s(self, n: int | None = None, w: Wire | None = None) -> int:
        w = w or self.wire
        if w is None or not w.c2s:
            return 0
        if w.blackholed:
            w.c2s.clear()
            return 0
        n = len(w.c2s) if n is None else min(n, len(w.c2s))
        chunk = w.c2s.take(n)
        if not w.server_alive:
            return n
        if w.session is not None:
            if w.session.link_id == w.server_link:
                s = w.session
                n_events = len(self.server_events)
                s.receive_data(chunk, self.now)
                self._session_events(s)
                _no_bad_frames(self.server_events[n_events:], "server")
        else:
            w.hs.receive_data(chunk, self.now)
        self._server_events(w)
        self._server_out(w)
        return n

    def deliver_s2c(self, n: int | None = None, w: Wire | None = None) -> int:
        w = w or self.wire
        if w is None or not w.s2c:
            return 0
        if w.blackholed:
            w.s2c.clear()
            return 0
        n = len(w.s2c) if n is None else min(n, len(w.s2c))
        chunk = w.s2c.take(n)
        if w.client_alive and self.client.link_id == w.client_link:
            n_events = len(self.client_events)
            self.client.receive_data(chunk, self.now)
            self._client_out()
            _no_bad_frames(self.client_events[n_events:], "client")
        return n

    def resume_by_hand(self) -> Wire:
        """The link breaks and the client reconnects one step at a time: its HELLO, the
        server's and its RESUME are delivered, and the server's ACCEPT (with the server's
        replay after it) waits in the new wire, which is returned."""
        self.reset()
        self.auto_reconnect = False
        self.advance(1.0)
        self.open_link()
        w = self.wire
        assert w is not None
        self.deliver_c2s(w=w)  # HELLO
        self.deliver_s2c(w=w)  # the server's HELLO; the client answers RESUME
        self.deliver_c2s(w=w)  # RESUME: ACCEPT goes out
        return w

    def pump(self, rounds: int = 10_000) -> None:
        """Deliver everything in flight on the current link until nothing moves."""
        for _ in range(rounds):
            self._client_out()
            w = self.wire
            if w is None:
                self.advance(0)
                if self.wire is None:
                    return
                continue
            for s in self.sessions.values():
                if w.session is s:
                    self._server_out(w)
            moved = self.deliver_c2s(w=w) + self.deliver_s2c(w=w)
            if not moved:
                return
        raise AssertionError("pump did not settle")

    def advance(self, dt: float) -> None:
        """Let time pass and fire every due timer."""
        self.now += dt
        for _ in range(100):
            fired = False
            t = self.client.get_timer()
            if t is not None and t <= self.now:
                self.client.handle_timer(self.now)
                fired = True
            self._client_out()
            for s in list(self.sessions.values()):
                t = s.get_timer()
                if t is not None and t <= self.now:
                    s.handle_timer(self.now)
                    fired = True
                self._session_events(s)
                for w in self.wires:
                    if w.session is s and s.link_id == w.server_link:
                        self._server_out(w)
            if not fired:
                return
        raise AssertionError("timers keep firing")

    # -- faults ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Both ends see the connection fail (RST); bytes in flight are lost."""
        w = self.wire
        if w is None:
            return
        w.client_alive = w.server_alive = False
        w.c2s.clear()
        w.s2c.clear()
        if w.session is not None:
            w.session.connection_lost(self.now, "connection reset", link_id=w.server_link)
            self._session_events(w.session)
        self.client.connection_lost(self.now, "connection reset", link_id=w.client_link)
        self._client_out()

    def blackhole(self) -> None:
        """Packets silently vanish; neither end is told. Timers must find out."""
        w = self.wire
        if w is None:
            return
        w.c2s.clear()
        w.s2c.clear()
        w.blackholed = True

    def half_open(self) -> None:
        """The client's side dies (it notices); the server still believes the link is up."""
        w = self.wire
        if w is None:
            return
        w.client_alive = False
        w.c2s.clear()
        w.s2c.clear()
        self.client.connection_lost(self.now, "local reset", link_id=w.client_link)
        self._client_out()


def _no_bad_frames(events: list[Any], side: str) -> None:
    """What a Wire delivers is exactly what the other engine framed, read when delivered: a
    frame error there means that engine changed bytes it had handed out (see Queue)."""
    for e in events:
        if isinstance(e, ev.LinkLost) and "malformed frame" in e.reason:
            raise AssertionError(f"the {side} was sent bytes that changed after they were "
                                 f"framed: {e.reason}")


def pattern(tag: int, n: int, start: int = 0) -> bytes:
    """``n`` bytes of stream ``tag`` from offset ``start``: any slip, loss or repeat shows."""
    return bytes((tag * 31 + i * 7 + (i >> 8)) & 0xFF for i in range(start, start + n))


class Schedule:
    """Runs a random schedule (``(op, arg)`` pairs, as the hypothesis tests draw them) on a
    harness: sends, ends of stream, partial deliveries, link faults, a sink that stops and
    starts taking data (its acks held) and time; after each step the delivered prefix of each
    stream is the sent prefix, exactly. ``heal()`` then lets time run until everything is
    delivered and acknowledged. Ops it does not know go to ``extra(op, arg)``. ``size``
    multiplies what ``csend`` and ``ssend`` send."""

    def __init__(self, h: Harness, extra: Any = None, size: int = 1) -> None:
        self.h = h
        self.extra = extra
        self.size = size
        self.csent = self.ssent = 0
        self.cfin = self.sfin = False

    def run(self, ops: Any) -> None:
        h = self.h
        for op, arg in ops:
            if h.client.state is State.CLOSED:
                break
            self.step(op, arg)
            assert bytes(h.s_recv) == bytes(h.c_sent[: len(h.s_recv)])
            assert bytes(h.c_recv) == bytes(h.s_sent[: len(h.c_recv)])

    def step(self, op: str, arg: int) -> None:
        h = self.h
        if op == "csend" and not self.cfin:
            self.csent += h.client_send(pattern(1, arg * self.size, self.csent))
        elif op == "ssend" and h.sessions and not self.sfin:
            self.ssent += h.server_send(pattern(2, arg * self.size, self.ssent))
        elif op == "chold":  # the application stops (1) or starts (0) taking data
            h.client.hold_acks(bool(arg))
        elif op == "shold" and h.sessions:  # the backend
            h.server.hold_acks(bool(arg))
        elif op == "cfin" and not self.cfin:
            self.cfin = True
            h.client.send_eof()
        elif op == "sfin" and h.sessions and not self.sfin:
            self.sfin = True
            h.server.send_eof()
        elif op == "c2s":
            h.deliver_c2s(arg)
        elif op == "s2c":
            h.deliver_s2c(arg)
        elif op == "reset":
            h.reset()
        elif op == "blackhole":
            h.blackhole()
        elif op == "half_open":
            h.half_open()
        elif op == "tick":
            h.advance(arg / 1000)
        elif self.extra is not None:
            self.extra(op, arg)

    def heal(self, rounds: int = 300) -> None:
        h = self.h
        h.client.hold_acks(False)
        for s in h.sessions.values():
            s.hold_acks(False)
        for _ in range(rounds):
            h.pump()
            if (len(h.s_recv) == len(h.c_sent) and len(h.c_recv) == len(h.s_sent)
                    and h.s_eof == self.cfin and h.c_eof == self.sfin
                    and h.client.unacked == 0 and h.server.unacked == 0):
                break
            if h.wire is not None and h.wire.blackholed:
                h.advance(h.config.dead_timeout)
            else:
                h.advance(0.05)
        assert bytes(h.s_recv) == bytes(h.c_sent)
        assert bytes(h.c_recv) == bytes(h.s_sent)
        assert (h.s_eof, h.c_eof) == (self.cfin, self.sfin)
