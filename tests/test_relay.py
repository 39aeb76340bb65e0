"""Loopback integration tests: real sockets, the relay server, the client and a fault proxy."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import re
import socket
import struct
import sys
import weakref
from typing import Any

import pytest
from engine_harness import Harness
from relay_helpers import (
    FAST,
    Backend,
    Setup,
    Stats,
    free_port,
    links_up,
    listening_client,
    read_until_closed,
    recv_stream,
    refusing_port,
    run_async,
    send_stream,
    tls_for,
    unanswering_backend,
    wait_for,
)

from icafast import IMPLEMENTATION
from icafast import events as ev
from icafast.aio import Mapping, RelayClient, RelayServer, open_session
from icafast.aio._relay import (
    LINK_NOTSENT_LOWAT,
    MIN_READ_SIZE,
    READ_SIZE,
    RUNNERS,
    TIMER_TICK,
    WRITE_HIGH_WATER,
    Endpoint,
    Link,
    Runner,
    _bulk_buffer,
    _ticks_of,
    abort_with_rst,
    tcp_rtt,
    tune_socket,
)
from icafast.aio.server import control_request
from icafast.faults import FaultProxy
from icafast.protocol import (
    REJECT_BAD_PROOF,
    REJECT_PROTOCOL,
    REJECT_UNKNOWN_SESSION,
    ClientSession,
    Config,
    ServerHandshake,
    ServerSession,
    State,
    send_window_for,
)
from icafast.wire import HEADER_SIZE, FrameType

LOOPS = ["uvloop", "asyncio"]


def of(kind, events):
    return [e for e in events if isinstance(e, kind)]


async def _bulk_through_breaks(size: int, breaks_each: int) -> None:
    # (the pure-Python core checksums about 10 MB/s: a resume that replays megabytes holds a
    # loop longer than FAST's 0.4 s dead timeout, and was taken for a dead link again and
    # again; README.md, "_pure.py")
    config = FAST if IMPLEMENTATION == "cython" else dataclasses.replace(
        FAST, keepalive_interval=0.5, dead_timeout=3.0)
    async with Setup(Backend("stream", size=size), config=config) as s:
        cev: list[ev.Event] = []
        reader, writer = await s.client(events=cev)
        app = Stats()
        kinds = ["reset", "blackhole", "half_open"]
        done = dict.fromkeys(kinds, 0)
        total = 3 * breaks_each
        breaks_done = asyncio.Event()
        in_bulk = 0  # breaks of a link that was reading into the shared buffer (BULK_READ)

        def progress() -> int:
            return s.backend.conns[0].received if s.backend.conns else 0

        async def breaker() -> None:
            nonlocal in_bulk
            for k in range(total):
                target = (k + 1) * size // (total + 2)
                assert await wait_for(lambda t=target: progress() >= t, 60), "transfer stalled"
                # break only a link that is up (the previous break was recovered from)
                assert await wait_for(lambda k=k: len(of(ev.LinkUp, cev)) == k + 1 and
                                      s.proxy.live_connections > 0, 10), (
                    f"link not up again after break {k}: {len(of(ev.LinkUp, cev))} LinkUp, "
                    f"{s.proxy.live_connections} proxied connections, losses "
                    f"{[e.reason for e in of(ev.LinkLost, cev)]}")
                kind = kinds[k % 3]
                link = s.only_session().link
                if isinstance(link, Link) and link._bulk is not None:
                    in_bulk += 1
                getattr(s.proxy, kind)()
                done[kind] += 1
            breaks_done.set()

        # the last 1/(total+2) of the upload waits for the last break: the session cannot end
        # before every break happened
        gate = ((total + 1) * size // (total + 2), breaks_done)
        await asyncio.gather(send_stream(writer, size, 1, app, gate=gate),
                             recv_stream(reader, app), breaker())
        assert await wait_for(lambda: s.backend.closed == 1, 10)
        be = s.backend.conns[0]
        assert app.sent == be.received == size and be.sent == app.received == size
        assert app.sent_hash.digest() == be.recv_hash.digest()
        assert be.sent_hash.digest() == app.recv_hash.digest()
        assert done == dict.fromkeys(kinds, breaks_each)
        # the server's link streams, so breaks hit it in bulk reads too (about 60 % of them
        # here): resuming from those is covered (a link resumed starts with plain reads and
        # switches again). The pure-Python core checksums too slowly for a link to stream
        # for long between the breaks: there, at least one
        if IMPLEMENTATION == "cython":
            assert in_bulk >= max(1, total // 5), f"{in_bulk} of {total} breaks in bulk reads"
        else:
            assert in_bulk >= 1, f"{in_bulk} of {total} breaks in bulk reads"
        assert len(s.backend.conns) == 1  # one session, one backend connection, throughout
        ups = of(ev.LinkUp, cev)
        assert sum(1 for u in ups if u.resumed) >= total
        assert sum(u.replayed for u in ups) > 0
        writer.close()


def test_64mib_each_way_through_ten_breaks_of_each_kind():
    run_async("uvloop", _bulk_through_breaks(64 * 1024 * 1024, 10), timeout=240)


def test_bulk_through_breaks_stdlib_asyncio():
    run_async("asyncio", _bulk_through_breaks(8 * 1024 * 1024, 2), timeout=120)


@pytest.mark.parametrize("loop", LOOPS)
def test_silent_break_shows_disconnected_within_dead_timeout(loop):
    async def main() -> None:
        async with Setup(Backend("echo")) as s:
            reader, writer = await s.client(config=Config(
                keepalive_interval=0.1, dead_timeout=0.4, reliability_timeout=20,
                handshake_timeout=0.5, reconnect_initial=0.02, reconnect_max=0.2))
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            s.proxy.blackhole_new = True  # keep it broken so the state can be seen
            t0 = asyncio.get_running_loop().time()
            s.proxy.blackhole()
            r = s.only_session()
            assert await wait_for(lambda: r.engine.state is State.DISCONNECTED, 2.0)
            took = asyncio.get_running_loop().time() - t0
            assert took <= FAST.dead_timeout + 0.25, took
            (row,) = s.server.sessions()
            assert row["state"] == "DISCONNECTED"
            s.proxy.blackhole_new = False
            assert await wait_for(lambda: r.engine.state is State.ACTIVE, 10)
            writer.write(b"pong")
            assert await reader.readexactly(4) == b"pong"
            assert len(s.server.sessions_by_id) == 1
            writer.close()

    run_async(loop, main())


class _OneWayStall:
    """A TCP proxy whose ``stall`` next connections carry nothing from client to server (the
    server's bytes still reach the client): a handshake whose RESUME is held up on the way."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.stall = 0
        self.conns: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target)
        self.conns.append((cw, sw))
        stalled = self.stall > 0
        self.stall -= stalled

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, drop: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await r.read(65536):
                    if not drop:
                        w.write(data)
            w.close()

        await asyncio.gather(pipe(cr, sw, stalled), pipe(sr, cw, False))

    def reset_all(self) -> None:
        for cw, sw in self.conns:
            abort_with_rst(cw.transport)
            abort_with_rst(sw.transport)

    async def close(self) -> None:
        self.reset_all()
        self.server.close()


def test_server_handshake_timeout_is_not_the_end_of_a_resuming_session():
    """The handshake timeout is local (PROTOCOL.md 5, 3.5), and the server's runs from TCP
    accept, before any TLS handshake, the client's from when its link is up. A RESUME held up
    on the way past the server's timeout got REJECT 7, which ends the client's session (3.6):
    a slow network, not a broken protocol, ended a session that its next attempt would have
    resumed. The server now closes the link without REJECT: a failed attempt, retried."""
    async def main() -> None:
        backend = await Backend("echo").start()
        server = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", backend.port)],
                             dataclasses.replace(FAST, handshake_timeout=0.3))
        await server.start()
        proxy = _OneWayStall(server.addresses[0][1])
        port = await proxy.start()
        events: list[Any] = []
        try:
            reader, writer = await open_session(
                "127.0.0.1", port, config=dataclasses.replace(FAST, handshake_timeout=2.0),
                on_status=lambda e, _s: events.append(e))
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            proxy.stall = 1
            proxy.reset_all()  # the link breaks; the next one's RESUME never arrives
            assert await wait_for(lambda: len(of(ev.LinkUp, events)) == 2, 5)
            writer.write(b"pong")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"pong"
            assert not of(ev.SessionClosed, events)
            assert [e.code for e in of(ev.HandshakeRejected, events)] == [0]
            writer.close()
        finally:
            await proxy.close()
            await server.close()
            await backend.close()

    run_async("asyncio", main())


@pytest.mark.parametrize("loop", LOOPS)
def test_fault_proxy_closes_a_connection_ended_both_ways(loop):
    """A proxied connection whose two ends each sent their EOF (a session's link after a
    graceful end: the server half-closes after its CLOSE, the client closes) is closed by
    the proxy: it held both sockets until the proxy closed, two descriptors per session."""
    async def main() -> None:
        async with Setup(Backend("echo")) as s:
            for _ in range(3):
                reader, writer = await s.client()
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                writer.close()
                await read_until_closed(reader, 5)
            assert await wait_for(lambda: not s.server.sessions_by_id, 5)
            pairs = list(s.proxy.pairs)
            assert await wait_for(lambda: not s.proxy.pairs, 5), (
                f"{len(s.proxy.pairs)} proxied connections left of sessions that ended")
            for p in pairs:
                for side in (p.client, p.server):
                    assert side is None or side.transport is None or side.transport.is_closing()

        # (the same with a plain connection that half-closes each way)
        srv = await asyncio.start_server(_half_close_echo, "127.0.0.1", 0)
        proxy = await FaultProxy("127.0.0.1", srv.sockets[0].getsockname()[1]).start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
            w.write(b"abc")
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 5) == b"abc"
            assert await wait_for(lambda: not proxy.pairs, 5), "the proxy kept the pair"
            w.close()
        finally:
            await proxy.close()
            srv.close()

    run_async(loop, main())


async def _half_close_echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.write(await r.read())
    w.write_eof()
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(r.read(), 5)
    w.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_takeover_of_half_open_link(loop):
    async def main() -> None:
        async with Setup(Backend("echo"), config=Config(
                keepalive_interval=5, dead_timeout=30, reliability_timeout=60,
                reconnect_initial=0.02)) as s:
            reader, writer = await s.client()
            writer.write(b"a" * 1000)
            assert await reader.readexactly(1000) == b"a" * 1000
            r = s.only_session()
            s.proxy.half_open()  # the server's side of the old link stays open and silent
            assert await wait_for(lambda: r.engine.reconnects == 1, 5)
            assert r.engine.state is State.ACTIVE
            lost = [e for e in s.events if isinstance(e, ev.LinkLost)]
            assert lost and "taken over" in lost[-1].reason
            writer.write(b"b" * 1000)
            assert await reader.readexactly(1000) == b"b" * 1000
            assert len(s.server.sessions_by_id) == 1 and len(s.backend.conns) == 1
            writer.close()

    run_async(loop, main())


