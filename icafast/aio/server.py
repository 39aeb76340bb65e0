"""The relay server: accepts framed links (default port 2598) and relays each session to its
backend (default 127.0.0.1:1494). Embeddable: ``RelayServer`` in a gateway's own event loop."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import ipaddress
import json
import logging
import os
import socket
import ssl
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import events as ev
from .. import handover as ho
from .. import tls
from ..paths import check_private_dir
from ..protocol import (
    CLOSE_ABORTED,
    CLOSE_ADMIN,
    CLOSE_DONE,
    CLOSE_PROTOCOL,
    CLOSE_SHUTDOWN,
    CLOSE_TIMEOUT,
    REJECT_BACKEND,
    REJECT_BAD_PROOF,
    REJECT_BUSY,
    REJECT_CLOSED,
    REJECT_PROTOCOL,
    REJECT_RATE_LIMITED,
    REJECT_UNKNOWN_SESSION,
    REJECT_VERSION,
    Config,
    ProtocolError,
    ServerHandshake,
    ServerSession,
    State,
)
from ..proxyproto import ProxyHeaderParser
from ..rlimits import shortfall
from ..tlspipe import ticket_keys, uses_pipe
from ._relay import (
    Deadline,
    Endpoint,
    Link,
    Runner,
    StatusCallback,
    format_hostport,
    short_id,
    tcp_rtt,
    window_note,
)
from .tlslink import LoopTLSSetup, TLSSetup

log = logging.getLogger("icafast")

#: how a handshake that met a TLS ClientHello fails on a server without TLS, and what to say
_TLS_HANDSHAKE_START = "not an icafast client (first byte 0x16)"
_HINT_TLS_CLIENT = (" (a TLS handshake: the client runs with TLS, the default, this server "
                    "with --no-tls, or in a program without ssl=)")

__all__ = ["Mapping", "RelayServer", "parse_hostport"]

#: how long hand_over() lets the backends take what waits for them, at most (seconds)
HANDOVER_DRAIN = 2.0

#: the most source addresses whose failed resumes a server keeps count of (each for a minute)
MAX_FAILURE_SOURCES = 100_000

#: how the counters (RelayServer.metrics) name the REJECT and CLOSE codes
REJECT_NAMES = {REJECT_VERSION: "version", REJECT_UNKNOWN_SESSION: "unknown_session",
                REJECT_BAD_PROOF: "bad_proof", REJECT_CLOSED: "closed", REJECT_BUSY: "busy",
                REJECT_BACKEND: "backend", REJECT_PROTOCOL: "protocol",
                REJECT_RATE_LIMITED: "rate_limited"}
CLOSE_NAMES = {CLOSE_DONE: "done", CLOSE_ABORTED: "aborted", CLOSE_ADMIN: "admin",
               CLOSE_TIMEOUT: "timeout", CLOSE_PROTOCOL: "protocol", CLOSE_SHUTDOWN: "shutdown"}


def source_block(peer: str) -> str:
    """The source that per-source limits count a connection from ``peer`` ("host:port"):
    its IPv4 address, or its IPv6 address's /64, the least a site is given (one host can
    use all of its addresses). "?" for a connection whose address is gone."""
    host = peer.rsplit(":", 1)[0] if peer else "?"
    if not host.startswith("["):  # (an IPv4 address: as it is, without a parse per connection)
        return host
    host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.version == 6:
        mapped = ip.ipv4_mapped  # type: ignore[union-attr]
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


#: How long a server that stops (``RelayServer.close``) waits in all for its clients to take
#: the CLOSE of each session; the links left then are reset (a silent client must not hold up
#: the exit).
SHUTDOWN_WAIT = 1.0


def parse_hostport(text: str, default_host: str = "", default_port: int | None = None
                   ) -> tuple[str, int]:
    """'HOST:PORT', '[v6]:PORT', ':PORT' or 'PORT' -> (host, port). An IPv6 address without
    brackets is taken as a host alone ('::1') unless it ends in what could be a port
    ('::1:2598'), which is refused: brackets say which is meant."""
    text = text.strip()
    host, port_text = default_host, ""
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1 :] if end > 0 else ":"
        if end <= 0 or (rest and not rest.startswith(":")):
            raise ValueError(f"invalid address {text!r}: need [IPv6]:PORT")
        host, port_text = text[1:end], rest[1:]
    elif text.count(":") == 1:
        h, port_text = text.split(":")
        host = h or default_host
    elif text.count(":") > 1:
        last = text.rsplit(":", 1)[1]
        try:
            ipaddress.IPv6Address(text)
            ambiguous = len(last) > 1 and last.isdigit()  # '::1:2598': a port, or not?
        except ValueError:
            ambiguous = True
        if ambiguous:
            raise ValueError(f"invalid address {text!r}: write an IPv6 address in brackets, "
                             f"as [::1]:2598 (with a port) or [::1] (without)")
        host = text
    elif text.isdigit():
        port_text = text
    else:
        host = text
    port = default_port
    if port_text:
        if not port_text.isdigit():
            raise ValueError(f"invalid address {text!r}: the port must be a number")
        port = int(port_text)
    if port is None or not 0 <= port <= 65535:
        raise ValueError(f"invalid address {text!r}: need HOST:PORT, with a port of 0-65535")
    return host, port


def listen_error(e: OSError, host: str, port: int) -> OSError:
    """``e``, raised by binding ``host:port``, as one line that says where and why: "cannot
    listen on 127.0.0.1:2598: Address already in use" (the event loops' own words repeat the
    address, as a Python tuple: "error while attempting to bind on address ('127.0.0.1',
    2598): address already in use")."""
    why = os.strerror(e.errno) if e.errno and e.errno > 0 else (e.strerror or str(e))
    return OSError(e.errno, f"cannot listen on {format_hostport(host or '*', port)}: {why}")


@dataclass(frozen=True)
class Mapping:
    """One listener and the backend its sessions are relayed to."""

    listen_host: str
    listen_port: int
    backend_host: str
    backend_port: int

    @property
    def backend(self) -> str:
        return format_hostport(self.backend_host, self.backend_port)


