"""A server hands its sessions to the next (``RelayServer.hand_over`` / ``start(handover=)``):
an upgrade of ``icafast serve`` that ends no session. Real sockets on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator

import pytest
from engine_harness import Harness, Schedule
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from relay_helpers import (
    FAST,
    Backend,
    Setup,
    Stats,
    free_port,
    needs_tls_pipe,
    recv_stream,
    run_async,
    send_stream,
    tls_for,
    wait_for,
)

from icafast import events as ev
from icafast import handover as ho
from icafast.aio import Mapping, RelayClient, RelayServer
from icafast.protocol import ClientSession, Config, ServerSession, State
from icafast.tlspipe import uses_pipe

LOOPS = ["uvloop", "asyncio"]


def _successor(s: Setup, **kw) -> RelayServer:
    return RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", s.backend.port)], s.config,
                       **{**s.server_kw, **kw})


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _tls_io(tls_io: str | None, tmp_path, monkeypatch) -> tuple[dict, object]:
    """TLS for a test's server and client, run as ``tls_io`` says (``ICAFAST_TLS_IO``), or
    none (None): see ``tls_for``."""
    if tls_io is not None:
        monkeypatch.setenv("ICAFAST_TLS_IO", tls_io)
    return tls_for(tmp_path, tls_io is not None)


async def _echo_under_way(r: asyncio.StreamReader, w: asyncio.StreamWriter, size: int,
                          seed: int) -> tuple[Stats, Stats, asyncio.Event, list]:
    """A stream of ``size`` bytes to an echo and back, a quarter of it through: what was sent
    and received, the gate its second half waits at (for the hand-over: on loopback the whole
    stream could cross before a test looks), and the two tasks."""
    sent, got = Stats(), Stats()
    gate = asyncio.Event()
    tasks = [asyncio.ensure_future(send_stream(w, size, seed, sent, chunk=64 * 1024,
                                               gate=(size // 2, gate))),
             asyncio.ensure_future(recv_stream(r, got))]
    assert await wait_for(lambda: got.received > size // 4, 30)
    return sent, got, gate, tasks


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("tls_io", [None, "auto", "loop"], ids=["plain", "tls", "tls-loop"])
def test_sessions_go_on_at_the_server_they_are_handed_to(loop, tls_io, tmp_path, monkeypatch):
    """Streams in both directions go on through a hand-over in their middle, byte for byte:
    the same session (its id, one backend connection) at the next server, on the same port,
    its client resumed; the first server holds nothing afterwards. With TLS, on both ways of
    running it (the next server's listener takes the socket with its own context, loaded
    from the same files as in a new process: it takes the first one's ticket keys, and the
    client's new link resumes its TLS session where the client offers it, on the pipe)."""
    size = 6 * 1024 * 1024
    server_kw, client_tls = _tls_io(tls_io, tmp_path, monkeypatch)
    fresh = {}
    if tls_io is not None:
        from icafast import tls

        cert, key, _ = tls.ensure_self_signed(str(tmp_path))
        fresh = {"ssl": tls.server_context(cert, key)}

    async def main() -> None:
        async with Setup(Backend("echo"), **server_kw) as s:
            cev: list = []
            r, w = await s.client(events=cev, tls=client_tls)
            sent, got, gate, tasks = await _echo_under_way(r, w, size, 7)
            (sid,) = s.server.sessions_by_id
            port = s.server_port
            data, fds = await s.server.hand_over()
            assert not s.server.sessions_by_id
            nxt = _successor(s, **fresh)
            await nxt.start(handover=(data, fds))
            try:
                assert nxt.addresses[0][1] == port
                assert list(nxt.sessions_by_id) == [sid]
                runner = nxt.sessions_by_id[sid]
                assert await wait_for(lambda: runner.link is not None, 10)
                if tls_io is not None:  # (the loop's TLS transport offers no session)
                    assert runner.link.ssl_object.session_reused is (tls_io == "auto"
                                                                     and uses_pipe())
                gate.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 60)
                assert got.received == size and got.eof
                assert got.recv_hash.digest() == sent.sent_hash.digest()
                assert len(s.backend.conns) == 1  # the one backend connection, to the end
                resumed = [e for e in cev if isinstance(e, ev.LinkUp) and e.resumed]
                assert len(resumed) >= 1
                assert await wait_for(lambda: not nxt.sessions_by_id, 10)  # ended, at nxt
                assert nxt.counters["sessions_opened"] == 1  # (carried over)
                assert nxt.counters["handovers_taken"] == 1
                assert nxt.counters["ended_done"] == 1
                # (the listener listens on the descriptor handed over)
                assert nxt._servers[0].sockets[0].fileno() in fds
            finally:
                await nxt.close()

    run_async(loop, main())


