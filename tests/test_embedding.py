"""The library API as a program that embeds icafast uses it: a ``RelayServer`` hosted in the
program's own event loop, started and closed by it, the loop ended right after."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import warnings
from collections.abc import Coroutine
from typing import Any

import pytest
from relay_helpers import FAST, free_port

from icafast import events as ev
from icafast.aio import Mapping, RelayClient, RelayServer, open_session
from icafast.aio._relay import RUNNERS
from icafast.faults import FaultProxy
from icafast.protocol import Config

LOOPS = ["uvloop", "asyncio"]


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class _RemoteClient:
    """A session's client and a fault proxy in front of it, on an event loop of their own in a
    thread: a peer in another process, as far as the server's loop can tell (its sockets are not
    the server loop's to close)."""

    def __init__(self, server_port: int) -> None:
        self.server_port = server_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy: FaultProxy | None = None
        self.writer: asyncio.StreamWriter | None = None

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    async def open(self, echo: bool = True) -> None:
        self.proxy = await FaultProxy("127.0.0.1", self.server_port).start()
        # (a link that goes silent is not declared dead while the test runs)
        r, self.writer = await open_session("127.0.0.1", self.proxy.port,
                                            config=Config(dead_timeout=60.0))
        if echo:
            self.writer.write(b"ping")
            assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"

    async def blackhole(self, stop_reading: bool = False) -> None:
        """The link goes silent; with ``stop_reading`` the server's bytes are not even read
        any more: what the server writes to it piles up in its send buffers."""
        assert self.proxy is not None
        self.proxy.blackhole()
        if stop_reading:
            for pair in self.proxy.pairs:
                if pair.server is not None and pair.server.transport is not None:
                    pair.server.transport.pause_reading()

    async def _close(self) -> None:
        for r in list(RUNNERS):
            if r.loop is self.loop:
                r.abort("test finished")
        if self.writer is not None:
            self.writer.close()
        if self.proxy is not None:
            await self.proxy.close()
        await asyncio.sleep(0.1)

    def stop(self) -> None:
        try:
            self.call(self._close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


def _left_open(loop: asyncio.AbstractEventLoop) -> list[str]:
    """Close ``loop``: what it still had open, as the ResourceWarnings that says so."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        loop.close()
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


@pytest.mark.parametrize("kind", LOOPS)
def test_server_close_leaves_no_link_open_when_the_loop_ends(kind):
    """A program that ends its loop right after ``await server.close()`` has nothing left
    open: close() used to return while the links of the sessions it closed lingered for the
    peers to read the CLOSE (up to 2 s, or until each peer closes): a peer that had gone
    silent left its link open when the loop closed (ResourceWarning, and uvloop's close()
    failing with EBUSY where warnings are errors)."""
    loop = _new_loop(kind)
    peer: _RemoteClient | None = None

    async def main() -> float:
        nonlocal peer
        backend = await asyncio.start_server(_echo, "127.0.0.1", 0)
        server = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1",
                                      backend.sockets[0].getsockname()[1])], FAST)
        await server.start()
        peer = _RemoteClient(server.addresses[0][1])
        await loop.run_in_executor(None, peer.call, peer.open())
        await loop.run_in_executor(None, peer.call, peer.blackhole())
        t0 = loop.time()
        await server.close()
        took = loop.time() - t0
        backend.close()
        await backend.wait_closed()
        await asyncio.sleep(0.05)  # (the backend's reset connection ends)
        return took

    try:
        took = loop.run_until_complete(main())
    finally:
        if peer is not None:  # (first: warnings are process-wide, and its loop runs)
            peer.stop()
        leaks = _left_open(loop)
    assert not leaks, leaks
    assert took < 1.8  # (bounded: a silent peer does not hold the close for the whole LINGER)


async def _flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while True:
            writer.write(bytes(65536))
            await writer.drain()
    writer.close()


@pytest.mark.parametrize("kind", LOOPS)
def test_server_close_is_bounded_when_a_peer_stopped_reading(kind):
    """A client that stopped reading while its backend sent: the server's link has bytes
    it cannot send, before the CLOSE. close() returns within its timeout, that link reset:
    it was left open, waiting to flush, when close() returned (and from Python 3.12 on, whose
    listeners' wait_closed() waits for every connection they accepted, close() never
    returned)."""
    loop = _new_loop(kind)
    peer: _RemoteClient | None = None

    async def main() -> float:
        nonlocal peer
        backend = await asyncio.start_server(_flood, "127.0.0.1", 0)
        # (the silent link is not declared dead either: it is the session's at close())
        server = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1",
                                      backend.sockets[0].getsockname()[1])], Config())
        await server.start()
        peer = _RemoteClient(server.addresses[0][1])
        await loop.run_in_executor(None, peer.call, peer.open(echo=False))
        await loop.run_in_executor(None, peer.call, peer.blackhole(True))
        await asyncio.sleep(1.0)  # (the link's buffers fill)
        t0 = loop.time()
        await asyncio.wait_for(server.close(timeout=0.5), 10)
        took = loop.time() - t0
        backend.close()
        await backend.wait_closed()
        await asyncio.sleep(0.05)
        return took

    try:
        took = loop.run_until_complete(main())
    finally:
        if peer is not None:
            peer.stop()
        leaks = _left_open(loop)
    assert not leaks, leaks
    assert took < 1.5


@pytest.mark.parametrize("kind", LOOPS)
def test_server_close_waits_for_a_live_peer_to_take_the_close(kind):
    """A peer that is there gets the CLOSE before close() returns: its session ends with the
    server's reason, not as a link lost."""
    loop = _new_loop(kind)
    peer: _RemoteClient | None = None
    events: list[Any] = []

    async def main() -> None:
        nonlocal peer
        backend = await asyncio.start_server(_echo, "127.0.0.1", 0)
        server = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1",
                                      backend.sockets[0].getsockname()[1])], FAST)
        await server.start()
        peer = _RemoteClient(server.addresses[0][1])
        await loop.run_in_executor(None, peer.call, peer.open())
        (runner,) = [r for r in RUNNERS if r.loop is peer.loop]
        runner.on_status = lambda e, _s: events.append(e)
        await server.close()
        backend.close()
        await backend.wait_closed()
        await asyncio.sleep(0.05)

    try:
        loop.run_until_complete(main())
    finally:
        if peer is not None:  # (first: warnings are process-wide, and its loop runs)
            peer.stop()
        leaks = _left_open(loop)
    assert not leaks, leaks
    assert any("server shutting down" in getattr(e, "reason", "") for e in events), events