async def _handshake(port: int, frames_after_hello: bytes | None,
                     session: ClientSession | None = None) -> bytes:
    """Run a client handshake by hand; returns everything the server sent until it closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    c = session or ClientSession(FAST, 0.0)
    c.connect(0.0)
    writer.write(b"".join(bytes(x) for x in c.data_to_send()))
    got = b""
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                break
            got += data
            c.receive_data(data, 0.0)
            out = c.data_to_send()
            if out:
                writer.write(b"".join(bytes(x) for x in out))
    except ConnectionError:
        pass
    writer.close()
    return got


def _reject_code(data: bytes) -> int:
    """Code of the REJECT frame in ``data`` (after an optional server HELLO)."""
    pos = 0
    while pos + HEADER_SIZE <= len(data):
        length = int.from_bytes(data[pos + 4 : pos + 8], "big")
        if data[pos] == FrameType.REJECT:
            return int.from_bytes(data[pos + HEADER_SIZE : pos + HEADER_SIZE + 2], "big")
        pos += HEADER_SIZE + length
    return -1


async def _send_new(port: int, c: ClientSession) -> tuple[asyncio.StreamReader,
                                                          asyncio.StreamWriter]:
    """A link on which ``c`` (a client engine) has sent its HELLO and NEW, and read nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    c.connect(0.0)
    while c.next_event() is not None:
        pass  # (the link it replaces, if any)
    writer.write(b"".join(bytes(x) for x in c.data_to_send()))
    return reader, writer


async def _until_accepted(c: ClientSession, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter, want: int) -> bytes:
    """Feed ``c`` what the server sends until the session is up and ``want`` stream bytes
    have arrived; returns them."""
    got = bytearray()
    for _ in range(100):
        if c.state is State.ACTIVE and len(got) >= want:
            break
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, "the server closed the link"
        c.receive_data(data, 0.0)
        while (e := c.next_event()) is not None:
            if isinstance(e, ev.DataReceived):
                got += e.data
            assert not isinstance(e, ev.HandshakeRejected), e
        out = c.data_to_send()
        if out:
            writer.write(b"".join(bytes(x) for x in out))
    return bytes(got)


@pytest.mark.parametrize("loop", LOOPS)
def test_new_repeated_after_a_lost_accept_gets_the_same_session(loop):
    """PROTOCOL.md 3.2: the ACCEPT of a NEW is lost with its link (the server made the session
    and connected its backend); the client's next NEW, with the same token, gets that session:
    one backend connection, what the backend sent meanwhile replayed from offset 0, a fresh
    secret. Once the client has spoken on a link, the token is spent: a NEW with it makes a
    session of its own."""
    async def main() -> None:
        async with Setup(Backend("echo", banner=b"banner from the backend")) as s:
            c = ClientSession(FAST, 0.0)
            r1, w1 = await _send_new(s.server_port, c)
            assert await wait_for(lambda: len(s.server.sessions_by_id) == 1, 3)
            first = s.only_session()
            secret1 = first.engine._secret
            assert await wait_for(lambda: len(first.engine.tx) == 23, 3)  # the banner, unacked
            abort_with_rst(w1.transport)  # with the ACCEPT and the banner unread
            assert await wait_for(lambda: first.link is None, 3)

            r2, w2 = await _send_new(s.server_port, c)
            assert await _until_accepted(c, r2, w2, 23) == b"banner from the backend"
            assert c.session_id == first.engine.session_id
            assert list(s.server.sessions_by_id.values()) == [first]
            assert len(s.backend.conns) == 1
            assert first.engine._secret != secret1 and c._secret == first.engine._secret
            # the client speaks: the token is spent
            c.send_data(b"x")
            w2.write(b"".join(bytes(x) for x in c.data_to_send()))
            assert await wait_for(lambda: not first.engine.new_token, 3)
            w2.close()

            # a NEW with the spent token is a new session
            again = ClientSession(FAST, 0.0)
            again._new_token = c._new_token
            r3, w3 = await _send_new(s.server_port, again)
            await _until_accepted(again, r3, w3, 23)
            assert again.session_id != c.session_id and len(s.backend.conns) == 2
            w3.close()

    run_async(loop, main())


async def _resume_ready(c: ClientSession, port: int) -> tuple[asyncio.StreamReader,
                                                                asyncio.StreamWriter, bytes]:
    """A link on which ``c`` has sent its HELLO and read the server's; returns it with the
    RESUME ``c`` made for it, not sent yet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    c.connect(0.0)
    while c.next_event() is not None:
        pass  # (the link it replaces)
    writer.write(b"".join(bytes(x) for x in c.data_to_send()))
    c.receive_data(await asyncio.wait_for(reader.read(65536), 5), 0.0)
    while c.next_event() is not None:
        pass
    return reader, writer, b"".join(bytes(x) for x in c.data_to_send())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_stale_resume_does_not_take_over_from_a_newer_link(loop):
    """The client gave up a link after sending RESUME on it and resumed on a newer one; the
    old RESUME reaches the server late (a stalled path), after the newer one was accepted and
    before the client spoke on it. It must not take the session over: that dropped the client's
    current link and rotated the secret from the old one, so the client's next RESUME was
    refused as a wrong proof and the session was lost."""
    async def main() -> None:
        async with Setup(Backend("echo")) as s:
            c = ClientSession(FAST, 0.0)
            r1, w1 = await _send_new(s.server_port, c)
            s.writers.append(w1)
            c.send_data(b"first")
            await _until_accepted(c, r1, w1, 0)
            w1.write(b"".join(bytes(x) for x in c.data_to_send()))
            assert await _until_accepted(c, r1, w1, 5) == b"first"
            sess = s.only_session()
            abort_with_rst(w1.transport)
            assert await wait_for(lambda: sess.link is None, 3)

            ra, wa, resume_a = await _resume_ready(c, s.server_port)  # given up by the client
            rb, wb, resume_b = await _resume_ready(c, s.server_port)  # its current link
            s.writers += [wa, wb]
            wb.write(resume_b)
            assert await _until_accepted(c, rb, wb, 0) == b""
            assert c.session_id == sess.engine.session_id and sess.link is not None
            current = sess.link
            wa.write(resume_a)  # the stale RESUME, proven with the secret before B's
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(ra.read(65536), 5) == b""  # closed, no ACCEPT
            assert sess.link is current and not current.closed
            c.send_data(b"second")
            wb.write(b"".join(bytes(x) for x in c.data_to_send()))
            assert await _until_accepted(c, rb, wb, 6) == b"second"
            assert len(s.backend.conns) == 1

    run_async(loop, main())


def test_new_repeated_on_another_listener_for_the_same_backend_gets_the_same_session():
    """PROTOCOL.md 3.2: a repeated NEW gets its session when it "arrives on a listener for the
    same backend", not only on the very listener of the first NEW. A dual-stack server
    (``--listen 0.0.0.0:2598 --listen [::]:2598 --backend B``) has one listener per address
    family, both for B; a client whose ACCEPT is lost may reach the other address on its next
    try. That NEW made a second session (a second backend connection, the first one left
    open until the reliability timeout)."""
    async def main() -> None:
        backend = await Backend("echo", banner=b"banner").start()
        other = await Backend("echo").start()
        mappings = [Mapping("127.0.0.1", 0, "127.0.0.1", backend.port),
                    Mapping("127.0.0.1", 0, "127.0.0.1", backend.port),
                    Mapping("127.0.0.1", 0, "127.0.0.1", other.port)]
        server = RelayServer(mappings, FAST)
        await server.start()
        try:
            (_, p1), (_, p2), (_, p3) = server.addresses
            c = ClientSession(FAST, 0.0)
            r1, w1 = await _send_new(p1, c)
            assert await wait_for(lambda: len(server.sessions_by_id) == 1, 3)
            (first,) = server.sessions_by_id.values()
            abort_with_rst(w1.transport)  # the ACCEPT unread
            assert await wait_for(lambda: first.link is None, 3)

            r2, w2 = await _send_new(p2, c)  # the other listener for the same backend
            assert await _until_accepted(c, r2, w2, 6) == b"banner"
            assert c.session_id == first.engine.session_id
            assert list(server.sessions_by_id.values()) == [first]
            assert len(backend.conns) == 1
            w2.close()

            # a listener for another backend never gets the session of a token
            again = ClientSession(FAST, 0.0)
            again._new_token = c._new_token
            first.engine.new_token = c._new_token  # (as if the client had not spoken yet)
            r3, w3 = await _send_new(p3, again)
            await _until_accepted(again, r3, w3, 0)
            assert again.session_id != c.session_id and len(other.conns) == 1
            w3.close()
        finally:
            await server.close()
            await backend.close()
            await other.close()

    run_async("asyncio", main())


def test_new_repeated_while_its_backend_connects_takes_the_earlier_links_place():
    """PROTOCOL.md 3.2: the client gave up a link whose NEW is still connecting to the backend
    (to the server that link looks alive) and repeats the NEW: the server closes the earlier
    link and sends the ACCEPT on the new one; one backend connection."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        gate = asyncio.Event()
        connect = loop.create_connection

        async with Setup(Backend("echo")) as s:
            async def slow(factory: Any, host: Any = None, port: Any = None, **kw: Any) -> Any:
                if port == s.backend.port:
                    await gate.wait()
                return await connect(factory, host, port, **kw)

            loop.create_connection = slow  # type: ignore[method-assign]
            try:
                c = ClientSession(FAST, 0.0)
                r1, w1 = await _send_new(s.server_port, c)
                assert await wait_for(lambda: len(s.server._creating) == 1, 3)
                r2, w2 = await _send_new(s.server_port, c)
                # the earlier link is closed
                await read_until_closed(r1, 3)
                gate.set()
                await _until_accepted(c, r2, w2, 0)
                assert len(s.server.sessions_by_id) == 1 and len(s.backend.conns) == 1
                c.send_data(b"ping")
                w2.write(b"".join(bytes(x) for x in c.data_to_send()))
                assert await _until_accepted(c, r2, w2, 4) == b"ping"
                w1.close()
                w2.close()
            finally:
                del loop.create_connection

    run_async("asyncio", main())