@pytest.mark.parametrize("due", [False, True], ids=["young", "due"])
def test_ticket_keys_go_on_with_their_age(due, tmp_path, monkeypatch, caplog):
    """The server before hands on its TLS ticket keys with how long they have sealed tickets,
    and the next one counts their lifetime on from there: keys younger than its
    ``ticket_key_lifetime`` are taken (the client's new link resumes its TLS session) and
    renewed when that lifetime is up, counted from when the first server made them; keys
    that have lived it already are not taken, and the client makes a full handshake."""
    server_kw, client_tls = _tls_io("auto", tmp_path, monkeypatch)
    needs_tls_pipe("the ticket keys cannot be reached without the compiled pipe")
    from icafast import tls

    cert, key, _ = tls.ensure_self_signed(str(tmp_path))
    caplog.set_level("INFO", logger="icafast")

    async def main() -> None:
        async with Setup(Backend("echo"), **server_kw) as s:
            r, w = await s.client(tls=client_tls)
            w.write(b"ping")
            assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
            s.server._tickets_born -= 3600  # (as if made an hour ago)
            loop = asyncio.get_running_loop()
            data, fds = await s.server.hand_over()
            handed = loop.time()
            age = ho.unpack(data)[0]["tls_tickets"]["age"]
            assert 3600 <= age < 3630
            lifetime = age / 2 if due else age + 60
            nxt = _successor(s, ssl=tls.server_context(cert, key), ticket_key_lifetime=lifetime)
            await nxt.start(handover=(data, fds))
            try:
                (runner,) = nxt.sessions_by_id.values()
                assert await wait_for(lambda: runner.link is not None, 10)
                assert runner.link.ssl_object.session_reused is not due
                w.write(b"pong")
                assert await asyncio.wait_for(r.readexactly(4), 10) == b"pong"
                said = [m for m in caplog.messages if "TLS sessions of the server before" in m]
                assert len(said) == 1 and ("due for renewal" in said[0]) is due, said
                # renewed when the keys have lived the lifetime: its own from its start, the
                # first server's from when that one made them
                timer = nxt._ticket_timer
                assert timer is not None and nxt.counters["tls_ticket_key_renewals"] == 0
                born = handed if due else handed - age
                assert abs(timer.when() - (born + lifetime)) < 5
            finally:
                await nxt.close()
            assert nxt._ticket_timer is None  # (closed: nothing left to run)

    run_async("uvloop", main())