class _ServerRunner(Runner):
    def __init__(self, server: RelayServer, engine: ServerSession, mapping: Mapping) -> None:
        super().__init__(server.loop, engine, "server", server.on_status)
        self.server = server
        self.mapping = mapping
        self.engine: ServerSession = engine
        #: the token of the NEW that made this session (PROTOCOL.md 3.2), and, while it
        #: connects to its backend, the link its ACCEPT is for
        self.new_token = b""
        self.pending: _PendingLink | None = None
        #: the order number of the connection attached last (_PendingLink.order)
        self.link_order = 0
        self.opened = False  # (its first link came up: counted as opened, and then as ended)
        self.source = "?"  # (source_block of the client that made it: see _make_session_room)

    def attach(self, pending: _PendingLink) -> bool:
        """Move ``pending``'s link into this session (NEW, or RESUME with a checked proof)."""
        link = pending.link
        old = self.link
        try:
            self.engine.accept(pending.hs, self.now())
        except ProtocolError as e:
            pending.reject(REJECT_PROTOCOL, str(e))
            return False
        pending.detach()
        self.engine.client_address = link.peer
        if old is not None and old is not link:
            old.close(abort=True)
        link.owner = self
        link.link_id = self.engine.link_id
        self.link = link
        self.link_order = pending.order
        if link.transport is not None:
            link.transport.resume_reading()
        self.pump()
        return True

    def handle_event(self, e: ev.Event) -> None:
        if isinstance(e, ev.LinkUp) and not e.resumed and self.engine.attached_links > 1:
            log.info("session %s: NEW repeated from %s (the client did not get the ACCEPT): "
                     "the same session, %d bytes replayed%s", self.sid,
                     self.engine.client_address, e.replayed, window_note(self.engine))
            self.status(e)
            return
        if isinstance(e, ev.LinkUp) and not e.resumed:
            self.server.counters["sessions_opened"] += 1
            self.opened = True
            log.info("session %s: new from %s to backend %s%s", self.sid,
                     self.engine.client_address, self.mapping.backend, window_note(self.engine))
            self.status(e)
            return
        if isinstance(e, ev.LinkUp):
            self.server.counters["resumes"] += 1
            log.info("session %s: resumed from %s, %d bytes replayed (reconnect %d)%s", self.sid,
                     self.engine.client_address, e.replayed, self.engine.reconnects,
                     window_note(self.engine))
            self.status(e)
            return
        if isinstance(e, ev.LinkLost):
            link = self.link
            if link is not None and link.link_id == e.link_id:
                self.link = None
                link.close(abort=True)
            log.info("session %s: link lost (%s); state DISCONNECTED", self.sid, e.reason)
            self.status(e)
            return
        super().handle_event(e)

    def session_closed(self, e: ev.SessionClosed) -> None:
        if self.opened:
            self.server._count_ended(self, e.code)
        link = self.link
        if link is not None and not link.closed:
            # the CLOSE goes on this link, which then lingers until the client closes it
            # (RelayServer.close waits for that, and closes what is left)
            self.server._lingering_link(link)
        self.server._forget(self)

    def endpoint_lost(self, exc: Exception | None) -> None:
        if self.engine.state is not State.CLOSED and not (exc is None and self.endpoint
                                                           and self.endpoint.eof):
            log.info("session %s: backend %s closed the connection%s", self.sid,
                     self.mapping.backend, f" ({exc})" if exc else "")
        super().endpoint_lost(exc)