@pytest.mark.parametrize("loop", LOOPS)
def test_serve_forever_returns_once_closed(loop):
    """The library's two ways to run: ``serve_forever()`` returns when ``close()`` is called,
    on the server and on the client (under uvloop the listeners' own serve_forever never
    returned)."""
    async def main() -> None:
        backend = await Backend("echo").start()
        srv = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", backend.port)], FAST)
        assert srv.sessions() == []  # (not started: none, and no error)
        with pytest.raises(RuntimeError, match="start"):
            await srv.serve_forever()
        await srv.start()
        client = RelayClient(("127.0.0.1", 0), ("127.0.0.1", srv.addresses[0][1]), FAST)
        await client.start()
        serving = [asyncio.ensure_future(srv.serve_forever()),
                   asyncio.ensure_future(client.serve_forever())]
        try:
            reader, writer = await asyncio.open_connection(*client.addresses[0])
            writer.write(b"served")
            assert await asyncio.wait_for(reader.readexactly(6), 5) == b"served"
            assert not any(t.done() for t in serving)
            await client.close()
            await srv.close()
            await asyncio.wait_for(asyncio.gather(*serving), 2)
            writer.close()
        finally:
            for t in serving:
                t.cancel()
            await backend.close()

    run_async(loop, main())


def test_a_connection_that_ends_in_the_handshake_is_logged(caplog):
    """A client that sent part of its handshake and went away is logged (at INFO, with where
    it stopped); one that only connected and closed (a health check) is not, but at DEBUG."""
    caplog.set_level(logging.DEBUG, logger="icafast")

    async def main() -> None:
        async with Setup(Backend("echo")) as s:
            c = ClientSession(FAST, 0.0)
            c.connect(0.0)
            hello = b"".join(bytes(x) for x in c.data_to_send())
            for part in (b"", hello[:10]):
                _, w = await asyncio.open_connection("127.0.0.1", s.server_port)
                w.write(part)
                await w.drain()
                w.close()
            assert await wait_for(lambda: len(_records()) == 2, 3)

    def _records() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "ended in the handshake" in r.getMessage()]

    run_async("uvloop", main())
    quiet, cut = sorted(_records(), key=lambda r: r.levelno)  # (DEBUG, INFO)
    assert quiet.levelno == logging.DEBUG and "after 0 bytes)" in quiet.getMessage()
    assert cut.levelno == logging.INFO
    assert cut.getMessage().endswith(
        "ended in the handshake: connection closed by peer (after 10 bytes, in the middle of a "
        "frame)"), cut.getMessage()