@pytest.mark.parametrize("loop", LOOPS)
def test_what_the_backend_has_not_taken_is_sent_again_by_the_client(loop):
    """A backend that reads nothing: what waits in the server for it is not handed over
    (it was not acknowledged), and the client sends it again to the next server. The backend
    then gets the client's stream exactly once, in order."""
    size = 24 * 1024 * 1024
    cfg = dataclasses.replace(FAST, replay_limit=32 * 1024 * 1024)

    async def main() -> None:
        async with Setup(Backend("stall"), cfg) as s:
            r, w = await s.client()
            sent = Stats()
            sender = asyncio.ensure_future(send_stream(w, size, 3, sent, eof=False))
            (runner,) = s.server.sessions_by_id.values()
            # (the backend's socket buffers are full and the transport holds the rest)
            assert await wait_for(lambda: runner.endpoint is not None and
                                  runner.endpoint.transport.get_write_buffer_size() > 0, 30)
            data, fds = await s.server.hand_over(drain=0.05)
            doc, _ = ho.unpack(data)
            (entry,) = doc["sessions"]
            assert entry["state"]["rx"] < runner.engine._rx  # the unsent part: left out
            nxt = _successor(s)
            await nxt.start(handover=(data, fds))
            try:
                s.backend.release.set()
                await asyncio.wait_for(sender, 60)
                (st,) = s.backend.conns
                assert await wait_for(lambda: st.received >= size, 60)
                assert st.received == size
                assert st.recv_hash.digest() == sent.sent_hash.digest()
            finally:
                w.close()
                await nxt.close()

    run_async(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_disconnected_session_and_a_finished_stream_are_handed_over(loop):
    """A session whose client is away is handed over DISCONNECTED, its reliability timeout
    going on from where it was; a backend's stream that ended before the hand-over (its EOF
    read) still reaches the client whole, with its end."""
    size = 3 * 1024 * 1024

    async def main() -> None:
        async with Setup(Backend("stream", size=size, seed=5)) as s:
            r, w = await s.client()
            got = Stats()
            (runner,) = s.server.sessions_by_id.values()
            assert await wait_for(lambda: runner.endpoint.eof, 30)  # the backend's EOF read
            s.proxy.refuse_new = True  # (the client cannot come back until the end)
            s.proxy.blackhole()  # the client's link goes silent: DISCONNECTED
            assert await wait_for(lambda: runner.engine.state is State.DISCONNECTED, 10)
            expiry = runner.engine._expiry
            data, fds = await s.server.hand_over()
            nxt = _successor(s)
            await nxt.start(handover=(data, fds))
            try:
                (taken,) = nxt.sessions_by_id.values()
                assert taken.engine.state is State.DISCONNECTED
                assert taken.engine._expiry == expiry
                s.proxy.refuse_new = False
                await asyncio.wait_for(recv_stream(r, got), 60)
                assert got.received == size and got.eof
                rng_hash = hashlib.sha256(__import__("random").Random(5).randbytes(size))
                assert got.recv_hash.digest() == rng_hash.digest()
                # (the session ends gracefully before the teardown: a client still
                # reconnecting then would race the proxy's close)
                w.write_eof()
                assert await wait_for(lambda: not nxt.sessions_by_id, 10)
            finally:
                w.close()
                await nxt.close()

    run_async(loop, main())


def test_a_session_state_round_trip_keeps_offsets_secrets_and_the_replay_bytes():
    """``ServerSession.from_state`` is ``export_state``'s inverse for what a resume needs."""
    cfg = Config()
    s = ServerSession(cfg, 5.0)
    s.tx.append(b"x" * 1000)
    s._tx_sent = 1000
    s._apply_ack(400)
    s._rx = s._rx_acked = 77
    s.attached_links = 1
    state = s._state()
    t = ServerSession.from_state(cfg, state, b"".join(bytes(v) for v in s.tx.views()), 9.0)
    assert t.session_id == s.session_id and t._secret == s._secret
    assert (t.tx.start, t.tx.end, t._tx_high, t._tx_sent) == (400, 1000, 1000, 1000)
    assert t._rx == 77 and t.state is State.DISCONNECTED
    assert t._expiry == 9.0 + cfg.reliability_timeout
    assert t.export_state()["tx_unacked"] == s.export_state()["tx_unacked"]


@pytest.mark.parametrize("data, message", [
    (b"not it", "not an icafast hand-over"),
    (ho.MAGIC + (10**6).to_bytes(8, "big") + b"{}", "cut short"),
    (ho.MAGIC + (2).to_bytes(8, "big") + b"{}", "another version"),
])
def test_a_handover_that_is_not_one_is_refused_and_its_descriptors_closed(data, message):
    async def main() -> None:
        fd = os.open(os.devnull, os.O_RDONLY)
        server = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", 9)], FAST)
        with pytest.raises(ho.HandoverError, match=message):
            await server.start(handover=(data, [fd]))
        assert not _fd_open(fd)

    run_async("asyncio", main())


def test_a_listener_whose_address_changed_is_closed_and_the_new_one_listens():
    """The next server listens where its own mappings say: a listener handed over for an
    address it no longer has is closed (its descriptor too), a new one is opened, and the
    sessions go on to the backends they have."""
    async def main() -> None:
        async with Setup(Backend("echo")) as s:
            r, w = await s.client(direct=True)
            w.write(b"x")
            assert await r.readexactly(1) == b"x"
            old_port = s.server_port
            data, fds = await s.server.hand_over()
            new_port = free_port()
            nxt = RelayServer([Mapping("127.0.0.1", new_port, "127.0.0.1", 9)], FAST)
            await nxt.start(handover=(data, fds))
            try:
                assert [a[1] for a in nxt.addresses] == [new_port]
                (listener,) = ho.unpack(data)[0]["listeners"]
                fd = fds[listener["fd"]]  # closed (or its number taken by the new listener)
                assert not _fd_open(fd) or fd == nxt._servers[0].sockets[0].fileno()
                with pytest.raises(ConnectionRefusedError):
                    await asyncio.open_connection("127.0.0.1", old_port)
                (taken,) = nxt.sessions_by_id.values()
                assert taken.mapping.backend_port == s.backend.port  # (its own backend)
            finally:
                w.close()
                await nxt.close()

    run_async("asyncio", main())


# -- the client side: RelayClient.hand_over / start(handover=) ----------------------------------

@contextlib.asynccontextmanager
async def _clients(server: tuple[str, int], config: Config, first_kw: dict | None = None,
                   next_kw: dict | None = None) -> AsyncIterator[tuple[RelayClient,
                                                                       RelayClient]]:
    """A client listening on a free port (started), and the next one that a hand-over from
    it will start; both closed on the way out."""
    first = RelayClient(("127.0.0.1", 0), server, config, **(first_kw or {}))
    await first.start()
    nxt = RelayClient(("127.0.0.1", 0), server, config, **(next_kw or {}))
    try:
        yield first, nxt
    finally:
        await first.close()
        await nxt.close()


async def _app(client: RelayClient) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An application connection to ``client``'s listener."""
    return await asyncio.open_connection("127.0.0.1", client.addresses[0][1])


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("tls_io", [None, "auto"], ids=["plain", "tls"])
def test_client_sessions_go_on_at_the_client_they_are_handed_to(loop, tls_io, tmp_path,
                                                                monkeypatch):
    """A client hands its sessions over while streams flow both ways: the application's
    connection goes on, unaware, byte for byte; the next client listens on the same socket
    and resumes the same session (one backend connection at the server, to the end); a new
    application connection there gets a session of its own."""
    size = 6 * 1024 * 1024
    server_kw, client_tls = _tls_io(tls_io, tmp_path, monkeypatch)

    async def main() -> None:
        async with Setup(Backend("echo"), **server_kw) as s:
            reused: list[bool] = []  # (each resumed link of the next client: TLS resumed?)

            def on_status(e: ev.Event, _engine) -> None:
                if isinstance(e, ev.LinkUp) and client_tls is not None:
                    reused.extend(r.link.ssl_object.session_reused for r in nxt.runners)

            # (the next client's own TLS settings, as in a new process: no session kept)
            async with _clients(("127.0.0.1", s.server_port), s.config, {"tls": client_tls},
                                {"tls": dataclasses.replace(client_tls) if client_tls else None,
                                 "on_status": on_status}) as (first, nxt):
                r, w = await _app(first)
                sent, got, gate, tasks = await _echo_under_way(r, w, size, 11)
                (sid,) = s.server.sessions_by_id
                port = first.addresses[0][1]
                data, fds = await first.hand_over()
                assert not first.runners
                await nxt.start(handover=(data, fds))
                assert nxt.addresses[0][1] == port
                (runner,) = nxt.runners
                assert runner.engine.session_id == sid
                gate.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 60)
                # the TLS session came along: an abbreviated handshake, not a full one
                if client_tls is None:
                    assert reused == []
                elif uses_pipe():
                    assert reused == [True], reused
                else:  # (a session cannot be written out: full handshakes. The pure-Python
                    # core can hold the loop past the test's 0.4 s dead timeout, and a second
                    # link follows)
                    assert reused and not any(reused), reused
                assert got.received == size and got.eof
                assert got.recv_hash.digest() == sent.sent_hash.digest()
                assert list(s.server.sessions_by_id) in ([sid], [])
                assert len(s.backend.conns) == 1
                assert s.server.counters["sessions_opened"] == 1
                assert s.server.counters["resumes"] >= 1
                r2, w2 = await _app(nxt)  # (the listener handed over accepts)
                w2.write(b"again")
                assert await asyncio.wait_for(r2.readexactly(5), 10) == b"again"
                assert len(s.backend.conns) == 2
                w2.close()
                w.close()

    run_async(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_what_the_application_has_not_taken_is_sent_again_by_the_server(loop):
    """An application that reads nothing for a while: what waits in the client for it is not
    handed over (the server has not had it acknowledged) and comes again from the server.
    The application then reads the backend's stream exactly once, in order, with its end."""
    size = 24 * 1024 * 1024
    cfg = dataclasses.replace(FAST, replay_limit=32 * 1024 * 1024)

    async def main() -> None:
        async with Setup(Backend("stream", size=size, seed=9), cfg) as s:
            async with _clients(("127.0.0.1", s.server_port), cfg) as (first, nxt):
                r, w = await _app(first)
                (runner,) = first.runners
                # (the application's socket buffers are full and the transport holds more)
                assert await wait_for(lambda: runner.endpoint is not None and
                                      runner.endpoint.transport.get_write_buffer_size() > 0, 30)
                data, fds = await first.hand_over(drain=0.05)
                doc, _ = ho.unpack(data)
                (entry,) = doc["sessions"]
                assert entry["state"]["rx"] < runner.engine._rx  # the unsent part: left out
                await nxt.start(handover=(data, fds))
                got = Stats()
                w.write_eof()
                await asyncio.wait_for(recv_stream(r, got), 60)
                assert got.received == size and got.eof
                rng_hash = hashlib.sha256(__import__("random").Random(9).randbytes(size))
                assert got.recv_hash.digest() == rng_hash.digest()
                assert len(s.backend.conns) == 1
                w.close()

    run_async(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_disconnected_client_session_is_handed_over_and_resumes_when_it_can(loop):
    """A client session whose server cannot be reached is handed over DISCONNECTED, its
    reliability timeout going on from when its link broke (not from the hand-over); once the
    server can be reached again, the next client resumes it and the backend's stream, which
    went on meanwhile, reaches the application whole."""
    size = 3 * 1024 * 1024

    async def main() -> None:
        async with Setup(Backend("stream", size=size, seed=6)) as s:
            async with _clients(("127.0.0.1", s.proxy.port), s.config) as (first, nxt):
                r, w = await _app(first)
                got = Stats()
                start = await r.readexactly(1024)  # (the session is up)
                got.received = len(start)
                got.recv_hash.update(start)
                (runner,) = first.runners
                s.proxy.refuse_new = True  # (the client cannot come back for now)
                s.proxy.blackhole()  # its link goes silent: DISCONNECTED
                assert await wait_for(lambda: runner.engine.state is State.DISCONNECTED, 10)
                lost_at = runner.engine._disconnected_at
                await asyncio.sleep(0.2)  # (a reconnect attempt or two are refused)
                data, fds = await first.hand_over()
                await nxt.start(handover=(data, fds))
                (taken,) = nxt.runners
                assert taken.engine.state is State.DISCONNECTED
                assert taken.engine._disconnected_at == lost_at
                s.proxy.refuse_new = False
                w.write_eof()
                await asyncio.wait_for(recv_stream(r, got), 60)
                assert got.received == size and got.eof
                rng_hash = hashlib.sha256(__import__("random").Random(6).randbytes(size))
                assert got.recv_hash.digest() == rng_hash.digest()
                assert len(s.backend.conns) == 1 and s.server.counters["sessions_opened"] == 1
                w.close()

    run_async(loop, main())


def test_a_session_still_connecting_is_handed_over_and_opens_at_the_next_client():
    """A session whose first connect has not succeeded yet (the server is not up) is handed
    over with what the application sent: the next client opens it once the server is there,
    and the application's bytes arrive whole."""
    cfg = dataclasses.replace(FAST, connect_retry=30.0)

    async def main() -> None:
        backend = await Backend("echo").start()
        port = free_port()
        first = RelayClient(("127.0.0.1", 0), ("127.0.0.1", port), cfg)
        await first.start()
        nxt = RelayClient(("127.0.0.1", 0), ("127.0.0.1", port), cfg)
        server = RelayServer([Mapping("127.0.0.1", port, "127.0.0.1", backend.port)], cfg)
        try:
            r, w = await _app(first)
            w.write(b"hello before any server")
            (runner,) = first.runners
            assert await wait_for(lambda: runner.engine.unacked == 23, 10)
            assert runner.engine.state is State.CONNECTING
            data, fds = await first.hand_over()
            await nxt.start(handover=(data, fds))
            (taken,) = nxt.runners
            assert taken.engine.state is State.CONNECTING
            assert taken.engine._new_token == runner.engine._new_token
            await server.start()
            assert await asyncio.wait_for(r.readexactly(23), 30) == b"hello before any server"
            assert len(server.sessions_by_id) == 1 and len(backend.conns) == 1
            w.close()
        finally:
            await first.close()
            await nxt.close()
            await server.close()
            await backend.close()

    run_async("uvloop", main())


def test_a_connecting_session_handed_to_a_client_with_a_fallback_falls_back_at_once():
    """With ``fallback``, a new session falls back after its first failed connect instead of
    retrying for ``connect_retry``: a session still connecting when it is handed over keeps
    that (the next client's settings), and falls back when its attempt there fails."""
    from relay_helpers import unanswering_backend

    async def main() -> None:
        backend = await Backend("echo").start()
        with unanswering_backend() as server:
            async with _clients(server, FAST, {"fallback": ("127.0.0.1", backend.port)},
                                {"fallback": ("127.0.0.1", backend.port)}) as (first, nxt):
                r, w = await _app(first)
                w.write(b"to the fallback")
                (runner,) = first.runners
                assert await wait_for(lambda: runner.engine.unacked == 15, 10)
                data, fds = await first.hand_over()
                await nxt.start(handover=(data, fds))
                (taken,) = nxt.runners
                assert taken.engine.state is State.CONNECTING
                assert taken.engine.config.connect_retry == 0.0
                # (its attempt at the server that never answers times out; then the
                # fallback relays the application's bytes, which the engine had kept)
                echoed = await asyncio.wait_for(r.readexactly(15), 30)
                assert echoed == b"to the fallback" and taken.fell_back
                w.close()
        await backend.close()

    run_async("uvloop", main())


def test_writelines_on_a_lost_connection_leaves_no_registration_behind():
    """What a relay writes to a connection already lost is dropped, as asyncio's ``write``
    drops it: CPython 3.12.1's ``writelines`` registered the socket for writing anyway, and
    the registration outlived the socket (the next connection given its descriptor number then
    failed in the selector: a hand-over's resets made it happen)."""
    from icafast.aio._relay import writelines_of

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def drop(_r: asyncio.StreamReader, peer: asyncio.StreamWriter) -> None:
            peer.close()

        server = await asyncio.start_server(drop, "127.0.0.1", 0)
        r, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        t = w.transport
        fd = t.get_extra_info("socket").fileno()
        t.abort()
        writelines_of(t)([b"after the end"] * 3)
        assert fd not in loop._selector.get_map()  # (no writer left for the closed socket)
        w.close()
        await asyncio.sleep(0.05)
        server.close()
        await server.wait_closed()

    run_async("asyncio", main())


def test_a_client_session_state_round_trip_keeps_offsets_secrets_and_the_server_policy():
    """``ClientSession.from_state`` is ``export_state``'s inverse for what a resume needs."""
    h = Harness(SMALL)
    h.open_link()
    h.pump()
    h.client_send(b"y" * 500)
    h.server_send(b"z" * 300)
    h.pump()
    c = h.client
    state = c._state()
    t = ClientSession.from_state(SMALL, state, b"".join(bytes(v) for v in c.tx.views()), h.now)
    assert (t.session_id, t._secret, t._new_token) == (c.session_id, c._secret, c._new_token)
    assert (t.tx.start, t.tx.end, t._tx_high, t._rx) == (c.tx.start, c.tx.end, 500, 300)
    assert t.server_policy == c.server_policy and t.policy == c.policy
    assert t.state is State.DISCONNECTED and t._disconnected_at == h.now
    assert t.export_state()["tx_unacked"] == c.export_state()["tx_unacked"]


def test_tls_sessions_go_to_the_next_client_only_under_the_same_settings(tmp_path):
    """A client's TLS sessions are taken by the next one only if it checks the server the
    same way (pins, name, files): otherwise its links make full handshakes. Bytes that are
    not a session are dropped."""
    _, client_tls = tls_for(tmp_path, True)
    doc = client_tls.export_sessions()
    assert doc["sessions"] == []
    doc["sessions"] = [["127.0.0.1", 1, "127.0.0.1", "3000"]]
    assert dataclasses.replace(client_tls, server_hostname="other").import_sessions(doc) == 0
    assert dataclasses.replace(client_tls, fingerprints=("AB",)).import_sessions(doc) == 0
    same = dataclasses.replace(client_tls)
    assert same.import_sessions(doc) == 0 and same.session_for("127.0.0.1", 1) is None
    assert same.import_sessions(None) == 0


def test_a_servers_hand_over_is_not_a_clients():
    async def main() -> None:
        fd = os.open(os.devnull, os.O_RDONLY)
        client = RelayClient(("127.0.0.1", 0), ("127.0.0.1", 9), FAST)
        data = ho.Packer().pack({"listeners": [], "sessions": []})
        with pytest.raises(ho.HandoverError, match="a server's hand-over"):
            await client.start(handover=(data, [fd]))
        assert not _fd_open(fd)
        await client.close()

    run_async("asyncio", main())


# -- the engine alone: hand-overs at any point of random schedules ----------------------------

SMALL = Config(frame_size=100, replay_limit=4096, keepalive_interval=1.0, dead_timeout=3.0,
               reliability_timeout=30.0)


def _handed_state(old, unsent: int, received: bytearray) -> tuple[dict, bool]:
    """The state a hand-over gives the next engine, of which the last ``unsent`` bytes given
    to the endpoint (at most what was not acknowledged) had not reached it: they waited in the
    old process's transport, the endpoint never sees them (taken off ``received``). Also
    whether the end of stream is to come again."""
    state = old._state()
    fin = 1 if old._rx_fin else 0
    unsent = max(0, min(unsent, old._rx - fin - old._rx_acked, len(received)))
    if unsent:
        state["rx"] = old._rx - fin - unsent
        state["rx_fin"] = False
        del received[len(received) - unsent:]
    return state, bool(unsent)


def _reset_all(h: Harness, side: str) -> None:
    """The link is reset (the peer sees it), and whatever the old process had goes with it."""
    h.reset()
    for w in h.wires:
        setattr(w, f"{side}_alive", False)
        w.c2s.clear()
        w.s2c.clear()


def _hand_over(h: Harness, unsent: int) -> None:
    """What ``RelayServer.hand_over`` does to the session, in the harness: its state goes to a
    new engine (less ``unsent`` bytes the backend had not taken); every connection the old
    process had is reset."""
    old = h.server
    if old.state is State.CLOSED:
        return
    state, again = _handed_state(old, unsent, h.s_recv)
    h.s_eof = h.s_eof and not again
    new = ServerSession.from_state(h.server_config, state,
                                   b"".join(bytes(v) for v in old.tx.views()), h.now)
    _reset_all(h, "server")
    h.sessions[new.session_id] = new


def _hand_over_client(h: Harness, unsent: int) -> None:
    """What ``RelayClient.hand_over`` does to the session, in the harness: its state goes to
    a new client engine (less ``unsent`` bytes the application had not taken); the link is
    reset, and the new engine connects at once."""
    old = h.client
    if old.state is State.CLOSED or not old.session_id:
        return  # (a NEW again: the harness's server has no table of NEW tokens)
    state, again = _handed_state(old, unsent, h.c_recv)
    h.c_eof = h.c_eof and not again
    new = ClientSession.from_state(h.config, state,
                                   b"".join(bytes(v) for v in old.tx.views()), h.now)
    _reset_all(h, "client")
    h.client = new
    h.open_link()


def _either_hand_over(h: Harness, op: str, arg: int) -> None:
    if op == "handover" and h.sessions:
        _hand_over(h, arg)
    elif op == "chandover":
        _hand_over_client(h, arg)


_SIZES = st.one_of(st.integers(1, 700), st.sampled_from([100, 300, 700]))
_CUTS = st.one_of(st.integers(0, 900), st.sampled_from([1000, 5000]))
OPS = st.one_of(
    st.tuples(st.just("csend"), _SIZES),
    st.tuples(st.just("ssend"), _SIZES),
    st.tuples(st.just("c2s"), _CUTS),
    st.tuples(st.just("s2c"), _CUTS),
    st.tuples(st.just("reset"), st.just(0)),
    st.tuples(st.just("blackhole"), st.just(0)),
    st.tuples(st.just("tick"), st.integers(0, 1500)),
    st.tuples(st.just("cfin"), st.just(0)),
    st.tuples(st.just("sfin"), st.just(0)),
    st.tuples(st.just("handover"), st.integers(0, 5000)),
    st.tuples(st.just("chandover"), st.integers(0, 5000)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=10, max_size=60), seed=st.integers(0, 2**16))
def test_hand_overs_at_any_point_keep_both_streams_exactly_once_in_order(ops, seed):
    """Random schedules of sends, partial deliveries, link faults, time, ends of stream and
    hand-overs by the server or the client (each leaving out what the backend, or the
    application, had not taken yet): both streams still arrive whole, exactly once, in order,
    with their ends, and the session goes on."""
    h = Harness(SMALL, seed=seed)
    h.open_link()
    h.pump()
    run = Schedule(h, lambda op, arg: _either_hand_over(h, op, arg))
    run.run(ops)
    assert h.client.state is not State.CLOSED or (run.cfin and run.sfin)
    run.heal()
    assert len(h.sessions) == 1


def test_the_ack_of_a_fin_waits_for_what_precedes_it_to_reach_the_sink():
    """A FIN received after bytes that still wait for the backend: the ack covers what the
    backend took, not one more (the FIN's count once stood in for a byte not delivered, which
    a hand-over that leaves the waiting bytes out would then have lost)."""
    h = Harness(SMALL)
    h.open_link()
    h.pump()
    s = h.server
    s.sink_backlog = 4  # (as the adapter sets it: four bytes still wait for the backend)
    h.client_send(b"0123456789")
    h.client.send_eof()
    h.pump()
    h.advance(1.0)  # (past the ack delay: the ack has gone)
    h.pump()
    assert s._rx == 11 and s._rx_fin  # ten bytes and the FIN
    assert s._rx_acked == s._ack_value() == 6
    assert h.client.tx.start == 6  # (the client keeps the four for a resume)
    s.sink_backlog = 0
    assert s._ack_value() == 11


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_a_hand_over_without_descriptors_to_spare_changes_nothing():
    """No descriptor left for the duplicates (EMFILE): ``hand_over`` raises before it has
    changed anything, and the server serves on: its sessions, and new ones."""
    import resource

    async def main() -> None:
        async with Setup(Backend("echo")) as s:
            streams = [await s.client(direct=True) for _ in range(3)]
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            # (room for the listener's duplicate, not for the sessions' backends)
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 1,
                                                        hard))
            try:
                with pytest.raises(OSError, match="nothing was handed over"):
                    await s.server.hand_over()
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert len(s.server.sessions_by_id) == 3 and s.server._servers
            for r, w in [*streams, await s.client(direct=True)]:
                w.write(b"on")
                assert await r.readexactly(2) == b"on"
                w.close()

    run_async("uvloop", main())