async def _refused(port: int) -> bool:
    try:
        _r, w = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    w.close()
    return False


@pytest.mark.parametrize("kind", LOOPS)
def test_a_failed_start_leaves_no_listener_open(kind):
    """A start() that fails on its second mapping (the address is in use) closes the first
    mapping's listener before it raises: it was left listening, with no way to learn it but
    a close() the program had no reason to call."""
    loop = _new_loop(kind)

    async def main() -> None:
        taken = await asyncio.start_server(_echo, "127.0.0.1", 0)
        taken_port = taken.sockets[0].getsockname()[1]
        first_port = free_port()
        server = RelayServer([Mapping("127.0.0.1", first_port, "127.0.0.1", 1494),
                              Mapping("127.0.0.1", taken_port, "127.0.0.1", 1494)], FAST)
        with pytest.raises(OSError, match="cannot listen on"):
            await server.start()
        assert await _refused(first_port)
        assert server.addresses == []
        with pytest.raises(RuntimeError, match="start"):
            await server.serve_forever()  # (not started)
        taken.close()
        await taken.wait_closed()
        await server.close()

    try:
        loop.run_until_complete(main())
    finally:
        leaks = _left_open(loop)
    assert not leaks, leaks


@pytest.mark.parametrize("kind", LOOPS)
def test_start_twice_is_refused_and_a_restart_lists_only_its_own_addresses(kind):
    """start() on a server that listens raises, instead of binding every mapping a second
    time (a port 0 mapping got a second port, and ``addresses`` listed both); after close()
    it may start again, and ``addresses`` lists only what it listens on then (it kept the
    closed ports first, where a program looks for the one to give its clients)."""
    loop = _new_loop(kind)

    async def main() -> None:
        backend = await asyncio.start_server(_echo, "127.0.0.1", 0)
        server = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1",
                                      backend.sockets[0].getsockname()[1])], FAST)
        await server.start()
        first = list(server.addresses)
        with pytest.raises(RuntimeError, match="already started"):
            await server.start()
        assert server.addresses == first
        await server.close()
        await server.close()  # (twice: nothing more to do)
        assert await _refused(first[0][1])
        await server.start()
        assert len(server.addresses) == 1
        r, w = await open_session(*server.addresses[0], config=FAST)
        w.write(b"ping")
        assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 10) == b""
        w.close()
        await server.close()
        backend.close()
        await backend.wait_closed()
        await asyncio.sleep(0.05)

    try:
        loop.run_until_complete(main())
    finally:
        leaks = _left_open(loop)
    assert not leaks, leaks


@pytest.mark.parametrize("kind", LOOPS)
def test_relay_client_start_twice_is_refused(kind):
    """As the server's: a second start() of a listening RelayClient raises instead of opening a
    second listener (and listing both); after close() it starts again, on its new address."""
    loop = _new_loop(kind)

    async def main() -> None:
        client = RelayClient(("127.0.0.1", 0), ("127.0.0.1", 2598), FAST)
        await client.start()
        first = list(client.addresses)
        with pytest.raises(RuntimeError, match="already started"):
            await client.start()
        assert client.addresses == first
        await client.close()
        await client.start()
        assert len(client.addresses) == 1
        await client.close()

    try:
        loop.run_until_complete(main())
    finally:
        leaks = _left_open(loop)
    assert not leaks, leaks