@pytest.mark.parametrize("loop", LOOPS)
def test_the_server_counts_what_happens_to_its_sessions(loop):
    """``RelayServer.metrics()`` (``icafast sessions --metrics``): sessions by state, and
    counters of what happened since the start, each moved by the event it counts."""
    from icafast.aio import close_sessions

    async def main() -> None:
        async with Setup(Backend("echo")) as s:
            m = s.server.metrics()
            assert m["sessions"] == {"ACTIVE": 0, "DISCONNECTED": 0} and m["counters"] == {}
            cev: list = []
            r, w = await s.client(events=cev)
            w.write(b"x" * 1000)
            assert await r.readexactly(1000) == b"x" * 1000
            s.proxy.reset()
            assert await wait_for(lambda: links_up(cev) == 2, 10)
            w.write(b"y" * 24)
            assert await r.readexactly(24) == b"y" * 24
            # a connection that is not icafast, one cut in its handshake, and a RESUME of a
            # session nobody knows
            r2, w2 = await asyncio.open_connection("127.0.0.1", s.server_port)
            w2.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _reject_code(await asyncio.wait_for(r2.read(), 5)) == REJECT_PROTOCOL
            w2.close()
            fake = ClientSession(FAST, 0.0)
            fake.session_id = b"\x01" * 16
            fake._secret = b"\x02" * 32
            fake._ever_established = True
            assert _reject_code(await _handshake(s.server_port, None, fake)) == (
                REJECT_UNKNOWN_SESSION)
            # (to clients: what they acknowledged, which the last echo's ack brings)
            assert await wait_for(lambda: s.server.metrics()["bytes_to_clients"] == 1024, 5)
            m = s.server.metrics()
            assert m["sessions"] == {"ACTIVE": 1, "DISCONNECTED": 0}, m
            assert m["bytes_from_clients"] == 1024, m
            assert m["counters"] == {"sessions_opened": 1, "resumes": 1,
                                     "handshakes_failed": 1,
                                     "rejected_unknown_session": 1}, m
            await close_sessions()
            assert await wait_for(lambda: not s.server.sessions_by_id, 5)
            m = s.server.metrics()
            assert m["sessions"] == {"ACTIVE": 0, "DISCONNECTED": 0}, m
            assert m["bytes_from_clients"] == 1024 and m["bytes_to_clients"] == 1024, m
            ended = {k: v for k, v in m["counters"].items() if k.startswith("ended_")}
            assert ended == {"ended_aborted": 1}, m  # (a client that stops: CLOSE 1)

    run_async(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_bad_handshakes_are_rejected_and_disturb_no_session(loop):
    async def main() -> None:
        async with Setup(Backend("echo")) as s:
            cev: list[ev.Event] = []
            reader, writer = await s.client(events=cev)
            writer.write(b"x" * 100)
            assert await reader.readexactly(100) == b"x" * 100
            live = s.only_session()
            # (the client's ack of the echo comes with its next frame, a keepalive at the
            # latest: wait for it, so that the snapshot is of a session at rest)
            assert await wait_for(lambda: live.engine.export_state()["peer_ack"] == 100, 5)
            before = live.engine.export_state()
            port = s.server_port

            # 1. garbage instead of a handshake
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            got = await asyncio.wait_for(r.read(), 5)
            w.close()
            assert _reject_code(got) == REJECT_PROTOCOL

            # 2. RESUME of an unknown session
            fake = ClientSession(FAST, 0.0)
            fake.session_id = b"\x01" * 16
            fake._secret = b"\x02" * 32
            fake._ever_established = True
            assert _reject_code(await _handshake(port, None, fake)) == REJECT_UNKNOWN_SESSION

            # 3. RESUME of the live session with a wrong secret
            thief = ClientSession(FAST, 0.0)
            thief.session_id = live.engine.session_id
            thief._secret = b"\x03" * 32
            thief._ever_established = True
            assert _reject_code(await _handshake(port, None, thief)) == REJECT_BAD_PROOF

            # 4. a valid-looking frame header with an absurd length, then silence
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(bytes([1, 0, 0, 0]) + (2**31).to_bytes(4, "big") + bytes(20))
            got = await asyncio.wait_for(r.read(), 5)
            w.close()
            assert _reject_code(got) == REJECT_PROTOCOL

            # the live session never noticed
            after = live.engine.export_state()
            for key in ("session_id", "secret", "state", "rx", "peer_ack", "reconnects"):
                assert before[key] == after[key], key
            assert not of(ev.LinkLost, cev)
            writer.write(b"y" * 100)
            assert await reader.readexactly(100) == b"y" * 100
            assert len(s.server.sessions_by_id) == 1
            writer.close()

    run_async(loop, main())


@pytest.mark.parametrize("action", ["reset", "disconnect"])
def test_reliability_timeout_actions(action):
    async def main() -> None:
        cfg = Config(keepalive_interval=0.1, dead_timeout=0.4, reliability_timeout=0.6,
                     on_timeout=action, hold=1.5, reconnect_initial=0.02, reconnect_max=0.1)
        async with Setup(Backend("echo"), config=cfg) as s:
            cev: list[ev.Event] = []
            reader, writer = await s.client(events=cev)
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            r = s.only_session()
            s.proxy.refuse_new = True
            s.proxy.reset()
            assert await wait_for(lambda: r.engine.state is State.DISCONNECTED, 2)
            if action == "reset":
                assert await wait_for(lambda: not s.server.sessions_by_id, 3)
                assert await wait_for(lambda: s.backend.closed == 1, 2)
                closed = of(ev.SessionClosed, s.events)
                assert closed and "reliability timeout" in closed[-1].reason
                # the client gives up too, after the (server's) reliability timeout, and its
                # application sees a reset, not the end of a stream
                with pytest.raises(ConnectionResetError, match="reliability timeout"):
                    await asyncio.wait_for(reader.read(), 5)
            else:
                assert await wait_for(lambda: r.engine.held, 3)
                assert s.server.sessions()[0]["held"] is True
                assert s.backend.closed == 0  # backend connection kept while held
                s.proxy.refuse_new = False  # the network comes back within the hold time
                assert await wait_for(lambda: r.engine.state is State.ACTIVE, 3)
                writer.write(b"again")
                assert await reader.readexactly(5) == b"again"
                assert len(s.backend.conns) == 1
            writer.close()

    run_async("uvloop", main())


def test_fallback_when_server_refuses():
    async def main() -> None:
        backend = await Backend("echo").start()
        cev: list[ev.Event] = []
        with refusing_port() as port:
            reader, writer = await open_session("127.0.0.1", port, config=FAST,
                                                fallback=("127.0.0.1", backend.port),
                                                on_status=lambda e, _s: cev.append(e))
        writer.write(b"plain")
        assert await reader.readexactly(5) == b"plain"
        assert any("fallback" in e.reason for e in of(ev.HandshakeRejected, cev))
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
        await backend.close()

    run_async("uvloop", main())


def test_fallback_connections_end_when_both_streams_have():
    """A fallback relay whose streams both ended (end of file each way) closes both of its
    connections and is forgotten. Neither connection says more once half-closed both ways
    (the peers' full close gives a relay that reads and writes nothing no event), so both
    stayed open, and the runner with its 256 KiB buffer stayed in the client: two sockets and
    some 300 KiB per fallback session, for as long as the client ran."""
    async def main() -> None:
        backend = await Backend("echo").start()
        with refusing_port() as port:
            client = RelayClient(("127.0.0.1", 0), ("127.0.0.1", port), FAST,
                                 fallback=("127.0.0.1", backend.port))
            await client.start()
            try:
                for i in range(3):
                    reader, writer = await asyncio.open_connection(*client.addresses[0])
                    writer.write(b"plain %d" % i)
                    writer.write_eof()
                    assert await asyncio.wait_for(reader.read(), 10) == b"plain %d" % i
                    writer.close()
                assert await wait_for(lambda: not client.runners, 5), client.runners
                assert await wait_for(lambda: backend.closed == 3, 5)
            finally:
                await client.close()
        await backend.close()

    run_async("uvloop", main())


@pytest.mark.parametrize("banner", [b"SSH-2.0-OpenSSH_9.2\r\n", b""])
def test_fallback_when_server_speaks_another_protocol(banner):
    async def main() -> None:
        backend = await Backend("echo").start()
        wrong = await Backend("echo", banner=banner).start()  # not an icafast server
        reader, writer = await open_session("127.0.0.1", wrong.port, config=FAST,
                                            fallback=("127.0.0.1", backend.port))
        writer.write(b"direct")
        assert await reader.readexactly(6) == b"direct"
        writer.close()
        await backend.close()
        await wrong.close()

    run_async("uvloop", main())


def test_no_fallback_means_connection_error():
    async def main() -> None:
        with refusing_port() as port, pytest.raises(ConnectionError):
            await open_session("127.0.0.1", port, config=FAST)

    run_async("uvloop", main())


@pytest.mark.parametrize("server,fallback,message", [
    (("127.0.0.1", None), None, "server: the port must be a number of 1-65535, not None"),
    (("127.0.0.1", 0), None, "server: the port must be a number of 1-65535, not 0"),
    (("127.0.0.1", "2598"), None, "server: the port must be a number of 1-65535, not '2598'"),
    (("", 2598), None, "server: the host must be a non-empty string"),
    (("127.0.0.1", 2598), ("127.0.0.1", 70000), "fallback: the port must be a number"),
])
def test_library_addresses_are_checked_before_any_attempt(server, fallback, message):
    """A bad address given to the library is refused at once, not retried as failed
    connects until the connect deadline."""
    async def main() -> None:
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(ValueError, match=re.escape(message)):
            await open_session(*server, config=FAST, fallback=fallback)
        with pytest.raises(ValueError, match=re.escape(message)):
            RelayClient(("127.0.0.1", 0), server, FAST, fallback=fallback)
        assert asyncio.get_running_loop().time() - t0 < 1.0
        with pytest.raises(ValueError, match="backend 127.0.0.1:0: the port must be"):
            RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", 0)], FAST)

    run_async("uvloop", main())


def test_multiple_mappings():
    async def main() -> None:
        b1 = await Backend("echo", banner=b"one\n").start()
        b2 = await Backend("echo", banner=b"two\n").start()
        srv = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", b1.port),
                           Mapping("127.0.0.1", 0, "127.0.0.1", b2.port)], FAST)
        await srv.start()
        (h1, p1), (h2, p2) = srv.addresses
        r1, w1 = await open_session(h1, p1, config=FAST)
        r2, w2 = await open_session(h2, p2, config=FAST)
        assert await r1.readline() == b"one\n"
        assert await r2.readline() == b"two\n"
        rows = sorted(srv.sessions(), key=lambda d: d["backend"])
        assert {r["backend"] for r in rows} == {f"127.0.0.1:{b1.port}", f"127.0.0.1:{b2.port}"}
        # each session is listed with the port its listener bound (the mappings asked for 0)
        assert {r["listen"] for r in rows} == {f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"}
        w1.close()
        w2.close()
        await srv.close()
        await b1.close()
        await b2.close()

    run_async("uvloop", main())


@pytest.mark.parametrize("loop", LOOPS)
def test_back_pressure_is_bounded_by_the_replay_limit(loop):
    limit = 1024 * 1024
    size = 160 * 1024 * 1024  # more than every socket buffer on the path can hold

    async def main() -> None:
        cfg = Config(keepalive_interval=0.1, dead_timeout=0.6, replay_limit=limit,
                     reconnect_initial=0.02)
        async with Setup(Backend("stall"), config=cfg) as s:
            reader, writer = await s.client()
            block = bytes(range(256)) * 4096
            sent_hash = hashlib.sha256()
            sent = 0

            async def sender() -> None:
                nonlocal sent
                i = 0
                while sent < size:
                    chunk = i.to_bytes(8, "big") + block  # numbered: reordering would show
                    writer.write(chunk)
                    sent_hash.update(chunk)
                    sent += len(chunk)
                    i += 1
                    await writer.drain()
                writer.write_eof()

            task = asyncio.create_task(sender())
            # the backend reads nothing: the sender must stall long before `size`
            last = -1
            for _ in range(100):
                await asyncio.sleep(0.25)
                if sent == last:
                    break
                last = sent
            assert sent == last and sent < size // 2, (sent, last)
            r = s.only_session()
            assert r.engine.unacked <= limit
            ep = r.endpoint
            assert ep is not None and ep.transport is not None
            # what waits for the backend is bounded by the client's replay limit
            assert ep.transport.get_write_buffer_size() <= limit + WRITE_HIGH_WATER + READ_SIZE
            # a stalled backend is not a dead link: keepalives kept flowing all along
            assert not of(ev.LinkLost, s.events)
            # a link break while stalled loses nothing either
            s.proxy.reset()
            s.backend.release.set()
            await asyncio.wait_for(task, 120)
            assert await wait_for(lambda: s.backend.conns[0].eof, 60)
            be = s.backend.conns[0]
            assert be.received == sent and be.recv_hash.digest() == sent_hash.digest()
            writer.close()

    run_async(loop, main(), timeout=240)


async def _raw_new_session(port: int, replay_limit: int = 1 << 40
                           ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A hand-made client link: HELLO (announcing ``replay_limit``) and NEW, then the
    server's HELLO and ACCEPT read; the stream is then the established link's."""
    from icafast.protocol import MAGIC, encode_frame
    from icafast.wire import FLAG_FIN  # noqa: F401 - (the frame flags a test may need)

    r, w = await asyncio.open_connection("127.0.0.1", port)
    hello = struct.pack(">8sHHIQ32s", MAGIC, 1, 1, 256 * 1024, replay_limit, os.urandom(32))
    w.write(encode_frame(FrameType.HELLO, 0, 0, 0, hello)
            + encode_frame(FrameType.NEW, 0, 0, 0, os.urandom(16)))
    for want in (FrameType.HELLO, FrameType.ACCEPT):
        head = await asyncio.wait_for(r.readexactly(HEADER_SIZE), 10)
        assert head[0] == want, head
        await r.readexactly(struct.unpack_from(">I", head, 4)[0])
    return r, w


async def _drain_reader(r: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError):
        while await r.read(1 << 20):
            pass


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_that_ignores_acks_is_not_read_past_the_replay_limit(loop):
    """A client that keeps sending to a backend that reads nothing, whatever the acks say
    (and announcing a replay limit that would allow it), made the server buffer all of it
    for the backend: gigabytes in seconds. Reading its link now pauses once more than the
    replay limit waits for the backend, without the link counting as dead meanwhile, and
    resumes, losing nothing, when the backend reads again."""
    from icafast.protocol import encode_frame

    limit = 1024 * 1024
    size = 96 * 1024 * 1024

    async def main() -> None:
        cfg = Config(keepalive_interval=0.1, dead_timeout=0.5, replay_limit=limit)
        async with Setup(Backend("stall"), config=cfg) as s:
            r, w = await _raw_new_session(s.server_port)
            drain = asyncio.create_task(_drain_reader(r))
            block = os.urandom(64 * 1024)
            sent = 0
            sent_hash = hashlib.sha256()

            async def sender() -> None:
                nonlocal sent
                while sent < size:  # acks always 0: nothing of the server's is acknowledged
                    w.write(encode_frame(FrameType.DATA, 0, sent, 0, block))
                    sent_hash.update(block)
                    sent += len(block)
                    await w.drain()

            task = asyncio.create_task(sender())
            last = -1
            for _ in range(40):
                await asyncio.sleep(0.25)
                if sent == last:
                    break
                last = sent
            assert sent == last and sent < size // 2, (sent, last)
            runner = s.only_session()
            assert runner.endpoint.transport.get_write_buffer_size() <= limit + 2 * READ_SIZE
            await asyncio.sleep(3 * cfg.dead_timeout)  # not read: not dead either
            assert not of(ev.LinkLost, s.events)
            # (on Linux the held link's dead timeout runs on the TCP acknowledgements of what
            # the server sends on it, which this live client's system gives)
            assert runner.engine._link.reading_paused
            assert runner.engine._link.acks_heard is sys.platform.startswith("linux")
            s.backend.release.set()
            await asyncio.wait_for(task, 120)
            be = s.backend.conns[0]
            assert await wait_for(lambda: be.received == sent, 60), (be.received, sent)
            assert be.recv_hash.digest() == sent_hash.digest()
            assert not of(ev.LinkLost, s.events)
            drain.cancel()
            w.close()

    run_async(loop, main(), timeout=240)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_that_pings_and_reads_nothing_loses_its_link(loop):
    """Each PING is answered with a PONG; a client that sent PINGs and read nothing made the
    server queue PONGs without bound (1.5 GB in 20 s). Beyond a few MiB unsent to a peer
    that reads nothing the link is now closed as lost, and other sessions go on."""
    from icafast.aio._relay import LINK_UNSENT_MAX
    from icafast.protocol import encode_frame

    async def main() -> None:
        async with Setup(Backend("echo")) as s:
            reader, writer = await s.client(direct=True)
            r, w = await _raw_new_session(s.server_port)
            w.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET,
                                                             socket.SO_RCVBUF, 4096)
            pings = encode_frame(FrameType.PING, 0, 1, 0) * 4096
            sent = 0
            # (uvloop's transport raises RuntimeError once the reset closed it)
            with contextlib.suppress(ConnectionError, RuntimeError):
                for _ in range(10_000):  # (at most 1.1 GB: what the old server took)
                    w.write(pings)
                    sent += len(pings)
                    await asyncio.wait_for(w.drain(), 10)
            lost = [e for e in of(ev.LinkLost, s.events) if "reads nothing" in e.reason]
            assert lost, (sent, s.events)
            assert sent < 40 * LINK_UNSENT_MAX
            writer.write(b"still here")
            assert await asyncio.wait_for(reader.readexactly(10), 10) == b"still here"
            w.close()

    run_async(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_stalled_client_holds_the_server_to_its_send_window(loop):
    """The server sizes its send window from the link's handshake round trip: with the client
    application reading nothing, what the server keeps unacknowledged stops at that window
    (4 MiB on loopback, against the 8 MiB replay limit), and a break then loses nothing."""
    size = 64 * 1024 * 1024
    limit = 8 * 1024 * 1024

    async def main() -> None:
        cfg = Config(keepalive_interval=0.2, dead_timeout=1.2, replay_limit=limit,
                     reconnect_initial=0.02)
        async with Setup(Backend("stream", size=size), config=cfg) as s:
            reader, writer = await s.client()
            assert await wait_for(lambda: len(s.server.sessions_by_id) == 1, 10)
            r = s.only_session()
            eng = r.engine
            last = -1
            for _ in range(100):  # until the server stops taking from the backend
                await asyncio.sleep(0.2)
                if eng.tx.end == last:
                    break
                last = eng.tx.end
            assert eng.tx.end == last < size, "the server never stopped"
            rtt = eng.handshake_rtt
            assert rtt is not None and 0 <= rtt < 1.0  # (uvloop's clock counts whole ms)
            assert eng.send_window == send_window_for(rtt, limit) == eng.stats(0.0)["send_window"]
            # filled to the window, and no further (reading resumes only once a read's worth
            # is free, so the last acks may leave a little less)
            assert eng.send_window - READ_SIZE <= eng.unacked <= eng.send_window
            assert eng.tx.capacity < 2 * eng.send_window  # (the ring grows by doubling)
            s.proxy.reset()
            app = Stats()
            await asyncio.wait_for(recv_stream(reader, app), 60)
            be = s.backend.conns[0]
            assert app.received == size and app.recv_hash.digest() == be.sent_hash.digest()
            writer.close()

    run_async(loop, main(), timeout=120)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("backend", ["echo", "slow"])
@pytest.mark.parametrize("tls_io", [None, "auto", "pure", "loop"])
def test_a_streaming_link_reads_into_the_shared_buffer_and_goes_back_when_quiet(
        loop, backend, tls_io, tmp_path, monkeypatch):
    """A link whose reads are large switches to reading into the thread's shared buffer (no
    bytes object per read), and back to plain reads when messages are small again. Payload
    views of a read that the backend's socket has not taken yet keep their buffer: with a
    backend that reads slowly, the link must take a new buffer, or the queued bytes would be
    overwritten. Plain links, and TLS links of every kind (``tls_io``: opened by the compiled
    pipe or its Python twin, or by the event loop's TLS transport).

    Python 3.10's asyncio TLS transport hands over one record (16 KiB at most) per read, so a
    link on it never streams: there the test checks that it relays all the same."""
    size = 24 * 1024 * 1024
    record_reads = tls_io == "loop" and loop == "asyncio" and sys.version_info < (3, 11)
    if tls_io is not None:
        monkeypatch.setenv("ICAFAST_TLS_IO", tls_io)
    kw, ctls = tls_for(tmp_path, tls_io is not None)

    async def main() -> None:
        async with Setup(Backend("echo", delay=0.002 if backend == "slow" else 0.0), **kw) as s:
            reader, writer = await s.client(tls=ctls)
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            r = s.only_session()
            link = r.link
            assert isinstance(link, Link) and link._bulk is None and link.bulk_starts == 0
            allocated = _bulk_buffer.allocated  # (this thread's, as the relay's)
            app = Stats()

            async def receive() -> None:
                while app.received < size:
                    data = await reader.read(512 * 1024)
                    assert data
                    app.recv_hash.update(data)
                    app.received += len(data)

            await asyncio.gather(send_stream(writer, size, 7, app, eof=False), receive())
            assert app.received == size and app.recv_hash.digest() == app.sent_hash.digest()
            if record_reads:
                assert link.bulk_starts == 0 and link._bulk is None
                assert r.link is link and not of(ev.LinkLost, s.events)
                writer.close()
                return
            assert link.bulk_starts >= 1  # it streamed
            assert link.bulk_reads >= 1
            if backend == "echo":  # a backend that keeps up: the thread's buffer is reused
                assert _bulk_buffer.allocated - allocated < link.bulk_reads
            assert link.transport.get_protocol() in (link, link._bulk)
            for i in range(40):  # small messages: back to plain reads within a few
                msg = b"%d" % i * 8
                writer.write(msg)
                assert await reader.readexactly(len(msg)) == msg
                if link._bulk is None:
                    break
            assert link._bulk is None and link.transport.get_protocol() is link
            assert r.link is link and not of(ev.LinkLost, s.events)
            writer.close()

    run_async(loop, main(), timeout=120)


def _notsent_bytes(sock: Any) -> int:
    """Bytes the kernel holds unsent in a TCP socket (``tcpi_notsent_bytes`` of TCP_INFO)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    assert len(info) >= 148, "kernel's TCP_INFO has no notsent_bytes"
    return int(struct.unpack_from("=I", info, 144)[0])


@pytest.mark.skipif(sys.platform != "linux", reason="reads Linux's TCP_INFO")
@pytest.mark.parametrize("loop", LOOPS)
def test_a_link_whose_peer_stops_reading_keeps_little_unsent_in_the_kernel(loop):
    """Links set TCP_NOTSENT_LOWAT: when the far end stops reading, the kernel holds about
    LINK_NOTSENT_LOWAT unsent (not its whole send buffer, megabytes); the rest waits in the
    replay buffer. The application and backend sockets keep the default. Nothing is lost."""
    size = 48 * 1024 * 1024

    async def main() -> None:
        # keepalives cannot cross the stopped direction: a dead timeout far beyond the test's
        cfg = Config(keepalive_interval=1.0, dead_timeout=60.0, replay_limit=8 * 1024 * 1024)
        async with Setup(Backend("stream", size=size), config=cfg) as s:
            reader, writer = await s.client()
            (pair,) = s.proxy.pairs
            assert pair.server is not None and pair.server.transport is not None
            # a receive buffer far below the replay limit: the server's writes back up in its
            # own socket once the proxy stops reading, whatever this host's autotuning allows
            pair.server.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
            app = Stats()
            task = asyncio.create_task(recv_stream(reader, app))
            assert await wait_for(lambda: app.received >= 4 * 1024 * 1024, 20)
            pair.server.transport.pause_reading()  # the server's link: its peer reads no more
            r = s.only_session()
            assert r.link is not None and r.endpoint is not None
            link_sock = r.link.transport.get_extra_info("socket")
            backend_sock = r.endpoint.transport.get_extra_info("socket")
            lowat = socket.TCP_NOTSENT_LOWAT
            assert link_sock.getsockopt(socket.IPPROTO_TCP, lowat) == LINK_NOTSENT_LOWAT
            assert backend_sock.getsockopt(socket.IPPROTO_TCP, lowat) == 0
            for sk in (link_sock, backend_sock):  # (set on the descriptor, still open)
                assert sk.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            last = -1
            for _ in range(100):  # until the server stops taking from the backend
                await asyncio.sleep(0.2)
                if r.engine.tx.end == last:
                    break
                last = r.engine.tx.end
            assert r.engine.tx.end == last < size, "the server never stopped"
            notsent = _notsent_bytes(link_sock)
            # a write goes in while less than the low mark is unsent, so one write's worth over
            assert 0 < notsent <= 2 * LINK_NOTSENT_LOWAT, notsent
            assert r.engine.unacked > 2 * LINK_NOTSENT_LOWAT  # the rest waits for replay
            pair.server.transport.resume_reading()
            await asyncio.wait_for(task, 60)
            be = s.backend.conns[0]
            assert app.received == size and app.recv_hash.digest() == be.sent_hash.digest()
            assert not of(ev.LinkLost, s.events)
            writer.close()

    run_async(loop, main(), timeout=120)


def test_tune_socket_sets_nodelay_where_the_event_loop_does_not():
    """uvloop and asyncio set TCP_NODELAY on every TCP socket themselves, so tune_socket does
    not set it again for their transports (the test above reads it on a session's sockets with
    each loop); on a transport of any other kind it does."""

    class OtherTransport(asyncio.Transport):
        def __init__(self, sock: socket.socket) -> None:
            super().__init__()
            self.sock = sock

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return self.sock if name == "socket" else default

        def set_write_buffer_limits(self, high: int | None = None,
                                    low: int | None = None) -> None:
            self.limits = (high, low)

    with socket.create_server(("127.0.0.1", 0)) as lsock:
        with socket.create_connection(lsock.getsockname()) as sock:
            assert not sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            tune_socket(OtherTransport(sock))
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert sock.fileno() >= 0  # (the descriptor is still the transport's)


@pytest.mark.parametrize("loop", LOOPS)
def test_half_close_propagates_in_order(loop):
    async def main() -> None:
        async with Setup(Backend("echo")) as s:
            reader, writer = await s.client()
            writer.write(b"request")
            writer.write_eof()
            assert await reader.read() == b"request"  # echo, then the backend's EOF
            assert await wait_for(lambda: not s.server.sessions_by_id, 5)
            closed = of(ev.SessionClosed, s.events)
            assert closed and closed[-1].graceful
            writer.close()

    run_async(loop, main())


def test_backend_reset_closes_the_application_connection():
    async def main() -> None:
        async with Setup(Backend("echo")) as s:
            reader, writer = await s.client()
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            abort_with_rst(s.backend.writers[0].transport)  # the backend dies with a TCP reset
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 5)
            assert await wait_for(lambda: not s.server.sessions_by_id, 5)

    run_async("uvloop", main())


def test_backend_down_gives_reject_and_no_session():
    async def main() -> None:
        with refusing_port() as backend:
            srv = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", backend)], FAST)
            await srv.start()
            try:
                with pytest.raises(ConnectionError, match="backend"):
                    await open_session(*srv.addresses[0], config=FAST)
                assert not srv.sessions_by_id
            finally:
                await srv.close()

    run_async("uvloop", main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_rejected_session_of_the_listening_client_leaves_no_unretrieved_error(loop):
    """``icafast connect``'s listener gives each application connection a session that no
    one awaits. When the server rejects it (here: its backend refuses), the client closes the
    application's connection and logs why (at INFO): no "Future exception was never
    retrieved" error from the event loop when the session is freed."""
    from icafast.aio import RelayClient

    errors: list[dict[str, Any]] = []

    async def main() -> None:
        lp = asyncio.get_running_loop()
        lp.set_exception_handler(lambda _lp, ctx: errors.append(ctx))
        with refusing_port() as backend:
            srv = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", backend)], FAST)
            await srv.start()
            client = RelayClient(("127.0.0.1", 0), srv.addresses[0], FAST)
            await client.start()
            try:
                for _ in range(3):
                    r, w = await asyncio.open_connection(*client.addresses[0])
                    with pytest.raises(ConnectionError):  # a reset, or the stream's end
                        if await asyncio.wait_for(r.read(), 10) == b"":
                            raise ConnectionError("closed")
                    w.close()
                assert await wait_for(lambda: not client.runners, 5)
                gc.collect()
                await asyncio.sleep(0)
            finally:
                await client.close()
                await srv.close()

    run_async(loop, main())
    assert not errors, [e.get("message") for e in errors]


@pytest.mark.parametrize("loop", LOOPS)
def test_new_session_sizes_the_server_window_from_the_tcp_round_trip(loop):
    """A new session's NEW goes with the client's HELLO, so the server has no HELLO round trip
    of its own: it reads the TCP connection's (Linux TCP_INFO) and sizes its window from it."""
    async def main() -> None:
        async with Setup(Backend("echo")) as s:
            r, w = await s.client(direct=True)
            w.write(b"x")
            assert await r.readexactly(1) == b"x"
            runner = s.only_session()
            eng = runner.engine
            if not sys.platform.startswith("linux"):
                assert eng.handshake_rtt is None  # (no TCP_INFO: the window stays the limit)
                return
            assert eng.handshake_rtt is not None and 0 < eng.handshake_rtt < 0.5
            assert eng.send_window == send_window_for(eng.handshake_rtt, eng.config.replay_limit)
            now = tcp_rtt(runner.link.transport)  # (the kernel's estimate, updated since)
            assert now is not None and 0 < now < 0.5

    run_async(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_backend_that_never_answers_gives_reject_within_its_deadline(loop):
    """A backend whose connection never completes (here: a listener whose accept queue is
    full, so the kernel drops the SYNs) costs the client a REJECT once
    ``backend_connect_timeout`` passes, and leaves no session and no task behind."""
    async def main() -> None:
        lp = asyncio.get_running_loop()
        with unanswering_backend() as backend:
            srv = RelayServer([Mapping("127.0.0.1", 0, *backend)], FAST,
                              backend_connect_timeout=0.3)
            await srv.start()
            t0 = lp.time()
            with pytest.raises(ConnectionError, match="no connection within 0.3 s"):
                await open_session(*srv.addresses[0], config=FAST)
            # (less 1 ms: the loop's clock, and so its timers, count whole milliseconds)
            assert 0.3 - 0.001 <= lp.time() - t0 < FAST.handshake_timeout
            assert not srv.sessions_by_id and not srv._handshaking
            assert await wait_for(lambda: not srv._tasks, 2.0)
            await srv.close()

    run_async(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_the_servers_hello_goes_with_its_answer_to_new(loop):
    """A new session's NEW comes with the client's HELLO; the server's HELLO then goes in one
    write with its ACCEPT, or with the REJECT when the backend cannot be reached (here: never
    answers), not in a write of its own ahead of it."""
    from icafast import FrameDecoder

    async def first_frames(port: int, wait: float) -> tuple[list[int], float]:
        c = ClientSession(FAST, 0.0)
        c.connect(0.0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"".join(bytes(x) for x in c.data_to_send()))  # HELLO + NEW
        t0 = asyncio.get_running_loop().time()
        data = await asyncio.wait_for(reader.read(65536), wait)
        took = asyncio.get_running_loop().time() - t0
        writer.close()
        return [f.type for f in FrameDecoder().feed(data)], took

    async def main() -> None:
        async with Setup(Backend("echo")) as s:
            types, _ = await first_frames(s.server_port, 5.0)
            assert types == [FrameType.HELLO, FrameType.ACCEPT]
        with unanswering_backend() as backend:
            srv = RelayServer([Mapping("127.0.0.1", 0, *backend)], FAST,
                              backend_connect_timeout=0.3)
            await srv.start()
            types, took = await first_frames(srv.addresses[0][1], 5.0)
            # (less 1 ms: the loop's clock, and so its timers, count whole milliseconds)
            assert types == [FrameType.HELLO, FrameType.REJECT] and took >= 0.3 - 0.001, \
                (types, took)
            await srv.close()

    run_async(loop, main())


def test_control_socket_list_disconnect_reset(tmp_path):
    path = str(tmp_path / "ctl" / "control.sock")

    async def main() -> None:
        async with Setup(Backend("echo"), control_path=path) as s:
            reader, writer = await s.client()
            writer.write(b"abc")
            assert await reader.readexactly(3) == b"abc"
            loop = asyncio.get_running_loop()
            reply = await loop.run_in_executor(None, control_request, path, {"cmd": "list"})
            (row,) = reply["sessions"]
            assert row["state"] == "ACTIVE" and row["bytes_in"] == 3 and row["bytes_out"] >= 0
            if sys.platform.startswith("linux"):  # before any keepalive: the kernel's figure
                assert row["rtt_ms"] is not None and row["rtt_ms"] > 0, row
            for key in ("id", "client", "backend", "age", "idle", "unacked", "replay_capacity",
                        "rtt_ms", "reconnects"):
                assert key in row
            import os
            import stat

            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            r = s.only_session()
            await loop.run_in_executor(None, control_request, path,
                                       {"cmd": "disconnect", "id": row["id"][:8]})
            assert await wait_for(lambda: r.engine.reconnects == 1, 5)
            writer.write(b"def")
            assert await reader.readexactly(3) == b"def"
            reply = await loop.run_in_executor(None, control_request, path,
                                               {"cmd": "reset", "id": row["id"]})
            assert reply["ok"]
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 5)
            bad = await loop.run_in_executor(None, control_request, path,
                                             {"cmd": "reset", "id": "ffff"})
            assert not bad["ok"] and bad["error"] == "no session matches 'ffff'", bad

    run_async("uvloop", main())


def _raw_control(path: str, line: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect(path)
        c.sendall(line)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = c.recv(65536)
            assert chunk, f"no reply to {line[:40]!r}"
            buf += chunk
    return json.loads(buf)


def test_control_socket_answers_junk_with_an_error(tmp_path, caplog):
    """Requests that are not what ``icafast sessions`` sends get an error reply each, and
    touch no session (they raised in the server's handler: no reply and a traceback); an
    empty id is no prefix of every id."""
    path = str(tmp_path / "control.sock")

    async def main() -> None:
        async with Setup(Backend("echo"), control_path=path) as s:
            reader, writer = await s.client()
            loop = asyncio.get_running_loop()
            cases = {
                b"[1, 2]\n": "a request is a JSON object",
                b"5\n": "a request is a JSON object",
                b"null\n": "a request is a JSON object",
                b"[" * 100_000 + b"\n": "request longer than 64 KiB",
                # (too deep for the parser's recursion, or, where it goes deeper, unended)
                b"[" * 60_000 + b"\n": ("nested too deeply", "Expecting value"),
                b"not json\n": "Expecting value",
                b'{"cmd": "reset", "id": ""}\n': "no session id given",
                b'{"cmd": "disconnect"}\n': "id",
                b'{"cmd": "halt"}\n': "unknown command 'halt'",
            }
            for line, why in cases.items():
                reply = await loop.run_in_executor(None, _raw_control, path, line)
                assert reply["ok"] is False, (line[:30], reply)
                assert any(w in reply["error"] for w in (why if isinstance(why, tuple)
                                                         else (why,))), (line[:30], reply)
            writer.write(b"still here")
            assert await reader.readexactly(10) == b"still here"
            assert s.only_session().engine.reconnects == 0

    caplog.set_level(logging.INFO, logger="asyncio")
    run_async("uvloop", main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_control_socket_refuses_a_directory_others_may_change(tmp_path):
    """A control directory that other users can write to (not sticky), or that belongs to
    another user, could have the socket replaced by theirs: the server refuses to start on
    it. A sticky one such as /tmp is fine (no one may remove another's socket there)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(theirs, 65534, 65534)

    async def start(path: str) -> None:
        srv = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", free_port())], FAST,
                          control_path=path)
        try:
            await srv.start()
        finally:
            await srv.close()

    async def main() -> None:
        with pytest.raises(OSError, match="shared is writable by other users .mode 0777."):
            await start(str(shared / "control.sock"))
        assert not os.path.exists(shared / "control.sock")
        if os.geteuid() == 0:
            for path in (theirs / "control.sock", theirs / "icafast" / "control.sock"):
                with pytest.raises(OSError, match="theirs belongs to user 65534"):
                    await start(str(path))
        await start(str(sticky / "control.sock"))

    run_async("uvloop", main())


def test_control_socket_of_a_running_server_is_not_taken(tmp_path):
    """A second server given the same control socket refuses to start, and the first keeps
    it; a socket file left by a server that is gone is replaced."""
    path = str(tmp_path / "control.sock")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with Setup(Backend("echo"), control_path=path):
            second = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", free_port())], FAST,
                                 control_path=path)
            with pytest.raises(OSError, match="in use by another running server"):
                await second.start()
            await second.close()
            reply = await loop.run_in_executor(None, control_request, path, {"cmd": "list"})
            assert reply["ok"] and reply["sessions"] == []
        assert not os.path.exists(path)
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)  # a socket file that nothing listens on any more
        stale.close()
        third = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", free_port())], FAST,
                            control_path=path)
        await third.start()
        try:
            reply = await loop.run_in_executor(None, control_request, path, {"cmd": "list"})
            assert reply["ok"]
        finally:
            await third.close()

    run_async("uvloop", main())


def test_an_unreachable_backend_is_a_warning(caplog):
    """The client is refused, and the operator is told at WARNING (it is theirs to fix)."""
    async def main() -> None:
        with refusing_port() as backend:
            srv = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", backend)], FAST)
            await srv.start()
            try:
                with pytest.raises(ConnectionError):
                    await open_session(*srv.addresses[0], config=FAST)
            finally:
                await srv.close()

    with caplog.at_level(logging.INFO, logger="icafast"):
        run_async("uvloop", main())
    (rec,) = [r for r in caplog.records if "connection from" in r.getMessage()]
    assert rec.levelno == logging.WARNING and "rejected: backend 127.0.0.1:" in rec.getMessage()


def test_many_sessions_at_once_stay_separate():
    async def main() -> None:
        async with Setup(Backend("echo")) as s:
            pairs = [await s.client() for _ in range(20)]
            for i, (_r, w) in enumerate(pairs):
                w.write(hashlib.sha256(bytes([i])).digest())
            s.proxy.reset()
            for i, (r, _w) in enumerate(pairs):
                assert await r.readexactly(32) == hashlib.sha256(bytes([i])).digest()
            assert len(s.server.sessions_by_id) == 20
            for _r, w in pairs:
                w.close()

    run_async("uvloop", main())


@pytest.mark.parametrize("loop", LOOPS)
def test_idle_sessions_share_timer_ticks(loop):
    """Idle sessions' keepalive deadlines are rounded up to shared ticks (one loop timer per
    tick for all of them), and the keepalive still runs: the server's PINGs are answered and
    no link is lost."""
    cfg = Config(keepalive_interval=0.3, dead_timeout=1.2, reliability_timeout=20)

    async def main() -> None:
        async with Setup(Backend("echo"), config=cfg) as s:
            pairs = [await s.client(config=cfg) for _ in range(30)]
            for r, w in pairs:
                w.write(b"x")
                assert await r.readexactly(1) == b"x"
            await asyncio.sleep(1.0)  # idle for three keepalive intervals
            runners = list(s.server.sessions_by_id.values())
            assert len(runners) == 30
            assert all(r.engine.srtt is not None for r in runners)
            assert not [e for e in s.events if isinstance(e, ev.LinkLost)]
            ticks = _ticks_of(asyncio.get_running_loop())
            for r in runners:
                assert r._timer is None and r._tick in ticks.due
                assert r._timer_at == r._tick * TIMER_TICK >= r.engine.get_timer()
            # all deadlines lie within one keepalive interval (0.3 s: at most 20 ticks), so
            # some of the 30 sessions share a tick, and so a loop timer
            assert len({r._tick for r in runners}) <= 20

    run_async(loop, main())


def test_a_failing_timer_does_not_stop_the_others_of_its_tick(caplog):
    """Runners due at the same tick share one loop timer: one that raises is logged, and the
    others still fire."""
    fired = []

    class Boom(ServerSession):
        def handle_timer(self, now: float) -> None:
            raise RuntimeError("boom")

    class Counted(ServerSession):
        def handle_timer(self, now: float) -> None:
            fired.append(self.session_id)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        runners = []
        for cls, name in ((Counted, b"a"), (Boom, b"b"), (Counted, b"c")):
            engine = cls(Config(), loop.time())
            engine.session_id = name
            runners.append(Runner(loop, engine, "server"))
        tick = -int(-(loop.time() + 0.05) // TIMER_TICK)
        for r in runners:
            r._tick = tick
            r._ticks.add(r, tick)
        await asyncio.sleep(0.05 + 2 * TIMER_TICK)

    run_async("asyncio", main())
    assert fired == [b"a", b"c"]
    assert "timer failed" in caplog.text and "boom" in caplog.text


@pytest.mark.parametrize("loop", LOOPS)
def test_ended_sessions_are_freed_at_once(loop):
    """What a session holds (runner, engine and replay buffers, links, transports) is freed
    when it ends, not when its last timer would have fired: the shared ticks hold an emptied
    slot, and a lingering link whose peer closed does not wait out LINGER. (The ticks used to
    keep every ended session for up to the dead timeout: 10 s by default, so a relay opening
    1,000 sessions a second held 10,000 ended ones.)"""
    cfg = Config(reliability_timeout=20.0)  # default keepalive (3 s) and dead timeout (10 s)

    async def main() -> None:
        lp = asyncio.get_running_loop()
        async with Setup(Backend("echo"), config=cfg) as s:
            pairs = [await s.client(config=cfg) for _ in range(10)]
            for r, w in pairs:
                w.write(b"x")
                assert await r.readexactly(1) == b"x"
            runners = [r for r in RUNNERS if r.loop is lp]
            assert len(runners) == 20  # 10 client and 10 server sessions
            assert all(r._tick for r in runners)  # each waits for a keepalive tick
            refs = [weakref.ref(r) for r in runners]
            refs += [weakref.ref(r.link) for r in runners if r.link is not None]
            del runners
            for r, w in pairs:
                w.close()
                assert await r.read() == b""  # the backend's end, after ours
            for _ in range(100):  # the server's CLOSE, and both sides close their links
                if not s.server.sessions_by_id and not any(
                        ref() is not None and not getattr(ref(), "closed", True)
                        for ref in refs):
                    break
                await asyncio.sleep(0.02)
            s.writers.clear()
            del pairs, r, w
            await asyncio.sleep(0.1)
            gc.collect()
            alive = [type(ref()).__name__ for ref in refs if ref() is not None]
            assert alive == []
            assert _ticks_of(lp).due  # ticks are still to fire: they hold no session

    run_async(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("tls_on", [False, True])
def test_ended_sessions_need_no_garbage_collector(loop, tls_on, tmp_path):
    """An ended session holds no reference cycle, so reference counting frees it (and all it
    holds) as it ends: with the cyclic garbage collector switched off, nothing of ten sessions
    through ``icafast connect``'s client and the server stays. (Runner and endpoint referred to
    each other, and a link attempt to its deadline: each session waited for a collector pass,
    which then had all of it to walk, 4-11 % of a new session's instructions.)"""

    kw, ctls = tls_for(tmp_path, tls_on)

    async def main() -> None:
        lp = asyncio.get_running_loop()
        async with Setup(Backend("echo"), **kw) as s:
            async with listening_client(("127.0.0.1", s.server_port), tls=ctls) as client:
                conns = [await asyncio.open_connection(*client.addresses[0]) for _ in range(10)]
                for r, w in conns:
                    w.write(b"ping")
                    assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
                runners = [r for r in RUNNERS if r.loop is lp]
                assert len(runners) == 20  # 10 client and 10 server sessions
                refs = [weakref.ref(r) for r in runners]
                refs += [weakref.ref(r.endpoint) for r in runners if r.endpoint is not None]
                refs += [weakref.ref(r.link) for r in runners if r.link is not None]
                del runners
                for r, w in conns:
                    w.close()
                    assert await asyncio.wait_for(r.read(), 10) == b""
                    await w.wait_closed()
                del conns, r, w
                # (each side ends its session, its link lingers until the peer closes it)
                assert await wait_for(lambda: all(ref() is None for ref in refs), 10), \
                    [type(ref()).__name__ for ref in refs if ref() is not None]

    gc.collect()
    gc.disable()
    try:
        run_async(loop, main())
    finally:
        gc.enable()


def test_tombstones_of_ended_sessions_expire_in_order():
    """Ended sessions' ids are kept for a minute (a late RESUME gets CLOSED, not UNKNOWN), and
    each session that ends drops those that expired, oldest first: the store stays as large as
    a minute of ended sessions, with no pass over all of it."""
    from types import SimpleNamespace

    clock = SimpleNamespace(t=1000.0)
    srv = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", 1)], Config(dead_timeout=10.0))
    srv.loop = SimpleNamespace(time=lambda: clock.t)  # type: ignore[assignment]

    def end(sid: bytes) -> None:
        srv._forget(SimpleNamespace(engine=SimpleNamespace(session_id=sid),  # type: ignore
                                    new_token=b"", source="?"))

    for i in range(1000):  # 1,000 sessions end within 10 s
        end(b"a%03d" % i)
        clock.t += 0.01
    assert len(srv._tombstones) == 1000
    assert srv._tombstones[b"a000"] == 1060.0  # kept for max(60 s, 2 * dead_timeout)
    clock.t = 1060.0 + 0.005  # a000 has expired (1060.00); a001 (1060.01) has not
    end(b"b")
    assert b"a000" not in srv._tombstones and b"a001" in srv._tombstones
    assert len(srv._tombstones) == 1000 and len(srv._tombstone_order) == 1000
    clock.t = 2000.0  # all of them expired: the next ended session drops them all
    end(b"c")
    assert list(srv._tombstones) == [b"c"] and len(srv._tombstone_order) == 1


def test_server_handshake_engine_rejects_version_mismatch():
    import struct

    from icafast.protocol import MAGIC, encode_frame

    hs = ServerHandshake(FAST, 0.0)
    hello = struct.pack(">8sHHIQ32s", MAGIC, 7, 9, 65536, 1 << 20, b"n" * 32)
    hs.receive_data(encode_frame(FrameType.HELLO, 0, 0, 0, hello), 0.0)
    out = b"".join(bytes(x) for x in hs.data_to_send())
    assert out[0] == FrameType.REJECT and hs.done


def test_first_connect_is_retried_through_a_blink():
    async def main() -> None:
        async with Setup(Backend("echo")) as s:
            s.proxy.refuse_new = True
            cfg = Config(keepalive_interval=0.1, dead_timeout=0.4, handshake_timeout=1.0,
                         reconnect_initial=0.02, reconnect_max=0.1, connect_retry=5.0)
            task = asyncio.ensure_future(s.client(config=cfg))
            await asyncio.sleep(0.5)  # the network is down while the application connects
            assert not task.done()
            s.proxy.refuse_new = False
            reader, writer = await asyncio.wait_for(task, 5)
            writer.write(b"late but fine")
            assert await reader.readexactly(13) == b"late but fine"

    run_async("uvloop", main())


def test_endpoint_reads_a_burst_like_the_last_one_in_one_read():
    """The read size follows the bursts the application or backend writes: a 17 KB pipelined
    batch takes two reads the first time and one after; small messages bring it back down;
    a bulk stream grows it to READ_SIZE."""

    class Engine:
        send_free = 1 << 40

        def send_view(self, n: int) -> memoryview:
            return memoryview(bytearray(n))

        def commit_view(self, n: int) -> None:
            pass

    class FakeRunner:
        engine = Engine()

        def pump(self) -> None:
            pass

    ep = Endpoint(FakeRunner())

    def burst(total: int) -> list[int]:
        """The reads that receive ``total`` waiting bytes (the socket is drained by a read
        smaller than its offer)."""
        reads: list[int] = []
        for _ in range(1000):
            if reads and sum(reads) == total:
                return reads  # the last read filled its offer: the next one finds nothing
            offered = len(ep.get_buffer(-1))
            n = min(total - sum(reads), offered)
            ep.buffer_updated(n)
            reads.append(n)
            if n < offered:
                return reads
        raise AssertionError("unbounded")

    assert burst(17_000) == [MIN_READ_SIZE, 17_000 - MIN_READ_SIZE]
    assert burst(17_000) == [17_000]
    assert burst(17_000) == [17_000]
    assert burst(64) == [64]
    assert burst(64) == [64] and len(ep.get_buffer(-1)) == MIN_READ_SIZE
    reads = burst(8 * READ_SIZE + 1)
    assert max(reads) == READ_SIZE and sum(reads) == 8 * READ_SIZE + 1
    assert burst(3 * READ_SIZE)[0] == READ_SIZE  # a bulk stream keeps the large reads


class _RecordingTransport:
    """Records what the runner writes to an endpoint or link (nothing is ever backlogged)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def write(self, data: Any) -> None:
        self.calls.append(("write", bytes(data)))

    def writelines(self, bufs: Any) -> None:
        self.calls.append(("writelines", [bytes(b) for b in bufs]))

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.calls.append(("write_eof",))


def test_frames_of_one_link_read_reach_the_sink_in_one_writelines_before_the_fin():
    """Several DATA frames decoded from one read of the link go to the endpoint as one
    ``writelines`` (one writev, not a write per frame), in order, and a FIN in the same read is
    passed on only after them."""
    h = Harness()
    h.open_link()
    h.pump()
    payloads = [bytes([i]) * 65536 for i in range(3)]
    for p in payloads:
        assert h.server_send(p) == len(p)
    h.server.send_eof()
    w = h.wire
    assert w is not None
    h._server_out(w)
    wire_bytes = bytes(w.s2c)
    assert len(wire_bytes) > 3 * (65536 + HEADER_SIZE)  # all three frames and the FIN

    loop = asyncio.new_event_loop()
    try:
        runner = Runner(loop, h.client, "client")
        runner._time = lambda: h.now
        ep, ep_t = Endpoint(runner), _RecordingTransport()
        ep.transport, ep._write, ep._writelines = ep_t, ep_t.write, ep_t.writelines
        ep._buffered = ep_t.get_write_buffer_size
        link, link_t = Link(runner), _RecordingTransport()
        link.transport, link._write, link._writelines = link_t, link_t.write, link_t.writelines
        link.link_id = h.client.link_id
        runner.endpoint, runner.link = ep, link
        runner.link_data(link, wire_bytes)
    finally:
        loop.close()
    assert ep_t.calls == [("writelines", payloads), ("write_eof",)]


@pytest.mark.parametrize("tls_on", [False, True])
def test_a_link_deadline_that_passes_as_the_link_comes_up_does_not_fail_it(tmp_path, tls_on,
                                                                           monkeypatch):
    """The deadline of a link attempt fires in the same loop iteration in which the link was
    handed to its session, before the attempt's task resumed: the attempt must not be
    cancelled then, or a link that is up would be reported as a failed connect."""
    from icafast.aio import client as client_mod

    fired: list[bool] = []
    orig_link_made = client_mod._ClientRunner.link_made

    def link_made(self: Any, link: Any) -> None:
        orig_link_made(self, link)
        attempt = self._attempt
        if attempt is not None and self.link is link:
            fired.append(attempt.handed)
            attempt.deadline.fire()  # the deadline passes now, the link already up

    monkeypatch.setattr(client_mod._ClientRunner, "link_made", link_made)
    kw, ctls = tls_for(tmp_path, tls_on)

    async def main() -> None:
        async with Setup(Backend("echo"), **kw) as s:
            cev: list[Any] = []
            r, w = await s.client(events=cev, tls=ctls)
            w.write(b"still up")
            assert await asyncio.wait_for(r.readexactly(8), 10) == b"still up"
            assert fired == [True]
            assert links_up(cev) == 1
            assert not any(isinstance(e, ev.ReconnectDue) for e in cev), cev
            w.close()
            await asyncio.sleep(0.1)

    run_async("uvloop", main(), timeout=30)


@pytest.mark.parametrize("loop", LOOPS)
def test_run_leaves_nothing_running_and_closes_its_loop(loop, monkeypatch):
    """``icafast.aio.run`` (what the CLI runs on) ends as ``asyncio.run`` does: a task still
    pending when ``main`` returns is cancelled (its cleanup runs), and the loop is closed."""
    from icafast.aio import loop_name, run

    monkeypatch.setenv("ICAFAST_LOOP", loop)
    seen: dict[str, Any] = {}

    async def left_behind() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            seen["cleaned up"] = True

    async def main() -> str:
        seen["loop"] = asyncio.get_running_loop()
        seen["task"] = asyncio.get_running_loop().create_task(left_behind())
        await asyncio.sleep(0)
        return loop_name()

    assert run(main()) == loop
    assert seen["task"].cancelled() and seen.get("cleaned up")
    assert seen["loop"].is_closed()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_transport_left_open_fails_the_test_and_does_not_hang_it(loop):
    """The tests' loop runner reports a connection a test left open when its loop closes, as
    a failure of that test. On uvloop it must not hang: close() warns of each open handle
    before closing it, and a warning raised as an error would skip that close, so close()
    would wait on the open connection for good."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)

    async def leave_one_open() -> None:
        await asyncio.get_running_loop().create_connection(asyncio.Protocol,
                                                           *ls.getsockname())

    try:
        with pytest.raises(AssertionError, match="left open when the test's loop closed"):
            run_async(loop, leave_one_open(), timeout=10)
    finally:
        with contextlib.suppress(BlockingIOError):
            ls.setblocking(False)
            ls.accept()[0].close()
        ls.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_the_session_limit_holds_under_a_burst_of_new_sessions(loop):
    """max_sessions: a burst of NEW, all in the handshake at once, gets exactly that many
    sessions, the rest REJECT 5 (sessions still connecting to their backend count, and a
    session counts once when it is made)."""
    limit = 40

    async def main() -> None:
        async with Setup(Backend("echo"), max_sessions=limit) as s:

            async def one() -> str:
                try:
                    await asyncio.wait_for(s.client(direct=True), 20)
                except ConnectionError as e:
                    return str(e)
                return "ok"

            got = await asyncio.gather(*(one() for _ in range(limit)))
            assert got == ["ok"] * limit  # exactly at the limit: all of them
            assert len(s.server.sessions_by_id) == limit and not s.server._creating
            for w in s.writers:
                w.close()
            s.writers.clear()
            assert await wait_for(lambda: not s.server.sessions_by_id, 10)
            got = await asyncio.gather(*(one() for _ in range(limit + 15)))
            assert got.count("ok") == limit, set(got)
            assert all("at its limit of 40 sessions" in g for g in got if g != "ok"), set(got)

    run_async(loop, main(), timeout=60)


def test_failed_resume_records_cost_little_and_expire():
    """The count of failed resumes per source address: a new source's failure cost a scan of
    the whole table once it held 100,000 sources that failed within the minute (3.6 ms each:
    a CPU's worth at under 300 failed resumes a second from many addresses, as IPv6 gives
    anyone). Now a few entries from the front of the table per failure; a source whose last
    failure is a minute old is forgotten, and the table holds MAX_FAILURE_SOURCES at most."""
    import time

    from icafast.aio.server import MAX_FAILURE_SOURCES

    srv = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", 9)])
    now = 1000.0
    for i in range(MAX_FAILURE_SOURCES):
        srv._record_failure(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", now + i * 1e-5)
    assert len(srv._failures) == MAX_FAILURE_SOURCES
    later = now + 2  # (all of them still within the minute)
    t0 = time.perf_counter()
    for i in range(2000):
        srv._record_failure(f"2001:db8::{i:x}", later + i * 1e-5)
    took = time.perf_counter() - t0
    assert took < 0.5, f"{took / 2000 * 1e3:.3f} ms per failed resume from a new source"
    assert len(srv._failures) == MAX_FAILURE_SOURCES  # the quietest went
    assert "10.0.0.0" not in srv._failures and "2001:db8::0" in srv._failures
    # a source keeps its count while it fails within the minute...
    assert srv._failed_recently("2001:db8::0", later + 30) == 1
    # ...and every count goes once its last failure is a minute old, at the next failure
    srv._record_failure("192.0.2.1", later + 61)
    assert list(srv._failures) == ["192.0.2.1"]


def _dual_stack_free_port() -> int:
    # (a dual-stack socket on port 0 gets a port free in both families)
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 on this platform")
@pytest.mark.parametrize("loop", LOOPS)
def test_a_listen_address_without_host_takes_both_families_and_brackets_one(loop):
    """README, "Running it for real": ``--listen :PORT`` (no host) takes clients of both
    families; ``[::]:PORT`` only IPv6 ones, and ``0.0.0.0:PORT`` only IPv4 ones."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")

    async def echoes(host: str, port: int) -> bool:
        try:
            r, w = await asyncio.wait_for(open_session(host, port, config=FAST), 3)
        except (OSError, ConnectionError, asyncio.TimeoutError):
            return False
        try:
            w.write(b"both")
            return await asyncio.wait_for(r.readexactly(4), 5) == b"both"
        finally:
            w.close()

    async def main() -> None:
        backend = await Backend("echo").start()
        try:
            for host, want in (("", {"127.0.0.1": True, "::1": True}),
                               ("::", {"127.0.0.1": False, "::1": True}),
                               ("0.0.0.0", {"127.0.0.1": True, "::1": False})):
                port = _dual_stack_free_port()
                srv = RelayServer([Mapping(host, port, "127.0.0.1", backend.port)], FAST)
                await srv.start()
                try:
                    got = {a: await echoes(a, port) for a in want}
                finally:
                    await srv.close()
                assert got == want, (host, got)
        finally:
            await backend.close()

    run_async(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_links_and_endpoints_writelines_pause_their_protocol(loop):
    """What a link or an endpoint writes with ``writelines`` past the transport's high water
    mark pauses its protocol, as ``write`` does. asyncio's own ``writelines`` (Python 3.12 on)
    did not, up to CPython 3.12.8 and 3.13.1 (gh-127655): a peer that read nothing then let
    the write buffer grow without bound, and a sink held for back-pressure never resumed."""
    from icafast.aio._relay import writelines_of

    class Proto(asyncio.Protocol):
        paused = 0

        def pause_writing(self) -> None:
            self.paused += 1

    async def main() -> None:
        lp = asyncio.get_running_loop()
        a, b = socket.socketpair()
        try:
            transport, proto = await lp.connect_accepted_socket(Proto, a)
            transport.set_write_buffer_limits(high=64 * 1024, low=16 * 1024)
            write = writelines_of(transport)
            for _ in range(64):  # (the peer reads nothing: 4 MiB, far past the socket buffers)
                write([b"x" * 32 * 1024, b"y" * 32 * 1024])
                if proto.paused:
                    break
            assert proto.paused == 1, transport.get_write_buffer_size()
            transport.abort()
        finally:
            b.close()

    run_async(loop, main())


@pytest.mark.parametrize("exc", [RuntimeError, asyncio.CancelledError])
@pytest.mark.parametrize("loop", LOOPS)
def test_a_status_callback_that_raises_leaves_the_session_as_it_was(loop, exc, caplog):
    """A status callback that raises is logged and the relay goes on. One that raised a
    ``CancelledError`` (or any other ``BaseException``) on LinkUp killed the link it was
    called for: the session reconnected, called back, lost that link too, and so on, some
    3,000 times a second on both ends. Now such an exception is taken as asyncio takes one
    from a callback: logged, except KeyboardInterrupt and SystemExit."""
    caplog.set_level(logging.ERROR, logger="icafast")

    def raising(sink: list[Any]) -> Any:
        def on_status(e: Any, _engine: Any) -> None:
            sink.append(e)
            if isinstance(e, ev.LinkUp):
                raise exc("from the status callback")
        return on_status

    async def main() -> None:
        cev: list[Any] = []
        s = Setup(Backend("echo"))
        async with s:
            s.server.on_status = raising(s.events)
            r, w = await open_session("127.0.0.1", s.proxy.port, config=s.config,
                                      on_status=raising(cev))
            s.writers.append(w)
            w.write(b"hello")
            assert await asyncio.wait_for(r.readexactly(5), 10) == b"hello"
            await asyncio.sleep(0.3)  # (a loop of reconnects would show by now)
            assert links_up(cev) == 1 and links_up(s.events) == 1, (cev, s.events)
            s.proxy.reset()  # (a break is still resumed, with the callback raising again)
            w.write(b"again")
            assert await asyncio.wait_for(r.readexactly(5), 10) == b"again"
            assert await wait_for(lambda: links_up(cev) == 2 and links_up(s.events) == 2)

    run_async(loop, main())
    failed = [r for r in caplog.records if r.getMessage() == "status callback failed"]
    assert len(failed) == 4 and all(r.exc_info and r.exc_info[0] is exc for r in failed)
