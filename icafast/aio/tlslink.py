"""The TLS handshake of a link that runs TLS itself, over a plain transport.

Where the compiled pipe can run (:func:`icafast.tlspipe.uses_pipe`), links are made on plain
TCP transports and secured here: an ``ssl.SSLObject`` over two ``ssl.MemoryBIO`` objects does
the handshake with the link's ``ssl.SSLContext`` (the same context, certificates, host name
check and errors as with the event loop's TLS transport), then the link reads and writes every
record through a :mod:`icafast.tlspipe` pipe (benchmarks/HISTORY.md: "TLS records driven from
C"). The link's owner sees the link only once the handshake is done, as with the loop's TLS.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from ..protocol import MAGIC
from ..tlspipe import offer_session, pipe_for

log = logging.getLogger("icafast")

#: said when an icafast HELLO in plain text came where the TLS handshake was expected
_HINT_PLAIN_CLIENT = (" (an icafast client without TLS: it runs with --no-tls, or in a program "
                      "without tls=, this server with TLS)")

__all__ = ["TLSSetup"]


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
        if self.link is not None:
            self.link.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
        if self.server_side:
            log.info("TLS handshake from %s failed: %s%s",
                     self.link.peer if self.link is not None else "?", e,
                     _HINT_PLAIN_CLIENT if MAGIC in self._first else "")
        if not self.done.done():
            self.done.set_exception(e)
            self.done.exception()  # (marked retrieved: a server link's is never awaited)