@pytest.mark.parametrize("kind", LOOPS)
def test_open_session_cancelled_before_its_stream_is_made_leaves_nothing(kind, monkeypatch):
    """``open_session`` cancelled after it made the session's side of the stream but before
    the application's side (its two steps): the session it had started went on, alone, to the
    server (a session and a backend connection there, held until the reliability timeout),
    and its handshake's outcome was logged as a future's exception never retrieved."""
    loop = _new_loop(kind)
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _lp, ctx: errors.append(ctx))
    real_open_connection = asyncio.open_connection
    between = asyncio.Event()

    async def slow_open_connection(*args: Any, **kw: Any) -> Any:
        between.set()
        await asyncio.sleep(0.5)  # (the session's handshake with the server runs meanwhile)
        return await real_open_connection(*args, **kw)

    async def main() -> None:
        backend = await asyncio.start_server(_echo, "127.0.0.1", 0)
        server = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1",
                                      backend.sockets[0].getsockname()[1])], FAST)
        await server.start()
        monkeypatch.setattr(asyncio, "open_connection", slow_open_connection)
        task = asyncio.ensure_future(open_session(*server.addresses[0], config=FAST))
        await between.wait()
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        monkeypatch.setattr(asyncio, "open_connection", real_open_connection)
        for _ in range(100):  # (bounded)
            if not server.sessions_by_id:
                break
            await asyncio.sleep(0.02)
        assert not server.sessions_by_id
        assert not [r for r in RUNNERS if r.loop is loop and not r.closed_future.done()]
        await server.close()
        backend.close()
        await backend.wait_closed()
        await asyncio.sleep(0.05)

    try:
        loop.run_until_complete(main())
        gc.collect()
    finally:
        leaks = _left_open(loop)
    assert not leaks, leaks
    assert not errors, errors


class _RemoteServer:
    """A relay server and its echo backend on an event loop of their own, in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: RelayServer | None = None
        self.backend: asyncio.base_events.Server | None = None
        self.events: list[Any] = []

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    async def start(self) -> int:
        self.backend = await asyncio.start_server(_echo, "127.0.0.1", 0)
        self.server = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1",
                                           self.backend.sockets[0].getsockname()[1])],
                                  Config(), on_status=lambda e, _s: self.events.append(e))
        await self.server.start()
        return self.server.addresses[0][1]

    async def states(self) -> list[str]:
        assert self.server is not None
        return [row["state"] for row in self.server.sessions()]

    async def _close(self) -> None:
        if self.server is not None:
            await self.server.close()
        if self.backend is not None:
            self.backend.close()
            await self.backend.wait_closed()
        await asyncio.sleep(0.05)

    def stop(self) -> None:
        try:
            self.call(self._close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.mark.parametrize("kind", LOOPS)
def test_close_sessions_ends_open_sessions_on_the_server_before_the_loop_ends(kind):
    """``close_sessions()``: what a program that opened sessions with ``open_session`` calls
    before it ends its loop. Without it a program had no way to end them there: a stream
    closed (``writer.close()``) is a half-close, so the session went on, and when the loop
    ended its link was dropped unannounced: the server held the session, DISCONNECTED, and its
    backend connection for the reliability timeout (180 s)."""
    from icafast.aio import close_sessions

    remote = _RemoteServer()
    loop = _new_loop(kind)
    events: list[Any] = []

    async def main() -> list[str]:
        port = await loop.run_in_executor(None, remote.call, remote.start())
        streams = []
        for _ in range(3):
            r, w = await open_session("127.0.0.1", port, config=FAST,
                                      on_status=lambda e, _s: events.append(e))
            w.write(b"ping")
            assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
            streams.append((r, w))
        _r, w = streams[0]
        w.close()  # (half-closed: the session goes on)
        await w.wait_closed()
        await close_sessions()
        for r, w in streams[1:]:
            with pytest.raises(ConnectionResetError, match="client shutting down"):
                await asyncio.wait_for(r.read(), 5)
            w.close()
        await asyncio.sleep(0.05)
        return await loop.run_in_executor(None, remote.call, remote.states())

    try:
        states = loop.run_until_complete(main())
    finally:
        leaks = _left_open(loop)
        remote.stop()
    assert not leaks, leaks
    assert states == []  # (each ended there by its CLOSE, not held DISCONNECTED)
    assert [e.reason for e in events if isinstance(e, ev.SessionClosed)] == [
        "client shutting down"] * 3
