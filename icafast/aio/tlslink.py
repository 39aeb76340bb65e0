"""The TLS handshake of a link that runs TLS itself, over a plain transport.

Where the compiled pipe can run (:func:`icafast.tlspipe.uses_pipe`), links are made on plain
TCP transports and secured here: an ``ssl.SSLObject`` over two ``ssl.MemoryBIO`` objects does
the handshake with the link's ``ssl.SSLContext`` (the same context, certificates, host name
check and errors as with the event loop's TLS transport), then the link reads and writes every
record through a :mod:`icafast.tlspipe` pipe (benchmarks/HISTORY.md: "TLS records driven from
C"). The link's owner sees the link only once the handshake is done, as with the loop's TLS.

Where the pipe cannot run, a server's links are still made on plain TCP transports, and
:class:`LoopTLSSetup` hands each to the event loop's TLS transport (``loop.start_tls``): the
server counts a connection in its handshake from the TCP connection on, as with the pipe, and
logs why a TLS handshake failed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import types
from typing import Any

from ..protocol import MAGIC
from ..tlspipe import offer_session, pipe_for

log = logging.getLogger("icafast")

#: said when an icafast HELLO in plain text came where the TLS handshake was expected
_HINT_PLAIN_CLIENT = (" (an icafast client without TLS: it runs with --no-tls, or in a program "
                      "without tls=, this server with TLS)")

__all__ = ["TLSSetup", "LoopTLSSetup"]


class TLSSetup:
    """One link's TLS handshake: give it to ``Link(owner, tls_setup)``.

    ``done`` resolves when the link is secured (after ``owner.link_made``) and fails with the
    handshake's exception (``ssl.SSLCertVerificationError``, ``TimeoutError``,
    ``ConnectionError``...) otherwise; the transport is then aborted and the owner never hears
    of the link."""

    def __init__(self, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None, timeout: float,
                 loop: asyncio.AbstractEventLoop,
                 session: Any = None) -> None:
        self.context = context
        self.session = session  # (client: a session to resume, from a pipe's session())
        self.server_side = server_side
        self.server_hostname = server_hostname
        self.timeout = timeout
        self.loop = loop
        self.done: asyncio.Future[None] = loop.create_future()
        self.link: Any = None
        self.transport: asyncio.Transport | None = None
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.sslobj: ssl.SSLObject | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._first = b""  # (server: the start of what the client sent, for the log)

    def start(self, link: Any, transport: asyncio.Transport) -> None:
        """Called by the link's ``connection_made``: send the first flight (client), or wait
        for the peer's (server)."""
        self.link, self.transport = link, transport
        try:
            self.sslobj = self.context.wrap_bio(self._in, self._out, server_side=self.server_side,
                                                server_hostname=self.server_hostname)
            if self.session is not None:
                offer_session(self.sslobj, self.session)
        except (ssl.SSLError, ValueError) as e:
            self._fail(e)
            return
        self._timer = self.loop.call_later(self.timeout, self._timed_out)
        if not self.server_side:  # (a server has nothing to do before the ClientHello)
            self._step()

    def feed(self, data: Any) -> None:
        """Handshake records from the peer."""
        if self.sslobj is None or self.done.done():
            return
        if self.server_side and len(self._first) < 64:
            self._first += bytes(data[: 64 - len(self._first)])
        self._in.write(data)
        self._step()

    def lost(self, exc: BaseException | None) -> None:
        """The connection ended before the handshake did."""
        if not self.done.done():
            self._fail(ConnectionResetError(f"connection lost in the TLS handshake: {exc}")
                       if exc else ConnectionResetError("connection closed in the TLS handshake"))

    def abort(self) -> None:
        """Give up (the caller timed out or was cancelled): close the connection unless the
        handshake already ended. (A task cancelled while awaiting ``done`` cancels ``done``
        too: that is not an end of the handshake, and the connection must still close.)"""
        if not self.done.done() or self.done.cancelled():
            self._fail(TimeoutError("TLS handshake abandoned"))

    def _flush(self) -> None:
        if self._out.pending and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self._out.read())

    def _step(self) -> None:
        assert self.sslobj is not None
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ssl.CertificateError, OSError) as e:
            self._flush()  # (the alert that tells the peer why)
            self._fail(e)
            return
        self._flush()
        self._finish()

    def _finish(self) -> None:
        assert self.sslobj is not None
        link, sslobj = self.link, self.sslobj
        self._cancel_timer()
        try:
            pipe = pipe_for(sslobj, self._in, self._out)
        except RuntimeError as e:  # (checked at start-up; a pipe that fails here is a bug)
            self._fail(e)
            return
        link.secured(pipe, sslobj)
        if not self.done.done():
            self.done.set_result(None)
        # records that came with the handshake's last flight: application data
        if not link.closed:
            link.data_received(b"")

    def _timed_out(self) -> None:
        self._timer = None
        if not self.done.done():
            self._fail(TimeoutError(f"TLS handshake not done within {self.timeout:g} s"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, e: BaseException) -> None:
        self._cancel_timer()
        _failed(self, e, MAGIC in self._first)


def _failed(setup: TLSSetup | LoopTLSSetup, e: BaseException, plain_client: bool) -> None:
    """A link's TLS handshake failed: close its connection, say why (server side), and fail
    ``done``."""
    link, transport = setup.link, setup.transport
    if link is not None:
        link.closed = True
    if transport is not None and not transport.is_closing():
        transport.abort()
    if setup.done.done():  # (said once)
        return
    if setup.server_side:
        log.info("TLS handshake from %s failed: %s%s", link.peer if link is not None else "?",
                 str(e) or type(e).__name__, _HINT_PLAIN_CLIENT if plain_client else "")
    setup.done.set_exception(e)
    setup.done.exception()  # (marked retrieved: a server link's is never awaited)


@types.coroutine
def _resume(coro: Any, waiting: Any) -> Any:
    """Await the rest of ``coro``, which ``coro.send(None)`` ran up to its first wait, on
    ``waiting`` (what it yielded): for a task that goes on with a coroutine started at once
    (what Python 3.12's eager tasks do)."""
    while True:
        try:
            sent = yield waiting
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:  # (the task's cancellation, thrown in)
            try:
                waiting = coro.throw(e)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                waiting = coro.send(sent)
            except StopIteration as stop:
                return stop.value


class LoopTLSSetup:
    """A server link's TLS handshake by the event loop's TLS transport (``loop.start_tls``),
    where the compiled pipe cannot run: the same interface and ``done`` as :class:`TLSSetup`.

    The link is made on a plain TCP transport, so its owner counts it from the TCP connection
    on (``link_opened``), as with the pipe; the loop's TLS protocol takes the transport over
    in the link's ``connection_made``. Once the handshake is done the link writes to, and
    reads from, the loop's TLS transport; a failed one is logged with its reason (a refused
    client certificate among them) and the connection closed. Unlike the pipe, the loop's TLS
    transport sends no alert when a handshake fails: a refused client sees only the
    connection close."""

    server_side = True

    def __init__(self, context: ssl.SSLContext, *, timeout: float,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.context = context
        self.timeout = timeout
        self.loop = loop
        self.done: asyncio.Future[None] = loop.create_future()
        self.link: Any = None
        self.transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._early: list[bytes] = []  # (see feed)

    def start(self, link: Any, transport: asyncio.Transport) -> None:
        """Called by the link's ``connection_made``: the loop's TLS protocol takes the
        transport over before this returns, so that no byte of the handshake reaches the link
        (uvloop starts reading a new connection as soon as ``connection_made`` returns, pause
        or not: what it reads before the TLS protocol's own ``connection_made`` waits in that
        protocol's buffer)."""
        self.link, self.transport = link, transport
        coro = self.loop.start_tls(transport, link, self.context, server_side=True,
                                   ssl_handshake_timeout=self.timeout)
        try:
            # start_tls up to its first wait (the handshake): it has paused the transport,
            # given it to the TLS protocol and scheduled that protocol's connection_made
            waiting = coro.send(None)
        except StopIteration as done:  # (never: the handshake needs the peer)
            self._secured(done.value)
            return
        except (ssl.SSLError, OSError, RuntimeError, TypeError, ValueError) as e:
            _failed(self, e, False)
            return
        self._task = self.loop.create_task(self._handshake(_resume(coro, waiting)))

    async def _handshake(self, rest: Any) -> None:
        try:
            secured = await rest
        except asyncio.CancelledError:
            _failed(self, TimeoutError("TLS handshake abandoned"), False)
            raise
        except (ssl.SSLError, ssl.CertificateError, OSError, RuntimeError) as e:
            _failed(self, e, False)
            return
        self._secured(secured)

    def _secured(self, secured: Any) -> None:
        link = self.link
        if self.done.done() or link.closed or secured is None:  # (closed meanwhile)
            if secured is not None:
                secured.abort()
            _failed(self, ConnectionResetError("connection closed in the TLS handshake"),
                    False)
            return
        link.secured_by_loop(secured)
        self.done.set_result(None)
        early, self._early = self._early, []
        for data in early:
            if link.closed:
                break
            link.data_received(data)

    def feed(self, data: Any) -> None:
        """Plaintext the loop's TLS protocol gave the link as the handshake ended (records
        that came with its last flight), before ``start_tls`` returned: kept for the link."""
        if not self.done.done():
            self._early.append(bytes(data))

    def lost(self, exc: BaseException | None) -> None:
        """The connection ended before the handshake did (``start_tls`` fails too)."""
        if not self.done.done():
            _failed(self, ConnectionResetError(f"connection lost in the TLS handshake: {exc}")
                    if exc else ConnectionResetError("connection closed in the TLS handshake"),
                    False)

    def abort(self) -> None:
        """Give up: close the connection unless the handshake already ended."""
        if not self.done.done():
            _failed(self, TimeoutError("TLS handshake abandoned"), False)
        if self._task is not None and not self._task.done():
            self._task.cancel()
