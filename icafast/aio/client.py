"""The client: carries application TCP connections over reliable sessions to a relay server.

- ``RelayClient`` — ``icafast connect``: a local listener; each accepted application
  connection becomes one session.
- ``open_session`` — library API: an asyncio (reader, writer) pair whose byte stream survives
  link breaks (reconnects are hidden; status events go to ``on_status``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
import weakref
from typing import Any, cast

from .. import events as ev
from .. import handover as ho
from ..protocol import CLOSE_ABORTED, CLOSE_DONE, ClientSession, Config, State
from ..tls import ClientTLS, TLSVerifyError, check_peer
from ..tlspipe import uses_pipe
from ._relay import (
    Deadline,
    Endpoint,
    Link,
    Runner,
    StatusCallback,
    abort_with_rst,
    format_hostport,
    tune_socket,
)
from .dial import connect
from .server import (
    close_fds,
    drain_endpoints,
    duplicate_sockets,
    handed_listeners,
    listen_error,
    session_entry,
    take_endpoint,
)
from .tlslink import TLSSetup

log = logging.getLogger("icafast")

__all__ = ["RelayClient", "open_session", "close_sessions", "SHUTDOWN_WAIT"]

#: how long hand_over() lets the applications take what waits for them, at most (seconds)
HANDOVER_DRAIN = 2.0

#: How long a client that stops (``RelayClient.close``) waits in all for the server to take the
#: CLOSE of each session; what is left then is reset (a dead link must not hold up the exit).
SHUTDOWN_WAIT = 1.0
SHUTDOWN_REASON = "client shutting down"

#: ``ssl.SSLError`` reasons of a TLS handshake that got bytes which are not TLS records
_NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL",
                              "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"})
#: the engine's reason for a server whose first byte starts a TLS alert or handshake record
#: (what a TLS server answers to a plain-text HELLO)
_TLS_RECORD_STARTS = ("not an icafast server (first byte 0x15)",
                      "not an icafast server (first byte 0x16)")
_HINT_PLAIN_SERVER = ("is the server running with --no-tls (in a program: a RelayServer "
                      "without ssl=)?")
#: a reset in the TLS handshake: a plain-text server, or one with every handshake slot taken
_HINT_RESET_IN_TLS = _HINT_PLAIN_SERVER + (" (or one with all of its --max-handshakes "
                                           "connections in the handshake: its log says so)")
_HINT_TLS_SERVER = "the server speaks TLS: drop --no-tls (in a program: give tls=)"
_HINT_SILENT_SERVER = ("the server closed the connection without answering "
                       "(if it runs TLS, the default, drop --no-tls; in a program, give tls=)")
_HINT_CERT_REQUIRED = ("the server requires a client certificate: give --tls-client-cert and "
                       "--tls-client-key")
_HINT_CERT_REFUSED = ("the server refused this client's certificate (signed by another CA "
                      "than its --tls-client-ca, expired...: its log says why)")
#: the TLS alerts a server sends about the client's certificate (OpenSSL's texts)
_CERT_ALERTS = ("alert unknown ca", "alert bad certificate", "alert certificate expired",
                "alert certificate unknown", "alert certificate revoked",
                "alert unsupported certificate", "alert access denied")


def _client_cert_hint(reason: str) -> str | None:
    """What to tell when a link failed with ``reason`` (a TLS error's text) because the
    server did not take the client's certificate (or the lack of one), else None. (In TLS 1.3
    the server's verdict comes after the client's handshake is done: as the link's first
    record, not as a failed handshake.)"""
    if "alert certificate required" in reason:
        return _HINT_CERT_REQUIRED
    if any(a in reason for a in _CERT_ALERTS):
        return _HINT_CERT_REFUSED
    return None


#: A session's reconnect attempts are logged at INFO for the first few of each outage, then
#: every tenth; the others at DEBUG (-v). An outage of the reliability timeout (180 s) makes
#: some forty attempts per session, two lines each: a client's log, with many sessions, would
#: be mostly these.
_ATTEMPTS_LOGGED = 3
_ATTEMPTS_LOGGED_EVERY = 10


def _attempt_level(attempt: int) -> int:
    """The level of the lines about reconnect attempt ``attempt``."""
    if attempt <= _ATTEMPTS_LOGGED or attempt % _ATTEMPTS_LOGGED_EVERY == 0:
        return logging.INFO
    return logging.DEBUG


def _tls_handshake_hint(e: BaseException) -> str | None:
    """What to tell about a TLS link that failed with ``e``, when the peer closed the
    connection in the handshake or answered with bytes that are not TLS (None otherwise:
    refused, timed out, a certificate that did not verify), or the server refused the
    client's certificate (or its lack of one)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return None
    if isinstance(e, ssl.SSLError) and _client_cert_hint(str(e)):
        return _client_cert_hint(str(e))
    if isinstance(e, ssl.SSLError):
        if isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or (
                getattr(e, "reason", None) in _NOT_TLS_REASONS):
            return _HINT_PLAIN_SERVER
        return None
    if isinstance(e, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return _HINT_RESET_IN_TLS
    return None


class _Attempt:
    """One link attempt of a client session, and its deadline."""

    __slots__ = ("setup", "link", "handed", "deadline")

    def __init__(self, setup: TLSSetup | None, loop: asyncio.AbstractEventLoop,
                 timeout: float) -> None:
        self.setup = setup
        self.link: Link | None = None
        self.handed = False  # the link went to the session's link_made: the deadline is past
        # (once the link went to the session, taken or refused, the attempt ends by itself:
        # the deadline leaves it alone)
        self.deadline = Deadline(loop, timeout, lambda: not self.handed, "link")


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _ClientRunner(Runner):
    def __init__(self, loop: asyncio.AbstractEventLoop, server: tuple[str, int], config: Config,
                 fallback: tuple[str, int] | None, on_status: StatusCallback | None,
                 label: str = "", tls: ClientTLS | None = None,
                 handed: tuple[dict[str, Any], Any] | None = None) -> None:
        if fallback is not None:  # fall back at once rather than retry the first connect
            config = dataclasses.replace(config, connect_retry=0.0)
        # (``handed``: a session's state and unacknowledged bytes from a hand-over)
        engine = (ClientSession(config, loop.time()) if handed is None else
                  ClientSession.from_state(config, handed[0], handed[1], loop.time()))
        super().__init__(loop, engine, "client", on_status)
        self.engine: ClientSession = self.engine  # type: ignore[assignment]
        self.server = server
        self.fallback = fallback
        self.label = label
        self.connect_task: asyncio.Task[Any] | None = None
        # "session" / "fallback", or ConnectionError; only for open_session(), which awaits
        # it: a future no one awaits would log its error as never retrieved when freed
        self.ready: asyncio.Future[str] | None = None
        self.tls = tls
        self._tls_failed = False  # a certificate did not verify: never fall back to plain text
        self._verify_logged = False  # ... and that was logged as an error (once per session)
        self._attempt: _Attempt | None = None  # the link attempt in progress
        self._dialed: Any = None  # the server's address that a link last connected to
        self._hinted = False  # a hint on mismatched TLS settings was logged (once per session)
        self._silent_closes = 0  # first links closed before any answer (see handle_event)
        self._hint = ""  # ... that hint (open_session's error repeats it)
        self._logged_failure: str | None = None  # a failed connect, logged by _connect
        self._attempt_level = logging.INFO  # of the lines about the current link attempt
        self._stopping = False  # the client stops: see stop()
        #: relaying to the fallback address, without a session (see _start_fallback)
        self.fell_back = False
        #: the link that carries the session's CLOSE as the client stops, until it is gone
        self._last_link: Link | None = None
        self.last_link_gone: asyncio.Future[None] | None = None

    @property
    def sid(self) -> str:
        return self.engine.session_id.hex() if self.engine.session_id else f"(new{self.label})"

    def endpoint_made(self, ep: Endpoint) -> None:
        super().endpoint_made(ep)
        self.start_connect()

    def start_connect(self) -> None:
        if self.connect_task is not None and not self.connect_task.done():
            return
        self.connect_task = self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        host, port = self.server
        tls = self.tls
        timeout = self.engine.config.handshake_timeout
        kw: dict[str, Any] = {}
        setup: TLSSetup | None = None
        if tls is not None:
            # (loaded again first if its files have changed: a renewed client certificate)
            ctx = tls.current_context()
            if uses_pipe():  # TLS run by the link (icafast.aio.tlslink)
                setup = TLSSetup(ctx, server_side=False,
                                 server_hostname=tls.server_hostname or host, timeout=timeout,
                                 loop=self.loop, session=tls.session_for(host, port))
            else:  # the event loop's TLS transport
                kw = {"ssl": ctx, "server_hostname": tls.server_hostname or host,
                      "ssl_handshake_timeout": timeout}
        attempt = self._attempt = _Attempt(setup, self.loop, timeout)
        try:
            try:
                await attempt.deadline.run(self._open_link(host, port, attempt, kw))
            finally:
                if self._attempt is attempt:
                    self._attempt = None
        except (OSError, asyncio.TimeoutError) as e:
            reason = str(e) or type(e).__name__
            if isinstance(e, ssl.SSLCertVerificationError):
                self._verify_failed(f"server certificate rejected: {reason}")
                return
            if self.engine.state is not State.CLOSED:
                log.log(self._attempt_level, "session %s: connect to %s failed: %s", self.sid,
                        format_hostport(host, port), reason)
                self._logged_failure = reason  # (the engine's HandshakeRejected repeats it)
                if tls is not None:
                    hint = _tls_handshake_hint(e)
                    if hint is not None:
                        self.hint(f"TLS handshake with {format_hostport(host, port)} failed "
                                  f"({reason}): {hint}")
                self.engine.connect_failed(reason, self.now())
                self.pump()

    def _verify_failed(self, reason: str) -> None:
        """The server's certificate did not verify (chain, name or pinned fingerprint). No
        other attempt would verify either: a session that never had a link ends at once (the
        application's connection is reset); one that is resuming counts it as a failed
        attempt, as a blocked path (the server it reached before proved itself)."""
        self._tls_failed = True
        eng = self.engine
        if eng.state is State.CLOSED:
            return
        log.log(logging.INFO if self._verify_logged else logging.ERROR, "session %s: %s",
                self.sid, reason)
        self._verify_logged = True
        if not eng.has_session:
            eng.close(CLOSE_ABORTED, f"could not connect: {reason}", self.now())
        else:
            eng.connect_failed(reason, self.now())
        self.pump()

    def hint(self, text: str) -> None:
        """Log a hint on the client's or the server's TLS settings, once per session, while
        it has never had a link (a server that took this client's settings once has not
        changed them; a link refused later is a network's doing, or a restart's)."""
        if not self._hinted and not self.engine.has_session:
            self._hinted = True
            self._hint = text
            log.warning("session %s: %s", self.sid, text)

    async def _open_link(self, host: str, port: int, attempt: _Attempt,
                         kw: dict[str, Any]) -> None:
        setup = attempt.setup

        def link() -> Link:
            attempt.link = Link(self, setup)
            return attempt.link

        try:
            # (every address of a name that has several, not only its first: icafast.aio.dial)
            transport, _ = await connect(self.loop, link, host, port, first=self._dialed, **kw)
            # (tried first next time: the same server)
            self._dialed = transport.get_extra_info("peername") or self._dialed
            if setup is not None:
                await setup.done
        except BaseException:
            if setup is not None:
                setup.abort()
            raise

    def link_made(self, link: Link) -> None:
        if self._attempt is not None and self._attempt.link is link:
            self._attempt.handed = True
        if self.engine.state is State.CLOSED or self._done:
            link.close(abort=True)
            return
        if self.tls is not None and link.transport is not None:
            try:
                check_peer(self.tls, link.ssl_object)
            except TLSVerifyError as e:
                link.closed = True  # not ours: do not report its loss
                link.close(abort=True)
                self._verify_failed(str(e))
                return
        self.engine.connect(self.now())
        link.link_id = self.engine.link_id
        self.link = link
        self.pump()

    def handle_event(self, e: ev.Event) -> None:
        eng = self.engine
        if isinstance(e, ev.ReconnectDue):
            level = self._attempt_level = _attempt_level(e.attempt)
            log.log(level, "session %s: reconnecting (attempt %d)%s", self.sid, e.attempt,
                    f"; until one succeeds, every {_ATTEMPTS_LOGGED_EVERY}th is logged (-v: "
                    "each)" if e.attempt == _ATTEMPTS_LOGGED else "")
            self.status(e)
            self.start_connect()
            return
        if isinstance(e, ev.HandshakeRejected):
            logged, self._logged_failure = self._logged_failure, None
            if not (e.code == 0 and e.reason == logged):  # (said once per failed attempt)
                log.log(self._attempt_level if e.code == 0 else logging.INFO,
                        "session %s: handshake failed: %s", self.sid, e.reason)
            if e.code:
                # a REJECT frame: the server answered in this client's mode (plain text or
                # TLS), so a hint on mismatched TLS settings said before is wrong and goes no
                # further (into open_session's error)
                self._hint = ""
            if self.tls is not None and not eng.has_session and not e.code:
                cert_hint = _client_cert_hint(e.reason)
                if cert_hint is not None:
                    self.hint(cert_hint)
            if self.tls is None and not eng.has_session:  # plain text: a server wanting TLS?
                if e.reason.startswith(_TLS_RECORD_STARTS):
                    self.hint(_HINT_TLS_SERVER)
                elif e.reason.startswith(("connection closed by peer", "connection lost")):
                    # (twice: one link a network broke before the answer came is not a sign)
                    self._silent_closes += 1
                    if self._silent_closes >= 2:
                        self.hint(_HINT_SILENT_SERVER)
            if self.link is not None and self.engine.link_id != self.link.link_id:
                self.link.close(abort=True)
                self.link = None
            self.status(e)
            return
        if isinstance(e, ev.LinkUp):
            self._attempt_level = logging.INFO
            link = self.link
            # (a link whose TLS the loop runs cannot resume; and a TLS 1.2 resumption would
            # reuse the first handshake's keys, so only TLS 1.3 sessions are kept)
            if (self.tls is not None and link is not None and link.tls is not None
                    and link.ssl_object.version() == "TLSv1.3"):
                host, port = self.server
                self.tls.remember(host, port, link.tls.session())
            self._settle("session")
        if (isinstance(e, ev.SessionClosed) and self.fallback is not None
                and not eng.has_session and e.code == CLOSE_ABORTED and not self._tls_failed):
            self._start_fallback(e.reason)
            return
        if isinstance(e, ev.SessionClosed):
            self._settle(None, f"{e.reason} ({self._hint})" if self._hint else e.reason)
            link = self.link
            if (self._stopping and link is not None and link.transport is not None
                    and not link.closed):
                # the CLOSE goes on this link, which then lingers until the server closes it
                gone = self.last_link_gone = self.loop.create_future()
                link.on_lost = lambda: _resolve(gone)
                self._last_link = link
        super().handle_event(e)

    def endpoint_lost(self, exc: Exception | None) -> None:
        if self._stopping:
            return  # (stop() ends the session; the reset application says nothing new)
        super().endpoint_lost(exc)

    # -- the client stops: each session is closed on the server too ---------------------------
    def stop(self, reason: str) -> bool:
        """Begin ending the session because the client stops: CLOSE to the server on the link
        that is up; a session that is disconnected tries a new link at once to deliver it (as
        after the application's abort, PROTOCOL.md 6.4). Returns whether to wait for the
        session's end (``closed_future``) and then for ``last_link_gone``; ``finish_stop()``
        ends whatever is left."""
        self._stopping = True
        if self._done:  # ended, or relaying to the fallback address: nothing to tell
            return False
        eng = self.engine
        eng.close(CLOSE_ABORTED, reason, self.now())
        if eng.state is not State.CLOSED and eng.closing and self.link is None:
            self.start_connect()
        self.pump()
        return not self.closed_future.done()

    def finish_stop(self, reason: str) -> None:
        """End the session now, whatever became of ``stop()``: reset the application's
        connection and the link, close a link that still lingers, abandon a link attempt."""
        self.abort(reason)
        link, self._last_link = self._last_link, None
        if link is not None:
            link.close()
        task = self.connect_task
        if task is not None and not task.done():
            task.cancel()

    def _settle(self, result: str | None, error: str = "") -> None:
        """Tell open_session() (if it waits) what became of the session: ``result``, or
        ConnectionError(``error``)."""
        ready = self.ready
        if ready is None or ready.done():
            return
        if result is None:
            ready.set_exception(ConnectionError(error))
        else:
            ready.set_result(result)

    # -- fallback: no session reliability, a plain relay to e.g. the server's 1494 ----------
    def _start_fallback(self, reason: str) -> None:
        assert self.fallback is not None
        host, port = self.fallback
        log.warning("session-reliability handshake with %s failed (%s); connecting straight "
                    "to fallback %s WITHOUT session reliability", format_hostport(*self.server),
                    reason, format_hostport(host, port))
        self._done = True
        self.fell_back = True
        self.status(ev.HandshakeRejected(0, f"fallback to {format_hostport(host, port)}: "
                                            f"{reason}"))
        if self.link is not None:
            self.link.close(abort=True)
            self.link = None
        # (kept: the loop holds only weak references to its tasks)
        self.connect_task = self.loop.create_task(self._fallback(host, port))

    async def _fallback(self, host: str, port: int) -> None:
        ep = self.endpoint
        assert ep is not None
        bridge = _PlainBridge(self, ep)
        try:
            await asyncio.wait_for(
                connect(self.loop, lambda: _FallbackProtocol(bridge), host, port),
                self.engine.config.handshake_timeout,
            )
        except (OSError, asyncio.TimeoutError) as e:
            log.warning("fallback %s failed too: %s", format_hostport(host, port), e)
            self._settle(None, f"fallback failed: {e}")
            self.fallback_ended(e)
            abort_with_rst(ep.transport)
            return
        self._settle("fallback")

    def fallback_ended(self, exc: BaseException | None) -> None:
        """The fallback connection is over (``exc``: how, None when it closed): so is what
        stands for the session, ``closed_future`` (a client forgets it then)."""
        if not self.closed_future.done():
            reason = (f"fallback connection: {exc or type(exc).__name__}" if exc is not None
                      else "fallback connection closed")
            self.closed_future.set_result(ev.SessionClosed(
                CLOSE_ABORTED if exc is not None else CLOSE_DONE, reason, exc is None))


class _PlainBridge:
    """Stands in for the runner+engine of an Endpoint once the client fell back to a plain relay:
    application bytes go straight to the fallback connection."""

    def __init__(self, runner: _ClientRunner, ep: Endpoint) -> None:
        self.runner = runner
        self.ep = ep
        self.out: asyncio.Transport | None = None
        self.out_paused = False
        self._buf = bytearray(256 * 1024)
        self._mv = memoryview(self._buf)
        self.engine = self  # Endpoint asks runner.engine for buffers
        self.app_eof = False  # the application's end of file went to the fallback connection
        self.out_eof = False  # ... and the fallback connection's to the application

    # engine-like
    @property
    def send_free(self) -> int:
        return 0 if self.out is None or self.out_paused else len(self._buf)

    def send_view(self, n: int) -> memoryview:
        return self._mv[: min(n, len(self._buf))]

    def commit_view(self, n: int) -> None:
        if self.out is not None:
            self.out.write(bytes(self._mv[:n]))

    # runner-like
    def pump(self) -> None:
        if self.out is None:
            return
        if self.ep.pending:
            for chunk in self.ep.pending:
                self.out.write(chunk)
            self.ep.pending.clear()
        if self.out_paused:
            self.ep.pause()
        else:
            self.ep.resume()

    def endpoint_eof(self) -> None:
        if self.out is not None and self.out.can_write_eof():
            self.out.write_eof()
            self.app_eof = True
            self.both_ended()

    def both_ended(self) -> None:
        """Once both streams have ended (end of file each way), both connections are closed:
        neither side tells it otherwise (a half-closed socket whose peer then closes gets no
        further event), and they, the runner and its buffers stayed for good."""
        if self.app_eof and self.out_eof:
            if self.out is not None:
                self.out.close()
            if self.ep.transport is not None and not self.ep.closed:
                self.ep.transport.close()

    def endpoint_lost(self, exc: Exception | None) -> None:
        if self.out is not None:
            if exc is None:
                self.out.close()
            else:
                abort_with_rst(self.out)

    def sink_paused(self) -> None:
        if self.out is not None:
            self.out.pause_reading()

    def sink_resumed(self) -> None:
        if self.out is not None:
            self.out.resume_reading()

    def connected(self, transport: asyncio.Transport) -> None:
        self.out = transport
        eng = self.runner.engine
        # bytes the application sent before we gave up on the session go first
        for v in eng.tx.views():
            transport.write(bytes(v))
        self.ep.runner = self  # type: ignore[assignment]
        if self.ep.eof and not self.ep.pending:
            self.endpoint_eof()
        self.pump()


class _FallbackProtocol(asyncio.Protocol):
    def __init__(self, bridge: _PlainBridge) -> None:
        self.bridge = bridge

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        tune_socket(transport)
        self.bridge.connected(transport)

    def data_received(self, data: bytes) -> None:
        t = self.bridge.ep.transport
        if t is not None and not self.bridge.ep.closed:
            t.write(data)

    def eof_received(self) -> bool:
        t = self.bridge.ep.transport
        if t is not None and not self.bridge.ep.closed and t.can_write_eof():
            t.write_eof()
            self.bridge.out_eof = True
            self.bridge.both_ended()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        t = self.bridge.ep.transport
        if t is not None:
            if exc is None:
                t.close()
            else:
                abort_with_rst(t)
        self.bridge.runner.fallback_ended(exc)

    def pause_writing(self) -> None:
        self.bridge.out_paused = True
        self.bridge.ep.pause()

    def resume_writing(self) -> None:
        self.bridge.out_paused = False
        self.bridge.ep.resume()


def _check_peer(what: str, host: Any, port: Any) -> None:
    # An address to connect to, checked before the first attempt: a bad one would otherwise
    # surface as connect failures, retried until the connect deadline
    if not isinstance(host, str) or not host:
        raise ValueError(f"{what}: the host must be a non-empty string, not {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
        raise ValueError(f"{what}: the port must be a number of 1-65535, not {port!r}")


class RelayClient:
    """``icafast connect``: listen locally; every application connection becomes a session."""

    def __init__(self, listen: tuple[str, int], server: tuple[str, int],
                 config: Config | None = None, *, fallback: tuple[str, int] | None = None,
                 on_status: StatusCallback | None = None, tls: ClientTLS | None = None) -> None:
        _check_peer("server", *server)
        if fallback is not None:
            _check_peer("fallback", *fallback)
        self.tls = tls
        self.listen = listen
        self.server = server
        self.config = config or Config()
        self.fallback = fallback
        self.on_status = on_status
        self.runners: set[_ClientRunner] = set()
        self._server: asyncio.base_events.Server | None = None
        self._stopped: asyncio.Event | None = None  # set by close(): serve_forever returns
        self.addresses: list[tuple[str, int]] = []
        self._count = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # (start() sets it)

    def _factory(self) -> Endpoint:
        self._count += 1
        assert self._loop is not None
        r = _ClientRunner(self._loop, self.server, self.config, self.fallback, self.on_status,
                          label=f" #{self._count}", tls=self.tls)
        self._track(r)
        return Endpoint(r)

    def _track(self, r: _ClientRunner) -> None:
        self.runners.add(r)  # (until the session ends)
        r.closed_future.add_done_callback(lambda _f: self.runners.discard(r))

    async def start(self, handover: tuple[bytes, list[int]] | None = None) -> None:
        """Listen (``addresses`` then lists the addresses bound). A client that listens
        cannot be started again (RuntimeError) until ``close()`` or ``hand_over()``.

        With ``handover``, what ``hand_over()`` of another client (in another process, or
        this one) returned: this client takes its sessions, with their application
        connections, and its listening socket, and owns the descriptors from then on (the
        ones it does not use are closed). Each session resumes at once on a new link to the
        server (this client's ``server``). A listener handed over for another address than
        ``listen`` is closed, and ``listen`` is listened on anew."""
        if self._server is not None and self._server.is_serving():
            raise RuntimeError("RelayClient.start(): already started (close() it first)")
        # (kept for the factory: asking for the running loop costs a getpid() call each time)
        self._loop = loop = asyncio.get_running_loop()
        taking = None
        if handover is not None:
            data, fds = handover
            fds = list(fds)
            try:
                doc, blob = ho.unpack(data)
                if doc.get("role") != "client":
                    raise ho.HandoverError("a server's hand-over: an icafast connect takes a "
                                           "client's")
            except ho.HandoverError:
                close_fds(fds)
                raise
            taking = doc, blob, fds
        self._stopped = asyncio.Event()
        self.addresses = []
        handed = [] if taking is None else handed_listeners(taking[0], taking[2],
                                                             list(self.listen))
        try:
            if taking is not None:
                await self._take_sessions(*taking)
            if handed:
                self._server = await loop.create_server(self._factory, sock=handed.pop(0),
                                                        backlog=1024)
            else:
                self._server = await loop.create_server(
                    self._factory, self.listen[0] or None, self.listen[1],
                    reuse_address=True, backlog=1024)
        except OSError as e:
            raise listen_error(e, *self.listen) from e
        finally:
            for extra in handed:  # (one listener per client; or the start failed)
                extra.close()
            if taking is not None:
                close_fds(fd for fd in taking[2] if fd >= 0)  # (the ones not taken)
        for sock in self._server.sockets:
            addr = sock.getsockname()
            self.addresses.append((addr[0], addr[1]))
            log.info("listening on %s -> server %s", format_hostport(addr[0], addr[1]),
                     format_hostport(*self.server))

    async def serve_forever(self) -> None:
        """Return once ``close()`` has been called (the listener serves from ``start()`` on)."""
        if self._stopped is None:
            raise RuntimeError("RelayClient.start() first")
        await self._stopped.wait()

    async def hand_over(self, drain: float = HANDOVER_DRAIN) -> tuple[bytes, list[int]]:
        """Stop, and give the sessions to the client that ``start(handover=...)`` next (an
        upgraded icafast, in the process ``exec`` makes of this one, or in another one the
        descriptors are sent to): returns the sessions' state and the descriptors it refers
        to (the listening socket and each session's application connection), which the
        caller then owns.

        The listener stops accepting (connections wait in its backlog for the next client),
        and the links are no longer read. Up to ``drain`` seconds go to letting each
        application take what was received for it; what it has not taken then is left out
        (the server has not had it acknowledged, and sends it again). Then every session's
        link is reset, and the next client resumes it; the application connections go on
        there, unaware. Unlike ``close()``, nothing is said to a peer. A session that fell
        back to a plain connection (``fallback``) has no state to hand over: it ends here.
        Like ``close()``, this client may ``start()`` again afterwards."""
        server = self._server
        if self._stopped is None or server is None or not server.is_serving():
            raise RuntimeError("RelayClient.hand_over(): not started")
        loop = asyncio.get_running_loop()
        runners = [r for r in self.runners if not r.fell_back]
        fds, listeners, apps = duplicate_sockets(
            [(sock, list(self.listen)) for sock in server.sockets], runners, "client")
        server.close()  # (the socket stays open: the duplicate; its backlog waits)
        self._server = None
        await drain_endpoints(loop, runners, drain)
        # From here to the return, no other callback runs: nothing changes under the snapshot.
        packer = ho.Packer()
        sessions = []
        for r in runners:
            entry = session_entry(r, packer, fds, apps.pop(r, -1))
            if entry is not None:
                entry["app"] = entry.pop("endpoint")
                entry["label"] = r.label
                sessions.append(entry)
        close_fds(apps.values())  # (of sessions that ended meanwhile)
        data = packer.pack({"role": "client", "listeners": listeners, "sessions": sessions,
                            "count": self._count,
                            # (the next client's links resume them: abbreviated handshakes)
                            "tls": self.tls.export_sessions() if self.tls is not None else None})
        for r in runners:
            r.let_go()
            task = r.connect_task  # (a link attempt under way: the next client makes its own)
            if task is not None and not task.done():
                task.cancel()
        ended = [r for r in self.runners if r.fell_back]
        if ended:
            log.warning("hand-over: %d connection(s) relayed to the fallback address without "
                        "session reliability end here", len(ended))
            for r in ended:
                r.finish_stop("client handed over")
        self.runners.clear()
        if self._stopped is not None:
            self._stopped.set()
        log.info("handed over: %d sessions, %d listening sockets", len(sessions), len(listeners))
        return data, fds

    async def _take_sessions(self, doc: dict[str, Any], blob: memoryview,
                             fds: list[int]) -> None:
        """The sessions of a hand-over (start), each resuming at once."""
        assert self._loop is not None
        loop = self._loop
        self._count = max(self._count, int(doc.get("count", 0)))
        if self.tls is not None:
            self.tls.import_sessions(doc.get("tls"))
        taken = 0
        for entry in doc["sessions"]:
            r = _ClientRunner(loop, self.server, self.config, self.fallback, self.on_status,
                              label=str(entry.get("label", "")), tls=self.tls,
                              handed=(entry["state"], ho.area(blob, entry["unacked"])))
            self._track(r)
            if not await take_endpoint(r, entry["app"], entry, blob, fds, "application"):
                r.stop("its application connection could not be taken over")
                continue
            if r.endpoint is None:  # (no application connection: the session still ends)
                r.start_connect()
            r.pump()
            taken += 1
        log.info("took over %d sessions from the client before", taken)

    async def close(self, timeout: float = SHUTDOWN_WAIT) -> None:
        """Stop listening and end every session: each is closed on the server too (CLOSE, on
        which the server closes its backend connection at once), and the application's
        connection is reset. Waits at most ``timeout`` seconds in all for the server to take
        the CLOSEs, then resets whatever is left."""
        if self._stopped is not None:
            self._stopped.set()
        if self._server is not None:
            self._server.close()
        await _stop_sessions(list(self.runners), timeout)
        if self._server is not None:
            await self._server.wait_closed()


async def _stop_sessions(runners: list[_ClientRunner], timeout: float) -> None:
    """End ``runners``' sessions as the client stops: CLOSE to the server (on a new link for
    a session that is disconnected), at most ``timeout`` seconds in all for the server to take
    them, then reset whatever is left."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    ending = {r.closed_future for r in runners if r.stop(SHUTDOWN_REASON)}
    if ending:  # (a disconnected session's CLOSE waits for its new link)
        await asyncio.wait(ending, timeout=max(0.0, end - loop.time()))
    gone = {f for r in runners if (f := r.last_link_gone) is not None and not f.done()}
    if gone:  # the server closes each link once it has the CLOSE
        await asyncio.wait(gone, timeout=max(0.0, end - loop.time()))
    for r in runners:
        r.finish_stop(SHUTDOWN_REASON)
    await asyncio.sleep(0)  # (the connections reset above are gone after this turn)


#: the sessions that open_session made (weakly held: each until it ends and is freed)
_OPENED: weakref.WeakSet[_ClientRunner] = weakref.WeakSet()


async def close_sessions(timeout: float = SHUTDOWN_WAIT) -> None:
    """End every session that :func:`open_session` made on the running event loop and that
    has not ended, as a program that stops must: each is closed on the server too (CLOSE, on
    which the server closes its backend connection at once; a session that is disconnected
    tries a new link to deliver it), and its stream's reads raise ConnectionResetError. Waits
    at most ``timeout`` seconds in all for the server to take the CLOSEs, then resets whatever
    is left: when it returns, nothing of those sessions is open.

    (A stream merely closed, ``writer.close()``, is a half-close: its session goes on until the
    backend closes its side too. A program that ends its event loop while sessions go on
    drops their links unannounced, and the server holds each session and its backend
    connection for the reliability timeout, 180 s by default.)"""
    loop = asyncio.get_running_loop()
    await _stop_sessions([r for r in _OPENED if r.loop is loop and not r.closed_future.done()],
                         timeout)


async def open_session(
    host: str,
    port: int,
    *,
    config: Config | None = None,
    on_status: StatusCallback | None = None,
    fallback: tuple[str, int] | None = None,
    tls: ClientTLS | None = None,
    limit: int = 2**16,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a reliable session to the relay server at ``host:port``.

    Returns once the first handshake completed (or the fallback connection is up); raises
    ConnectionError if neither works. Cancelled (or timed out by a ``wait_for`` around it),
    it ends the session it had begun, on the server too. The returned stream carries exactly
    the bytes of the backend connection, across any number of link breaks;
    ``writer.write_eof()`` half-closes.
    ``on_status(event, engine)`` receives LinkUp / LinkLost / ReconnectDue / SessionClosed / ...
    ``tls`` (from :func:`icafast.tls.client_context`) encrypts and verifies every link.

    The end of the stream tells how the session ended, as a TCP connection to the backend
    would: after a graceful end the reader reaches EOF; after an abortive one (the server or
    the backend reset it, the reliability timeout passed, a resume was refused) reads raise
    ConnectionResetError, and bytes not read yet may be lost, as with a reset connection.
    """
    _check_peer("server", host, port)
    if fallback is not None:
        _check_peer("fallback", *fallback)
    loop = asyncio.get_running_loop()
    app_sock, relay_sock = socket.socketpair()
    # The stream is one end of a socket pair, which cannot carry a reset: an abortive end is
    # given to its reader as the error a reset TCP connection gives
    readers: list[asyncio.StreamReader] = []

    def status(e: ev.Event, engine: Any) -> None:
        if isinstance(e, ev.SessionClosed) and not e.graceful and readers:
            readers[0].set_exception(ConnectionResetError(
                f"icafast session ended abortively: {e.reason}"))
        if on_status is not None:
            on_status(e, engine)

    runner = _ClientRunner(loop, (host, port), config or Config(), fallback, status, tls=tls)
    ready = runner.ready = loop.create_future()
    _OPENED.add(runner)

    def abandon() -> None:
        # (cancelled, or a timeout around it: the session ends now, on the server too, and
        # the link attempt and its socket go now, not at the handshake timeout)
        runner.stop("open_session() abandoned")
        runner.finish_stop("open_session() abandoned")
        if not ready.done():
            ready.cancel()
        elif not ready.cancelled():
            ready.exception()  # (retrieved: not logged as an exception no one awaited)

    try:
        # (the session starts as the first step returns: it connects to the server while
        # the second makes the application's side)
        await loop.connect_accepted_socket(lambda: Endpoint(runner), relay_sock)
        reader, writer = await asyncio.open_connection(sock=app_sock, limit=limit)
        readers.append(reader)
    except BaseException:
        abandon()
        app_sock.close()
        relay_sock.close()
        raise
    try:
        await ready
    except BaseException:
        abandon()
        writer.close()
        raise
    return reader, writer