class _PendingLink:
    """A client connection still in the handshake (owner of its Link until attached)."""

    def __init__(self, server: RelayServer, mapping: Mapping,
                 tls_setup: TLSSetup | LoopTLSSetup | None = None) -> None:
        self.server = server
        self.mapping = mapping
        #: the order in which the server accepted the connections (a client has one link at a
        #: time and opens the next only after giving up the last): see RelayServer._resume
        server._links_accepted += 1
        self.order = server._links_accepted
        self.link: Link = Link(self, tls_setup)
        self.hs: ServerHandshake = ServerHandshake(server.config, server.loop.time())
        self.proxy: ProxyHeaderParser | None = (
            ProxyHeaderParser() if server.proxy_protocol else None
        )
        self._timer: asyncio.TimerHandle | None = None
        self._attached = False
        self._counted = False
        self.source = "?"  # (source_block of the peer: see link_opened)
        self.received = 0  # bytes of the handshake read (after any PROXY header)
        if tls_setup is not None:
            tls_setup.done.add_done_callback(self._tls_done)

    def link_opened(self, link: Link) -> bool:
        """The connection is up, before any TLS handshake: it counts against the limit of
        connections in their handshakes from now on, or is closed at once beyond it."""
        if self._counted:
            return True
        srv = self.server
        self.source = source_block(link.peer)
        if len(srv._handshaking) >= srv.max_handshakes and not srv._make_room(self.source):
            srv.counters["turned_away_full"] += 1
            srv._note_overload(link.peer)
            self._attached = True
            link.close(abort=True)
            return False
        srv._handshaking.add(self)
        srv._by_source.setdefault(self.source, {})[self] = None
        self._counted = True
        return True

    def _tls_done(self, done: asyncio.Future[None]) -> None:
        if done.cancelled() or done.exception() is not None:
            if not self._attached:
                self.server.counters["tls_handshakes_failed"] += 1
            self.detach()  # the TLS handshake failed: the link is gone, unheard of

    def link_made(self, link: Link) -> None:
        if not self.link_opened(link):  # (a plain link; a TLS one was counted before)
            return
        t = self.hs.get_timer()
        if t is not None:
            self._timer = self.server.loop.call_at(t, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.hs.handle_timer(self.server.loop.time())
        self._process()

    def link_data(self, link: Link, data: memoryview) -> None:
        if self.proxy is not None and not self.proxy.done:
            try:
                rest = self.proxy.feed(data)
            except ProtocolError as e:
                log.info("connection from %s closed: %s", link.peer, e)
                link.close(abort=True)
                self.detach()
                return
            if not self.proxy.done:
                return
            if self.proxy.source is not None:
                host, port = self.proxy.source
                link.peer = format_hostport(host, port)
                if self._counted and not self._attached:  # (counted from now on as the client's)
                    self.server._forget_slot(self)
                    self.source = source_block(link.peer)
                    self.server._by_source.setdefault(self.source, {})[self] = None
            if not rest:
                return
            data = memoryview(rest)
        self.received += len(data)
        self.hs.receive_data(data, self.server.loop.time())
        self._process()

    def link_lost(self, link: Link, reason: str) -> None:
        link.closed = True
        if not self._attached:
            # (said when the client sent something: a connection that only opens and closes
            # is a port scan or a load balancer's health check, and worth no line)
            got = self.received
            log.log(logging.INFO if got else logging.DEBUG,
                    "connection from %s ended in the handshake: %s (after %d bytes%s)",
                    link.peer, reason, got,
                    ", in the middle of a frame" if self.hs.decoder.buffered else "")
        self.detach()

    def link_writable(self, link: Link) -> None:
        pass

    def detach(self) -> None:
        self._attached = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.server._handshaking.discard(self)
        self.server._forget_slot(self)

    def _flush(self) -> None:
        out = self.hs.data_to_send()
        if out and self.link.transport is not None and not self.link.closed:
            self.link._writelines(out)

    def reject(self, code: int, reason: str, level: int = logging.INFO) -> None:
        self.server.counters["rejected_" + REJECT_NAMES.get(code, str(code))] += 1
        self.hs.reject(code, reason)
        self._flush()
        log.log(level, "connection from %s rejected: %s", self.link.peer, reason)
        self.link.close()
        self.detach()

    def _process(self) -> None:
        e = self.hs.next_event()
        if isinstance(e, ev.NewSessionRequested):  # (the handshake's only event then)
            # Our HELLO waits to go in one write with the ACCEPT (or REJECT) that answers the
            # NEW (PROTOCOL.md 3.5), whether the NEW came with the client's HELLO or after ours.
            if self.link.transport is not None:
                self.link.transport.pause_reading()
            self.server._start_session(self)
            return
        self._flush()
        while e is not None:
            if isinstance(e, ev.ResumeRequested):
                self.server._resume(self, e)
            elif isinstance(e, ev.HandshakeFailed):
                self.server.counters["handshakes_failed"] += 1
                self._flush()
                log.info("connection from %s closed: handshake failed: %s%s", self.link.peer,
                         e.reason, _HINT_TLS_CLIENT if self.server.ssl is None
                         and e.reason.startswith(_TLS_HANDSHAKE_START) else "")
                self.link.close()
                self.detach()
            e = self.hs.next_event()


class RelayServer:
    """Listens for framed links on each mapping and relays sessions to the backends.

    ``await start()``, then either ``await serve_forever()`` or keep your own loop running;
    ``await close()`` stops it. ``sessions()`` lists sessions (as ``icafast sessions`` shows).
    """

    def __init__(
        self,
        mappings: list[Mapping],
        config: Config | None = None,
        *,
        control_path: str | None = None,
        on_status: StatusCallback | None = None,
        max_sessions: int = 10_000,
        backend_connect_timeout: float | None = None,
        ssl: ssl.SSLContext | None = None,
        max_handshakes: int = 1024,
        max_failed_resumes: int = 20,
        proxy_protocol: bool = False,
        ticket_key_lifetime: float | None = tls.TICKET_KEY_LIFETIME,
    ) -> None:
        if not mappings:
            raise ValueError("at least one listener -> backend mapping is needed")
        if ticket_key_lifetime is not None and not 0 <= ticket_key_lifetime < float("inf"):
            raise ValueError("ticket_key_lifetime: a finite number of seconds, not negative "
                             "(0 or None: the keys live as long as the TLS context)")
        for m in mappings:
            if not 0 < m.backend_port <= 65535:
                raise ValueError(f"backend {m.backend}: the port must be a number of 1-65535")
        self.mappings = list(mappings)
        self.config = config or Config()
        self.control_path = control_path
        self.on_status = on_status
        self.max_sessions = max_sessions
        self.ssl = ssl
        #: connections still in the handshake beyond this are closed at once (slowloris)
        self.max_handshakes = max_handshakes
        #: failed RESUME proofs/unknown ids per source address per minute before REJECT 8
        self.max_failed_resumes = max_failed_resumes
        #: source address -> times of its failed resumes within the minute, in the order of
        #: each source's latest failure (the front: the source quiet the longest)
        self._failures: collections.OrderedDict[str, list[float]] = collections.OrderedDict()
        self.proxy_protocol = proxy_protocol
        #: how long the TLS session ticket keys seal tickets before new ones are made
        #: (tls.renew_ticket_keys); None: as long as the context lives, as OpenSSL has it
        self.ticket_key_lifetime = ticket_key_lifetime or None
        #: when (loop time) the keys that seal this server's tickets were made, or taken with
        #: their age; None until the start; and the timer that renews them
        self._tickets_born: float | None = None
        self._ticket_timer: asyncio.TimerHandle | None = None
        # well inside the client's handshake timeout, so a REJECT reaches it in time
        self.backend_connect_timeout = backend_connect_timeout or self.config.handshake_timeout / 2
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.sessions_by_id: dict[bytes, _ServerRunner] = {}
        #: ended sessions' ids -> until when a RESUME of one gets REJECT 4 (CLOSED) rather
        #: than UNKNOWN; and (expiry, id) in the order they ended, which is their expiry order
        #: (now + one constant), so that expired ones are dropped from the front
        self._tombstones: dict[bytes, float] = {}
        self._tombstone_order: collections.deque[tuple[float, bytes]] = collections.deque()
        self._handshaking: set[_PendingLink] = set()
        #: the same, by source (source_block): each source's in the order they came
        self._by_source: dict[str, dict[_PendingLink, None]] = {}
        self._links_accepted = 0
        #: what has happened since the start (see metrics)
        self.counters: collections.Counter[str] = collections.Counter()
        #: stream bytes of the sessions that ended: from their clients, to them (acknowledged)
        self._ended_bytes = [0, 0]
        self._evict_logged = -1e9  # (when _make_room last logged)
        self._evict_sessions_logged = -1e9  # (when _make_session_room last logged)
        #: sessions (made, or connecting to their backend) by the source that made them
        self._sessions_by_source: dict[str, dict[_ServerRunner, None]] = {}
        #: NEW sessions connecting to their backend (not in sessions_by_id yet)
        self._creating: set[_ServerRunner] = set()
        #: NEW tokens -> the session made by the first NEW with it: a NEW that repeats it
        #: (the client did not get the ACCEPT) gets that session (PROTOCOL.md 3.2)
        self._new_tokens: dict[bytes, _ServerRunner] = {}
        self._servers: list[asyncio.base_events.Server] = []
        self._server_mapping: list[Mapping] = []  # (each listener's mapping, in _servers' order)
        #: the hand-over being taken (start(handover=)): its document, bytes, descriptors
        self._taking: tuple[dict[str, Any], memoryview, list[int]] | None = None
        self._control: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.started_at = time.time()
        self.addresses: list[tuple[str, int]] = []
        self._listen_labels: dict[int, str] = {}
        self._stopped: asyncio.Event | None = None  # set by close(): serve_forever returns
        #: links of ended sessions that linger for the client to read their CLOSE (at most
        #: LINGER seconds each), until their connection is gone; and what close() waits on
        self._closing_links: set[Link] = set()
        self._links_gone: asyncio.Future[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, handover: tuple[bytes, list[int]] | None = None) -> None:
        """Listen on every mapping (``addresses`` then lists the addresses bound, the port
        a mapping with port 0 got included) and open the control socket, if any. A start
        that fails (OSError: an address in use...) closes what it had opened before it
        raises. A server is started once: again only after ``close()`` or ``hand_over()``
        (RuntimeError otherwise).

        With ``handover``, what ``hand_over()`` of another server (in another process, or
        this one) returned: this server takes its sessions and its listeners, and owns
        the descriptors from then on (the ones it does not use are closed). Each session
        waits, DISCONNECTED, for its client to resume it; a listener whose address no
        mapping here has is closed, and a mapping with no listener handed over listens
        anew."""
        if self.proxy_protocol and self.ssl is not None:
            raise ValueError("--proxy-protocol needs the load balancer to terminate TLS "
                             "(use --no-tls behind it): the PROXY header precedes any TLS")
        if self._servers or self._control is not None:
            raise RuntimeError("RelayServer.start(): already started (close() it first)")
        self.loop = asyncio.get_running_loop()
        self.addresses = []
        self._listen_labels = {}
        if handover is not None:
            data, fds = handover
            try:
                doc, blob = ho.unpack(data)
            except ho.HandoverError:
                close_fds(fds)
                raise
            self._taking = doc, blob, list(fds)
            self._tickets_born = None  # (another server's keys, if taken, and their age)
        try:
            if self._taking is not None:
                await self._take_sessions()
            await self._listen()
        except BaseException:
            self.addresses = []
            await self._close_listeners()
            raise
        finally:
            if self._taking is not None:
                close_fds(fd for fd in self._taking[2] if fd >= 0)  # (the ones not taken)
                self._taking = None
        self._stopped = asyncio.Event()
        if self.ssl is not None:
            if self._tickets_born is None:
                self._tickets_born = self.loop.time()
            self._schedule_ticket_renewal()

    async def _listen(self) -> None:
        assert self.loop is not None
        short = shortfall(self.max_sessions, self.max_handshakes)
        if short is not None:
            log.warning("%s", short)
        # Links are made on plain transports: TLS is run by each link (icafast.aio.tlslink), or
        # handed to the event loop's TLS transport once the connection is counted
        piped = self.ssl is not None and uses_pipe()
        for m in self.mappings:
            factory = (  # noqa: E731
                lambda m=m: _PendingLink(self, m, self._tls_setup(piped)).link)
            servers = []
            for sock in self._handed_listeners(m):  # (from the server before: hand_over)
                servers.append(await self.loop.create_server(factory, sock=sock, backlog=1024))
            if not servers:
                try:
                    servers.append(await self.loop.create_server(
                        factory, m.listen_host or None, m.listen_port, reuse_address=True,
                        backlog=1024))
                except OSError as e:
                    raise listen_error(e, m.listen_host, m.listen_port) from e
            self._servers += servers
            self._server_mapping += [m] * len(servers)
            # how its sessions are listed: the port bound (a mapping may ask for port 0)
            bound = {sock.getsockname()[1] for srv in servers for sock in srv.sockets}
            self._listen_labels[id(m)] = format_hostport(
                m.listen_host or "*", bound.pop() if len(bound) == 1 else m.listen_port)
            for sock in (sock for srv in servers for sock in srv.sockets):
                addr = sock.getsockname()
                self.addresses.append((addr[0], addr[1]))
                log.info("listening on %s (%s) -> backend %s", format_hostport(addr[0], addr[1]),
                         "TLS" if self.ssl else "plain text", m.backend)
        if self.control_path:
            try:
                await self._start_control(self.control_path)
            except OSError as e:
                if e.strerror and e.strerror.startswith("control socket"):
                    raise
                why = os.strerror(e.errno) if e.errno and e.errno > 0 else (e.strerror or e)
                raise OSError(e.errno, f"control socket {self.control_path}: {why}"
                                       + (f" ({e.filename})" if e.filename else "")) from e

    def set_ssl(self, ssl: ssl.SSLContext) -> None:
        """Serve the links accepted from now on with ``ssl``, a new server context (a renewed
        certificate, another client CA): the links already secured keep the context they were
        made with, and every session goes on; a session whose link breaks resumes on a link
        secured by the new one. A server started without TLS cannot take one (nor the other
        way round): ValueError.

        ``ssl`` takes the session ticket keys of the context before
        (:func:`icafast.tls.import_ticket_keys`), if it lets in the same clients: a client whose
        link breaks after a certificate renewal resumes its TLS session as before. (Where the
        keys cannot be reached, without the compiled module, each client makes one full
        handshake.)"""
        if (ssl is None) != (self.ssl is None):
            raise ValueError("set_ssl: a server started with TLS takes another context, one "
                             "started without TLS none (the clients would not connect)")
        old, self.ssl = self.ssl, ssl
        if old is not None and ssl is not None and old is not ssl:
            if not self._carry_tickets(ssl, tls.export_ticket_keys(old, self._ticket_age()),
                                       "the context before") and self.loop is not None:
                self._tickets_born = self.loop.time()  # (its own keys, new)
            if self._ticket_timer is not None:  # (started, not closed)
                self._schedule_ticket_renewal()

    def _tls_setup(self, piped: bool) -> TLSSetup | LoopTLSSetup | None:
        """A new link's TLS handshake, with the context of now (None: no TLS)."""
        if self.ssl is None:
            return None
        timeout = self.config.handshake_timeout
        if piped:
            return TLSSetup(self.ssl, server_side=True, server_hostname=None, timeout=timeout,
                            loop=self.loop)
        return LoopTLSSetup(self.ssl, timeout=timeout, loop=self.loop)

    async def serve_forever(self) -> None:
        """Return once ``close()`` has been called (the listeners serve from ``start()`` on)."""
        if self._stopped is None:
            raise RuntimeError("RelayServer.start() first")
        await self._stopped.wait()

    async def close(self, timeout: float = SHUTDOWN_WAIT) -> None:
        """Stop listening and end every session (CLOSE to its client, the backend connection
        reset). Waits at most ``timeout`` seconds in all for the clients to take the CLOSEs
        (each closes its link once it has read it), then closes whatever link is left: when
        this returns, nothing of the server is open, and the event loop may end."""
        loop = self.loop
        end = (loop.time() if loop is not None else 0.0) + timeout
        if self._stopped is not None:
            self._stopped.set()
        self._cancel_ticket_renewal()
        servers = self._servers
        for s in servers:
            s.close()
        self._close_control()
        for r in list(self.sessions_by_id.values()):
            r.engine.close(CLOSE_SHUTDOWN, "server shutting down", self.loop.time())
            r.pump()
        for p in list(self._handshaking):
            p.link.close(abort=True)
        for t in list(self._tasks):
            t.cancel()
        if self._closing_links:
            gone = self._links_gone
            if gone is None or gone.done():  # (or a close() that runs already waits on it)
                gone = self._links_gone = loop.create_future()
            await asyncio.wait({gone}, timeout=max(0.0, end - loop.time()))
        for link in list(self._closing_links):  # (a client that went silent: reset)
            self._closing_links.discard(link)
            if link.transport is not None:
                link.transport.abort()
        for s in servers:
            # (from Python 3.12 on, until every connection the listener accepted is gone:
            # bounded too, for one still flushing to a peer that went silent)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), max(0.1, end - loop.time()))
        if self._servers is servers:
            self._servers, self._server_mapping = [], []  # (closed: start() may listen again)
        await asyncio.sleep(0)

    def _close_control(self) -> None:
        """Close the control socket (if one listens) and remove its file."""
        if self._control is not None:
            self._control.close()
            self._control = None
            with contextlib.suppress(OSError):
                os.unlink(self.control_path or "")

    async def _close_listeners(self) -> None:
        """Close the listeners and the control socket that a failed start() opened."""
        servers, self._servers = self._servers, []
        self._server_mapping = []
        for s in servers:
            s.close()
        self._close_control()
        for s in servers:
            with contextlib.suppress(Exception):
                await s.wait_closed()

    # -- hand-over: another process goes on with the sessions -----------------------------
    async def hand_over(self, drain: float = HANDOVER_DRAIN) -> tuple[bytes, list[int]]:
        """Stop, and give the sessions to the server that ``start(handover=...)`` next (an
        upgraded icafast, in the process ``exec`` makes of this one, or in another one the
        descriptors are sent to): returns the sessions' state and the descriptors it refers
        to (the listening sockets and each session's backend connection), which the caller
        then owns.

        The listeners stop accepting (connections wait in their backlog for the next
        server), connections in their handshake are closed, and the links are no longer
        read. Up to ``drain`` seconds go to letting each backend take what was received for
        it; what it has not taken then is left out (its client has not had it acknowledged,
        and sends it again). Then every session's link is reset, and its client resumes at
        the next server; the backend connections go on there, unaware. Unlike ``close()``,
        nothing is said to a peer. Like it, this server may ``start()`` again afterwards."""
        if self._stopped is None or not self._servers:
            raise RuntimeError("RelayServer.hand_over(): not started")
        loop = self.loop
        # (EMFILE stops the hand-over here, before anything has changed: the server serves on)
        fds, listeners, backends = duplicate_sockets(
            [(sock, [m.listen_host, m.listen_port])
             for srv, m in zip(self._servers, self._server_mapping, strict=True)
             for sock in srv.sockets], self.sessions_by_id.values(), "server")
        for srv in self._servers:
            srv.close()  # (the sockets stay open: the duplicates; their backlogs wait)
        self._servers, self._server_mapping = [], []
        self._close_control()
        for p in list(self._handshaking):
            p.link.close(abort=True)
            p.detach()
        for t in list(self._tasks):  # (NEW sessions still connecting: their clients try again)
            t.cancel()
        for gone in list(self._closing_links):
            self._closing_links.discard(gone)
            gone.close(abort=True)
        await drain_endpoints(loop, list(self.sessions_by_id.values()), drain)
        # From here to the return, no other callback runs: nothing changes under the snapshot.
        packer = ho.Packer()
        sessions = []
        runners = list(self.sessions_by_id.values())
        for r in runners:
            entry = self._session_entry(r, packer, fds, backends.pop(r, -1))
            if entry is not None:
                sessions.append(entry)
        close_fds(backends.values())  # (of sessions that ended meanwhile)
        doc = {"listeners": listeners, "sessions": sessions,
               "counters": dict(self.counters), "ended_bytes": self._ended_bytes,
               "tombstones": [[sid.hex(), t] for sid, t in self._tombstones.items()],
               "links_accepted": self._links_accepted, "started": self.started_at}
        tickets = self.ssl
        if tickets is not None:  # (the clients resume their TLS sessions at the next server)
            doc["tls_tickets"] = tls.export_ticket_keys(tickets, self._ticket_age())
        self._cancel_ticket_renewal()
        data = packer.pack(doc)
        for r in runners:
            r.let_go()
        self.sessions_by_id.clear()
        self._sessions_by_source.clear()
        self._new_tokens.clear()
        if self._stopped is not None:
            self._stopped.set()
        log.info("handed over: %d sessions, %d listening sockets", len(sessions), len(listeners))
        return data, fds

    def _session_entry(self, r: _ServerRunner, packer: ho.Packer, fds: list[int],
                       dup: int) -> dict[str, Any] | None:
        """A session's part of the hand-over (``dup``, its backend socket's duplicate, added to
        ``fds``; -1: none), or None for one that ends with this server (closed already)."""
        entry = session_entry(r, packer, fds, dup)
        if entry is None:
            return None
        m = r.mapping
        entry["backend"] = entry.pop("endpoint")
        return {**entry, "listen": [m.listen_host, m.listen_port],
                "backend_address": [m.backend_host, m.backend_port],
                "token": r.new_token.hex()}

    def _handed_listeners(self, m: Mapping) -> list[socket.socket]:
        """The listening sockets handed over for ``m``'s address (taken: see start)."""
        if self._taking is None:
            return []
        doc, _, fds = self._taking
        return handed_listeners(doc, fds, [m.listen_host, m.listen_port])

    def _mapping_for(self, listen: list[Any], backend: list[Any]) -> Mapping:
        for m in self.mappings:
            if [m.backend_host, m.backend_port] == backend and \
                    [m.listen_host, m.listen_port] == listen:
                return m
        for m in self.mappings:
            if [m.backend_host, m.backend_port] == backend:
                return m
        # (no longer configured: the session goes on to the backend it has)
        return Mapping(listen[0], int(listen[1]), backend[0], int(backend[1]))

    async def _take_sessions(self) -> None:
        """The sessions of the hand-over being taken (start), each DISCONNECTED until its
        client resumes it."""
        assert self._taking is not None
        doc, blob, fds = self._taking
        now = self.loop.time()
        self.counters.update(doc.get("counters", {}))
        ended = doc.get("ended_bytes", [0, 0])
        self._ended_bytes = [self._ended_bytes[0] + ended[0], self._ended_bytes[1] + ended[1]]
        self._links_accepted = max(self._links_accepted, doc.get("links_accepted", 0))
        # (the counters go on from the first server's start: metrics()' "started" says so)
        self.started_at = min(self.started_at, doc.get("started", self.started_at))
        for sid, until in sorted(doc.get("tombstones", []), key=lambda e: e[1]):
            if until > now:
                self._tombstones[bytes.fromhex(sid)] = until
                self._tombstone_order.append((until, bytes.fromhex(sid)))
        taken = 0
        for entry in doc["sessions"]:
            eng = ServerSession.from_state(self.config, entry["state"],
                                           ho.area(blob, entry["unacked"]), now)
            runner = _ServerRunner(self, eng, self._mapping_for(entry["listen"],
                                                                entry["backend_address"]))
            runner.opened = True
            self._count_source(runner, source_block(eng.client_address))
            if not await take_endpoint(runner, entry["backend"], entry, blob, fds, "backend"):
                self._count_ended(runner, CLOSE_ABORTED)
                continue
            token = bytes.fromhex(entry.get("token", ""))
            if token:
                runner.new_token = token
                self._new_tokens[token] = runner
            self.sessions_by_id[eng.session_id] = runner
            runner.pump()  # (its timer: the reliability timeout, and a FIN to send)
            taken += 1
        self.counters["handovers_taken"] += 1
        log.info("took over %d sessions from the server before", taken)
        if self.ssl is not None and "tls_tickets" in doc:
            self._carry_tickets(self.ssl, doc["tls_tickets"], "the server before")

    def _carry_tickets(self, ctx: ssl.SSLContext, keys: Any, before: str) -> bool:
        """``ctx`` opens the TLS session tickets of ``before`` (``keys``: exported from it)
        where it lets in the same clients, and the keys are not due for renewal (their age
        under ``ticket_key_lifetime``); said either way. Returns whether it does."""
        if not isinstance(keys, dict):  # (none could be read there: no compiled module)
            return False
        age = keys.get("age")
        if not isinstance(age, (int, float)) or isinstance(age, bool) or not 0 <= age < 1e12:
            age = None
        lifetime = self.ticket_key_lifetime
        if lifetime is not None and (age is None or age >= lifetime):
            why = "its ticket keys were due for renewal"
        elif tls.import_ticket_keys(ctx, keys):
            log.info("TLS: the TLS sessions of %s still resume", before)
            if self.loop is not None:
                self._tickets_born = self.loop.time() - (age or 0.0)
            return True
        else:
            scope = tls.ticket_scope(ctx)
            why = ("its ticket keys cannot be set" if keys.get("scope") == scope else
                   "client certificates are checked otherwise now" if scope is not None else
                   "how it checks client certificates cannot be compared")
        log.info("TLS: clients make a full handshake once, not resuming the TLS sessions of "
                 "%s (%s)", before, why)
        return False

    def _ticket_age(self) -> float:
        """How long the keys that seal this server's TLS session tickets have done so (0
        before the start: their time begins there)."""
        if self._tickets_born is None or self.loop is None:
            return 0.0
        return max(0.0, self.loop.time() - self._tickets_born)

    def _schedule_ticket_renewal(self) -> None:
        """Renew the ticket keys once they have sealed tickets for ``ticket_key_lifetime``
        (where the keys can be reached: the compiled module; elsewhere they live as long as
        the context, as OpenSSL has them)."""
        self._cancel_ticket_renewal()
        sealing = self.ssl
        if (self.ticket_key_lifetime is None or sealing is None or self._tickets_born is None
                or ticket_keys(sealing) is None):
            return
        self._ticket_timer = self.loop.call_at(self._tickets_born + self.ticket_key_lifetime,
                                               self._renew_tickets)

    def _cancel_ticket_renewal(self) -> None:
        if self._ticket_timer is not None:
            self._ticket_timer.cancel()
            self._ticket_timer = None

    def _renew_tickets(self) -> None:
        self._ticket_timer = None
        sealing = self.ssl
        if sealing is None or self._stopped is None or self._stopped.is_set():
            return
        if not tls.renew_ticket_keys(sealing):
            log.error("TLS: the session ticket keys could not be renewed; the keys of before "
                      "go on sealing tickets")
            return
        self._tickets_born = self.loop.time()
        self.counters["tls_ticket_key_renewals"] += 1
        every = self.ticket_key_lifetime or 0.0
        log.info("TLS: new session ticket keys (renewed every %s): a client that comes back "
                 "with a ticket from before makes one full handshake",
                 f"{every / 3600:g} h" if every >= 3600 else f"{every:g} s")
        self._schedule_ticket_renewal()

    def _lingering_link(self, link: Link) -> None:
        self._closing_links.add(link)
        link.on_lost = functools.partial(self._link_gone, link)

    def _link_gone(self, link: Link) -> None:
        self._closing_links.discard(link)
        gone = self._links_gone
        if not self._closing_links and gone is not None and not gone.done():
            gone.set_result(None)

    # -- sessions ----------------------------------------------------------------------------
    def _start_session(self, pending: _PendingLink) -> None:
        m = pending.mapping
        token = pending.hs.new_token
        if token:
            known = self._new_tokens.get(token)
            # (on any listener for the same backend: a dual-stack server has a listener per
            # address family, and a client's next try may reach the other one)
            if (known is not None and known.mapping.backend_host == m.backend_host
                    and known.mapping.backend_port == m.backend_port
                    and self._repeated_new(known, pending)):
                return
        # (sessions still connecting to their backend count: a burst of NEW must not overshoot)
        if (len(self.sessions_by_id) + len(self._creating) >= self.max_sessions
                and not self._make_session_room(pending.source)):
            pending.reject(REJECT_BUSY, f"server is at its limit of {self.max_sessions} sessions")
            return
        if pending.hs.rtt is None and pending.proxy is None:
            # NEW came with the HELLO: the TCP handshake's round trip sizes the send window
            # instead. (Not behind a PROXY-protocol load balancer: the TCP peer is the balancer,
            # and a round trip to it would size the window for a shorter path than the
            # client's; the window then stays the replay limit.)
            pending.hs.rtt = tcp_rtt(pending.link.transport)
        runner = _ServerRunner(self, ServerSession(self.config, self.loop.time()), m)
        runner.pending = pending
        self._count_source(runner, pending.source)
        if token:
            runner.new_token = token
            self._new_tokens[token] = runner
        self._creating.add(runner)
        t = self.loop.create_task(self._new_session(runner))
        self._tasks.add(t)
        t.add_done_callback(functools.partial(self._created, runner))

    def _created(self, runner: _ServerRunner, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._creating.discard(runner)  # (also when cancelled before it ran)
        runner.pending = None
        if self.sessions_by_id.get(runner.engine.session_id) is not runner:
            self._drop_token(runner)  # never made
            self._uncount_source(runner)

    def _repeated_new(self, runner: _ServerRunner, pending: _PendingLink) -> bool:
        """A NEW with the token of ``runner``'s: if the client cannot have had its ACCEPT,
        ``pending`` gets that session (True), instead of a second one and backend connection."""
        if runner in self._creating:
            # still connecting to its backend: the ACCEPT will go on this link, the one the
            # client now waits on (it gave the earlier one up)
            old, runner.pending = runner.pending, pending
            if old is not None and old is not pending:
                old.link.close(abort=True)
                old.detach()
            log.info("session %s: NEW repeated from %s while it connects to its backend",
                     runner.sid, pending.link.peer)
            return True
        if runner.engine.state is State.CLOSED or runner.engine.new_token != pending.hs.new_token:
            return False  # ended, or the client has had the ACCEPT: a NEW is a new session
        runner.attach(pending)
        return True

    def _drop_token(self, runner: _ServerRunner) -> None:
        if runner.new_token and self._new_tokens.get(runner.new_token) is runner:
            del self._new_tokens[runner.new_token]

    async def _new_session(self, runner: _ServerRunner) -> None:
        try:
            await self._create_session(runner)
        finally:
            # (at once, in the turn that registers the session: a done callback would
            # run a turn later, and the session would count twice until then)
            self._creating.discard(runner)

    async def _create_session(self, runner: _ServerRunner) -> None:
        """Connect ``runner``'s backend, then attach the link its ACCEPT is for: its
        ``pending``, which a repeated NEW may replace meanwhile."""
        m = runner.mapping
        error: BaseException | None = None
        try:
            # (connected as the deadline comes: the session goes on)
            await Deadline(self.loop, self.backend_connect_timeout,
                           lambda: runner.endpoint is None, "connection").run(
                self.loop.create_connection(lambda: Endpoint(runner), m.backend_host,
                                            m.backend_port))
        except (OSError, asyncio.TimeoutError) as e:
            error = e
        pending = runner.pending
        assert pending is not None
        if error is not None:
            # (a warning: the operator has something to fix, not the client)
            pending.reject(REJECT_BACKEND, f"backend {m.backend} unavailable: "
                                           f"{error or type(error).__name__}", logging.WARNING)
            return
        if pending.link.closed:
            if runner.endpoint is not None and runner.endpoint.transport is not None:
                runner.endpoint.transport.close()
            pending.detach()
            return
        self.sessions_by_id[runner.engine.session_id] = runner
        if not runner.attach(pending):
            self.sessions_by_id.pop(runner.engine.session_id, None)
            if runner.endpoint is not None and runner.endpoint.transport is not None:
                runner.endpoint.transport.close()

    def _forget_slot(self, pending: _PendingLink) -> None:
        _drop_from(self._by_source, pending.source, pending)

    def _make_room(self, source: str) -> bool:
        """Every handshake slot is taken, and a connection from ``source`` comes: when another
        source holds more slots than this one would with it, that source's oldest handshake is
        closed to make room (whether the table was filled by one flood or by a crowd behind
        one address, other sources still get in; a lone crowd still has every slot). Whether
        it made room."""
        if len(self._by_source) >= len(self._handshaking):
            return False  # (one each: nobody holds more, and no scan under a spread flood)
        mine = len(self._by_source.get(source, ()))
        top, held = max(self._by_source.items(), key=lambda kv: len(kv[1]))
        if len(held) <= mine + 1:
            return False
        oldest = next(iter(held))
        now = self.loop.time()
        if now - self._evict_logged > 10.0:
            self._evict_logged = now
            log.warning("every handshake slot is taken (%d), %d of them by %s: closing its "
                        "oldest handshakes to make room for others (a connection from %s)",
                        self.max_handshakes, len(held), top, source)
        self.counters["turned_away_evicted"] += 1
        oldest.detach()
        oldest.link.close(abort=True)
        return True

    def _failed_recently(self, source: str, now: float) -> int:
        times = self._failures.get(source)
        if not times:
            return 0
        while times and times[0] <= now - 60.0:
            times.pop(0)
        if not times:
            del self._failures[source]
        return len(times)

    def _record_failure(self, source: str, now: float) -> None:
        failures = self._failures
        times = failures.get(source)
        if times is None:
            times = failures[source] = []
        else:
            failures.move_to_end(source)
        times.append(now)
        # Sources whose latest failure is a minute old are forgotten, and at most
        # MAX_FAILURE_SOURCES are kept (the quietest go first): both from the front, a few per
        # failure. (This scanned the whole table for each new source once it held 100,000:
        # 3.6 ms per failed resume, for one who fails from many addresses, as IPv6 allows.)
        while failures:
            oldest = next(iter(failures.values()))
            if oldest[-1] > now - 60.0 and len(failures) <= MAX_FAILURE_SOURCES:
                break
            failures.popitem(last=False)

    def _note_overload(self, peer: str) -> None:
        now = self.loop.time()
        if now - getattr(self, "_overload_logged", 0.0) > 10.0:
            self._overload_logged = now
            log.warning("more than %d connections in the handshake: closing new ones (latest "
                        "from %s)", self.max_handshakes, peer)

    def _resume(self, pending: _PendingLink, e: ev.ResumeRequested) -> None:
        runner = self.sessions_by_id.get(e.session_id)
        sid = short_id(e.session_id)
        now = self.loop.time()
        source = pending.source
        live = runner if runner is not None and runner.engine.state is not State.CLOSED else None
        # The cap on failed resumes per source only refuses what would fail anyway: a proven
        # RESUME, and one for a session that has ended (REJECT 4 ends the client's attempts),
        # are answered as always, so a guesser (or a crowd of clients whose sessions a
        # restarted server no longer knows) cannot lock out the sessions of others at the
        # same address, behind the same NAT.
        if live is not None and live.engine.check_proof(pending.hs, e.proof):
            if pending.order < live.link_order:
                # A RESUME from a connection older than the one the session was resumed on
                # last: the client gave that link up (its RESUME was delayed on the way) and
                # has resumed since. Proven with the secret from before that resume, it would
                # take the session over from the client's current link and rotate the secret
                # from the old one, and the client's next RESUME would be refused as a wrong
                # proof: the link is closed as lost, leaving the session as it is.
                log.info("session %s: RESUME from %s on a connection older than its current "
                         "one: the client has resumed since; closed", sid, pending.link.peer)
                pending.link.close(abort=True)
                pending.detach()
                return
            if live.link is not None:
                log.info("session %s: takeover by %s (old link still looked alive)", sid,
                         pending.link.peer)
            live.attach(pending)
            return
        if live is None and self._tombstones.get(e.session_id, 0.0) > now:
            pending.reject(REJECT_CLOSED, f"session {sid} is closed")
            return
        if self._failed_recently(source, now) >= self.max_failed_resumes:
            pending.reject(REJECT_RATE_LIMITED, f"too many failed resumes from {source}; "
                           "try again later")
            return
        self._record_failure(source, now)
        if live is None:
            # (what the client's log and its application's end will say: the session is
            # gone for good, and most often because the server process was restarted)
            pending.reject(REJECT_UNKNOWN_SESSION, f"unknown session {sid} (this server does "
                           "not know it: restarted since, or the session ended over a minute "
                           "ago)")
            return
        log.warning("session %s: RESUME with a wrong proof from %s", sid, pending.link.peer)
        pending.reject(REJECT_BAD_PROOF, f"wrong proof for session {sid}")

    def _count_source(self, runner: _ServerRunner, source: str) -> None:
        runner.source = source
        self._sessions_by_source.setdefault(source, {})[runner] = None

    def _uncount_source(self, runner: _ServerRunner) -> None:
        _drop_from(self._sessions_by_source, runner.source, runner)

    def _make_session_room(self, source: str) -> bool:
        """The server is at its limit of sessions, and ``source`` asks for a new one: when
        another source holds more sessions than this one would with it, that source's oldest
        DISCONNECTED session is ended to make room (sessions opened and dropped without a
        CLOSE, each held for the reliability timeout, cannot keep everyone else out). A live
        session is never ended for it, nor one of a source that holds no more than the one
        asking. Whether it made room."""
        by_source = self._sessions_by_source
        if len(by_source) >= len(self.sessions_by_id) + len(self._creating):
            return False  # (one each: nobody holds more, and no scan under a spread flood)
        mine = len(by_source.get(source, ()))
        top, held = max(by_source.items(), key=lambda kv: len(kv[1]))
        if len(held) <= mine + 1:
            return False
        victim = next((r for r in held if r.engine.state is State.DISCONNECTED), None)
        if victim is None:
            return False
        now = self.loop.time()
        if now - self._evict_sessions_logged > 10.0:
            self._evict_sessions_logged = now
            log.warning("the server is at its limit of %d sessions, %d of them from %s: ending "
                        "its oldest disconnected ones to make room for others (a new session "
                        "from %s)", self.max_sessions, len(held), top, source)
        self.counters["sessions_evicted"] += 1
        victim.engine.close(CLOSE_ABORTED, f"ended to make room for another client: the "
                            f"server is at its limit of {self.max_sessions} sessions and "
                            f"{top} holds {len(held)}", now)
        victim.pump()
        return True

    def _forget(self, runner: _ServerRunner) -> None:
        self._drop_token(runner)
        self._uncount_source(runner)
        sid = runner.engine.session_id
        if self.sessions_by_id.get(sid) is runner:
            del self.sessions_by_id[sid]
        now = self.loop.time()
        until = now + max(60.0, self.config.dead_timeout * 2)
        self._tombstones[sid] = until
        order = self._tombstone_order
        order.append((until, sid))
        # (a few expired ones per ended session; this used to filter the whole dict every 256
        # sessions, and on every session once more than 4 * max_sessions had ended within the
        # minute: tens of thousands of entries per new session at 1,000 sessions a second)
        while order[0][0] <= now:
            t, old = order.popleft()
            if self._tombstones.get(old) == t:
                del self._tombstones[old]

    def find(self, sid_prefix: str) -> _ServerRunner:
        """The session whose hex id is or starts with ``sid_prefix`` (unique)."""
        sid_prefix = sid_prefix.lower()
        if not sid_prefix:
            raise KeyError("no session id given")
        found = [r for s, r in self.sessions_by_id.items() if s.hex().startswith(sid_prefix)]
        if len(found) != 1:
            raise KeyError(f"{'no' if not found else 'more than one'} session matches "
                           f"{sid_prefix!r}")
        return found[0]

    def sessions(self) -> list[dict[str, Any]]:
        if self.loop is None:
            return []  # not started
        now = self.loop.time()
        rows = []
        for r in self.sessions_by_id.values():
            d = r.engine.stats(now)
            if d.get("rtt_ms") is None and r.link is not None:
                # Keepalives time the link only while it is idle; one busy since it came up
                # shows the kernel's smoothed round trip of its TCP connection (listing only)
                rtt = tcp_rtt(r.link.transport)
                if rtt is not None:
                    d["rtt_ms"] = round(rtt * 1000, 3)
            d["backend"] = r.mapping.backend
            d["listen"] = self._listen_labels.get(id(r.mapping)) or format_hostport(
                r.mapping.listen_host or "*", r.mapping.listen_port)
            rows.append(d)
        return rows

    def _count_ended(self, runner: _ServerRunner, code: int) -> None:
        self.counters["ended_" + CLOSE_NAMES.get(code, str(code))] += 1
        self._ended_bytes[0] += runner.engine.bytes_received
        self._ended_bytes[1] += runner.engine.bytes_sent

    def metrics(self) -> dict[str, Any]:
        """What the server holds now and what it has done since its start, for monitoring
        (``icafast sessions --metrics`` prints it for Prometheus): sessions by state,
        connections in the handshake, and the counters: sessions opened, resumed and ended (by
        CLOSE reason), REJECTs (by reason), failed handshakes, connections turned away, and
        the stream bytes carried each way (ended sessions' and live ones'; to the clients:
        what they have acknowledged)."""
        states = dict.fromkeys((State.ACTIVE.value, State.DISCONNECTED.value), 0)
        held = unacked = from_clients = to_clients = 0
        for r in self.sessions_by_id.values():
            eng = r.engine
            states[eng.state.value] = states.get(eng.state.value, 0) + 1
            held += bool(eng.held)
            unacked += eng.unacked
            from_clients += eng.bytes_received
            to_clients += eng.bytes_sent
        return {
            "started": self.started_at,
            "sessions": states,
            "held": held,
            "handshakes": len(self._handshaking),
            "unacked_bytes": unacked,
            "bytes_from_clients": self._ended_bytes[0] + from_clients,
            "bytes_to_clients": self._ended_bytes[1] + to_clients,
            "counters": dict(sorted(self.counters.items())),
        }

    def reset_session(self, sid_prefix: str) -> str:
        r = self.find(sid_prefix)
        r.engine.close(CLOSE_ADMIN, "reset by operator", self.loop.time())
        r.pump()
        return r.sid

    def disconnect_session(self, sid_prefix: str) -> str:
        r = self.find(sid_prefix)
        if r.link is not None:
            link = r.link
            r.link = None
            link.close(abort=True)
            r.engine.connection_lost(self.loop.time(), "disconnected by operator", link.link_id)
            r.pump()
        return r.sid

    # -- control socket ----------------------------------------------------------------------
    async def _start_control(self, path: str) -> None:
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, mode=0o700, exist_ok=True)
        _check_control_dir(d)
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode):
                if _socket_answers(path):
                    raise OSError(errno.EADDRINUSE, f"control socket {path} is in use by "
                                  "another running server (give each server its own --control)")
                os.unlink(path)  # left behind by a server that is gone
            else:
                raise OSError(errno.EEXIST, f"control socket {path}: something that is not a "
                              "socket is there (remove it, or give another --control)")
        old = os.umask(0o177)
        try:
            self._control = await asyncio.start_unix_server(self._control_client, path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    async def _control_client(self, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), 10)
            except ValueError:  # (over the reader's 64 KiB limit)
                reply: dict[str, Any] = {"ok": False, "error": "request longer than 64 KiB"}
            else:
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("a request is a JSON object, such as "
                                         '{"cmd": "list"}')
                    reply = self.control(req)
                except KeyError as e:  # (str() of a KeyError quotes its message)
                    reply = {"ok": False, "error": str(e.args[0]) if e.args else "missing key"}
                except (ValueError, TypeError) as e:
                    reply = {"ok": False, "error": str(e)}
                except RecursionError:  # (JSON nested deeper than the parser goes)
                    reply = {"ok": False, "error": "request nested too deeply"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    def control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "list":
            return {"ok": True, "sessions": self.sessions(), "pid": os.getpid(),
                    "listen": [format_hostport(h, p) for h, p in self.addresses]}
        if cmd == "metrics":
            return {"ok": True, "metrics": self.metrics(), "pid": os.getpid()}
        if cmd == "reset":
            return {"ok": True, "reset": self.reset_session(str(req["id"]))}
        if cmd == "disconnect":
            had_link = self.find(str(req["id"])).link is not None
            return {"ok": True, "disconnected": self.disconnect_session(str(req["id"])),
                    "had_link": had_link}
        return {"ok": False, "error": f"unknown command {cmd!r}"}


def _drop_from(table: dict[str, dict[Any, None]], source: str, item: Any) -> None:
    """Take ``item`` out of ``table[source]`` (a per-source table), and the source with it
    once it holds nothing."""
    mine = table.get(source)
    if mine is not None:
        mine.pop(item, None)
        if not mine:
            del table[source]


# -- hand-over: what a server and a client share ------------------------------------------------
def duplicate_sockets(listening: list[tuple[socket.socket, list[Any]]], runners: Any,
                      what: str) -> tuple[list[int], list[dict[str, Any]], dict[Runner, int]]:
    """Duplicates, for a hand-over, of the listening sockets (each with the address it was
    asked for) and of each session's endpoint socket: the descriptors, the listeners' part of
    the document, and each runner's endpoint duplicate. Taken before anything changes: a lack
    of descriptors (EMFILE) raises here, and the ``what`` (server, client) serves on."""
    fds: list[int] = []
    listeners = []
    dups: dict[Runner, int] = {}
    try:
        for sock, listen in listening:
            fds.append(os.dup(sock.fileno()))
            listeners.append({"listen": listen, "fd": len(fds) - 1})
        for r in runners:
            ep = r.endpoint
            if ep is None or ep.transport is None or ep.closed:
                continue
            esock = ep.transport.get_extra_info("socket")
            if esock is not None and esock.fileno() >= 0:
                dups[r] = os.dup(esock.fileno())
    except OSError as e:
        close_fds([*fds, *dups.values()])
        raise OSError(e.errno, f"hand-over: {e.strerror}; nothing was handed over, and "
                               f"the {what} serves on") from e
    return fds, listeners, dups


async def drain_endpoints(loop: asyncio.AbstractEventLoop, runners: Sequence[Runner],
                          drain: float) -> None:
    """Stop reading the sessions' links, and give their endpoints up to ``drain`` seconds to
    take what waits for them (see ``session_entry``)."""
    for r in runners:
        link = r.link
        if link is not None and link.transport is not None and not link.closed:
            link.transport.pause_reading()
    end = loop.time() + drain
    while loop.time() < end and any(unsent_to_endpoint(r) for r in runners):
        await asyncio.sleep(0.005)


def handed_listeners(doc: dict[str, Any], fds: list[int], listen: list[Any]) -> list[socket.socket]:
    """The listening sockets a hand-over holds for address ``listen`` (taken: their
    descriptors in ``fds`` set to -1)."""
    socks = []
    for entry in doc.get("listeners", []):
        i = entry["fd"]
        if entry["listen"] == listen and fds[i] >= 0:
            socks.append(socket.socket(fileno=fds[i]))
            fds[i] = -1
    return socks


def unsent_to_endpoint(r: Runner) -> bool:
    """Whether bytes of a session's stream still wait in its endpoint's transport (a hand-over
    lets them go out first, for a while)."""
    ep = r.endpoint
    return (ep is not None and ep.transport is not None and not ep.closed
            and r.engine.state is not State.CLOSED
            and ep.transport.get_write_buffer_size() > 0)


def session_entry(r: Runner, packer: ho.Packer, fds: list[int],
                  dup: int) -> dict[str, Any] | None:
    """What a hand-over says of a session, either side's (``dup``: a duplicate of its
    endpoint's socket, added to ``fds``; -1: none), or None for one that ends here (closed
    already). What its endpoint's transport still holds is left out: the endpoint has not
    taken it, so the peer, which has not had it acknowledged, sends it again."""
    eng = r.engine
    if eng.state is State.CLOSED:
        close_fds([dup] if dup >= 0 else [])
        return None
    state = eng._state()
    ep = r.endpoint
    endpoint = None
    pending: list[list[int]] = []
    eof = False
    if ep is not None and ep.transport is not None and not ep.closed:
        if dup < 0:
            return None
        unsent = ep.transport.get_write_buffer_size()
        if unsent:
            state["rx"] = eng._rx - unsent - (1 if eng._rx_fin else 0)
            state["rx_fin"] = False
        fds.append(dup)
        endpoint = len(fds) - 1
        pending = [packer.add([b]) for b in ep.pending]
        eof = ep.eof
    elif dup >= 0:  # (its endpoint's connection ended meanwhile)
        close_fds([dup])
    return {"state": state, "endpoint": endpoint, "pending": pending, "eof": eof,
            "unacked": packer.add(eng.tx.views())}


async def take_endpoint(runner: Runner, i: int | None, entry: dict[str, Any], blob: memoryview,
                        fds: list[int], what: str) -> bool:
    """Give ``runner`` the endpoint connection handed over as descriptor ``fds[i]`` (taken:
    set to -1), with what the session had read from it and not queued yet. False when the
    event loop cannot take it (the session ends; logged). With ``i`` None, nothing to take."""
    if i is None:
        return True
    fd, fds[i] = fds[i], -1
    try:
        await runner.loop.connect_accepted_socket(functools.partial(Endpoint, runner),
                                                  sock=socket.socket(fileno=fd))
    except OSError as e:
        log.warning("session %s: its %s connection could not be taken over (%s): session "
                    "ended", runner.sid, what, e)
        return False
    ep = runner.endpoint
    assert ep is not None
    ep.pending = [bytes(ho.area(blob, p)) for p in entry["pending"]]
    ep.eof = bool(entry["eof"])
    if ep.pending:
        ep.pause()  # (read again once they are in the replay buffer)
    return True


def close_fds(fds: Any) -> None:
    """Close descriptors, those already closed aside."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _check_control_dir(d: str) -> None:
    """Refuse a control socket directory that another user could change: they could put
    their own socket in place of the server's (and answer ``icafast sessions`` with what they
    like), or block it (:func:`icafast.paths.check_private_dir`)."""
    check_private_dir(d, "control socket directory", "the socket", "--control")


def _socket_answers(path: str) -> bool:
    """Whether a server accepts connections on the Unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def control_request(path: str, req: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to a server's control socket (blocking; used by ``icafast sessions``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)

