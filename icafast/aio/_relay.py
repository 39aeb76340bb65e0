"""Shared asyncio plumbing: the plain-TCP endpoint, the framed link and the session runner.

These classes only move bytes and timers between sockets and a sans-IO session engine
(:mod:`icafast.protocol`); every protocol decision is the engine's.

Data path (one copy each way): the endpoint (application or backend socket) receives straight
into the session's replay buffer (``BufferedProtocol.get_buffer`` returns a view of free ring
space); the engine frames views of that ring and the link transport writes header + payload
with ``writelines`` (on TLS links, one joined write: see ``_LinkBase``). Received frames are
parsed in the bytes object the event loop hands to the link, and their payloads written to the
endpoint as memoryviews of it; when the endpoint's transport already holds unsent data, the
payload is copied instead, so a queued view does not keep a whole received block alive.

The usual message takes a shortcut each way, with the same outcome as the general path (the
engine's ``_receive_one`` and ``_frame_one``): a link read that is one whole in-order DATA
frame goes from the decoder to the endpoint without an event, and an endpoint read that fits
one small frame is framed and written without the engine's output list.
"""

from __future__ import annotations

import _socket
import asyncio
import logging
import socket
import ssl
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, cast

from .. import events as ev
from ..protocol import CLOSE_ABORTED, SessionEngine, State
from ..wire import HEADER_SIZE

log = logging.getLogger("icafast")
_Event = ev.Event

READ_SIZE = 256 * 1024  # bytes per receive when data is flowing
MIN_READ_SIZE = 16 * 1024  # ... and when it is not (idle sessions stay small)
SPARE_SIZE = 64 * 1024
WRITE_HIGH_WATER = 1024 * 1024  # transport write buffer limits (bytes)
WRITE_LOW_WATER = 256 * 1024
ENDPOINT_HIGH_WATER = 64 * 1024  # the application/backend side
ENDPOINT_LOW_WATER = 16 * 1024
#: TCP_NOTSENT_LOWAT on links: the kernel takes a link write only while less than this much of
#: what it already holds is unsent. What the path can carry (TCP's congestion window) still goes
#: out at once; the rest waits in the replay buffer instead of piling up unsent in the socket
#: (up to its 4 MiB send buffer), so less is unacknowledged and an interactive write is not
#: queued behind megabytes (benchmarks/HISTORY.md, "little left unsent in link sockets").
LINK_NOTSENT_LOWAT = 256 * 1024
#: A link whose transport holds more than this unsent while it is paused for writing has a
#: peer that reads nothing yet keeps sending (PINGs, say, each answered with a PONG): it is
#: closed as lost. What a live peer can leave there is the high water mark plus one burst of
#: stream bytes (protocol.MAX_BURST) and a few control frames: about 2 MiB.
LINK_UNSENT_MAX = 4 * WRITE_HIGH_WATER
#: Reading a link pauses while more than the larger of this and the replay limit waits for
#: the sink (application or backend), and resumes when the sink has taken it: a peer that
#: keeps its sends within the acks (its replay limit) never gets there, one that ignores them
#: cannot make the relay buffer without bound (PROTOCOL.md 4.7).
SINK_BACKLOG_MIN = 1024 * 1024
#: A link whose read brings at least BULK_READ bytes is streaming: it then reads straight into a
#: buffer shared by the thread's links (a BufferedProtocol, _BulkReader) instead of getting each
#: read as a new bytes object that the event loop copies out of its own buffer. After
#: BULK_SMALL_READS reads in a row of less than MIN_READ_SIZE it goes back to plain reads: a
#: request/response link and an idle one (whose keepalives are small reads) keep the plain path,
#: which costs fewer calls per read (benchmarks/HISTORY.md,
#: "links read bulk straight into a shared buffer").
BULK_READ = 64 * 1024
BULK_SMALL_READS = 4
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 0)  # (Linux, macOS)
_CSocket = _socket.socket  # (see _fd_socket)
_AF_INET, _SOCK_STREAM = int(socket.AF_INET), int(socket.SOCK_STREAM)
_IPPROTO_TCP = int(socket.IPPROTO_TCP)
_NODELAY = (_IPPROTO_TCP, int(socket.TCP_NODELAY), 1)


#: Session deadlines further away than COALESCE_AFTER are rounded up to the next multiple of
#: TIMER_TICK (whole milliseconds, the event loops' timer resolution) and share one loop timer
#: per tick: a server's thousands of idle keepalive deadlines then cost one loop timer per
#: tick instead of one per session and fire in bursts (benchmarks/README.md, scale). Nearer
#: deadlines (an immediate reconnect, a zero delay) keep an exact timer of their own.
TIMER_TICK = 0.016
COALESCE_AFTER = 0.1
# (the same values for the per-message path: C constants when compiled, see _relay.pxd)
_READ_SIZE, _MIN_READ_SIZE = READ_SIZE, MIN_READ_SIZE
_BULK_READ, _BULK_SMALL_READS = BULK_READ, BULK_SMALL_READS
_TIMER_TICK, _COALESCE_AFTER = TIMER_TICK, COALESCE_AFTER
_NEVER = float("inf")  # no deadline


class _TickSlot:
    """A runner's place in the shared ticks. The ticks hold the slot, not the runner, and a
    session that ends empties it: a tick that is still to fire (a keepalive or dead-link
    deadline up to ``dead_timeout`` ahead, and any deadline the runner moved away from) then
    keeps nothing of the session alive. Without it every ended session's objects, replay
    buffers and sockets' state stayed in memory for up to 10 s."""

    __slots__ = ("runner",)

    def __init__(self, runner: Runner) -> None:
        self.runner: Runner | None = runner


class _Ticks:
    """The shared timers of one event loop: tick number -> slots of the runners due then."""

    __slots__ = ("loop", "due")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.due: dict[int, list[_TickSlot]] = {}

    def add(self, runner: Runner, tick: int) -> None:
        slots = self.due.get(tick)
        if slots is None:
            slots = self.due[tick] = []
            self.loop.call_at(tick * TIMER_TICK, self._fire, tick)
        slots.append(runner._slot)

    def _fire(self, tick: int) -> None:
        for slot in self.due.pop(tick, ()):
            r = slot.runner
            if r is not None and r._tick == tick:  # still armed for this tick (not cancelled,
                # not moved earlier, the session not ended)
                try:
                    r._timer_fired()
                except Exception:  # one session's failure must not cost the others their timers
                    log.exception("session %s: timer failed", r.sid)


_TICKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Ticks] = \
    weakref.WeakKeyDictionary()


def window_note(eng: SessionEngine) -> str:
    """The send window and the handshake round trip it came from, for a log line."""
    rtt = eng.handshake_rtt
    return "" if rtt is None else (
        f"; send window {eng.send_window // 1024} KiB (handshake {rtt * 1000:.1f} ms)")


def _ticks_of(loop: asyncio.AbstractEventLoop) -> _Ticks:
    t = _TICKS.get(loop)
    if t is None:
        t = _TICKS[loop] = _Ticks(loop)
    return t


def format_hostport(host: str, port: int) -> str:
    """``host:port`` as an address is written, an IPv6 address in brackets (``[::1]:2598``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def short_id(sid: bytes) -> str:
    return sid.hex() if sid else "-"


#: Transports whose event loop sets TCP_NODELAY on every TCP socket itself: uvloop's (libuv
#: sets it when it accepts or connects) and asyncio's own (``base_events._set_nodelay``, since
#: Python 3.6), and the TLS transports over them. Setting it again cost each new session two
#: socket objects and six system calls (benchmarks/HISTORY.md, "what a new session costs").
_LOOP_SETS_NODELAY = frozenset(("uvloop.loop", "asyncio.selector_events",
                                "asyncio.proactor_events", "asyncio.sslproto"))
_sets_nodelay: dict[type, bool] = {}


def _loop_sets_nodelay(transport: asyncio.BaseTransport) -> bool:
    kind = type(transport)
    known = _sets_nodelay.get(kind)
    if known is None:
        known = _sets_nodelay[kind] = kind.__module__ in _LOOP_SETS_NODELAY
    return known


#: asyncio's own TCP transport, where its ``writelines`` is its own (Python 3.12 on): up to
#: CPython 3.12.8 and 3.13.1 that ``writelines`` buffered without ever pausing the protocol
#: (python/cpython gh-127655), so that a link or endpoint written that way got no
#: ``pause_writing``, whatever piled up: no back-pressure, and a sink that never resumes
_SELECTOR_TCP = getattr(getattr(asyncio, "selector_events", None), "_SelectorSocketTransport",
                        None)
_OWN_WRITELINES = _SELECTOR_TCP is not None and "writelines" in vars(_SELECTOR_TCP)


def writelines_of(transport: Any) -> Callable[[Any], None]:
    """``transport.writelines``; on asyncio's TCP transport where its ``writelines`` may not
    pause the protocol (gh-127655), one that checks the high water mark after it, as its
    ``write`` does (``_maybe_pause_protocol``: nothing when below it or already paused).

    That one also drops what is written once the connection is lost, as ``write`` does.
    CPython 3.12.1's ``writelines`` then still registered the socket for writing, and the
    registration outlived the socket: a connection that got its descriptor number next failed
    in the selector (FileNotFoundError from epoll), and its session with it."""
    wl = transport.writelines
    check = getattr(transport, "_maybe_pause_protocol", None)
    if not _OWN_WRITELINES or check is None or not isinstance(transport, cast(type,
                                                                               _SELECTOR_TCP)):
        return cast(Callable[[Any], None], wl)

    def writelines(bufs: Any) -> None:
        if getattr(transport, "_conn_lost", 0):  # (what write() checks first)
            return
        wl(bufs)
        check()

    return writelines


def tune_socket(transport: asyncio.BaseTransport, high: int = WRITE_HIGH_WATER,
                low: int = WRITE_LOW_WATER, notsent_lowat: int = 0) -> None:
    """TCP_NODELAY on every socket (small writes must not wait for Nagle; set here unless the
    event loop sets it on every TCP socket anyway), big limits, and TCP_NOTSENT_LOWAT if
    ``notsent_lowat`` (where the platform has it)."""
    opts = [] if _loop_sets_nodelay(transport) else [_NODELAY]
    if notsent_lowat and _TCP_NOTSENT_LOWAT:
        opts.append((_IPPROTO_TCP, _TCP_NOTSENT_LOWAT, notsent_lowat))
    if opts:
        _set_tcp_options(transport, opts)
    if hasattr(transport, "set_write_buffer_limits"):
        transport.set_write_buffer_limits(high=high, low=low)


def _fd_socket(transport: asyncio.BaseTransport) -> Any | None:
    """A socket object of our own on a transport's descriptor (None if it has none), for
    socket options; ``detach()`` it after use (the transport still owns the descriptor).

    uvloop's stand-in socket makes a new socket object for each option call, each asking the
    kernel three questions first. Ours is the C-level ``_socket.socket`` (``socket.socket``
    runs Python code to initialise), and the socket's family is not asked for (the stand-in
    makes it an enum member; the family given here only decides how addresses would be
    parsed, and none are): a session has two sockets at each end. ``tune_socket`` on a uvloop
    link took 4.1 µs, and takes 2.5 µs (three system calls of it)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    fd = sock.fileno()
    return _CSocket(_AF_INET, _SOCK_STREAM, 0, fd) if fd >= 0 else None


def _set_tcp_options(transport: asyncio.BaseTransport, opts: list[tuple[int, int, Any]]) -> None:
    """setsockopt on a transport's socket; an option the socket does not take (TCP options on
    a Unix socket, as ``open_session`` uses) is skipped."""
    own = _fd_socket(transport)
    if own is None:
        return
    try:
        for level, name, value in opts:
            try:
                own.setsockopt(level, name, value)
            except OSError:
                pass
    finally:
        own.detach()


# (Linux's struct tcp_info: other systems with a TCP_INFO lay it out differently)
_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
# struct tcp_info: tcpi_unacked (segments sent and not acknowledged), tcpi_last_ack_recv
# (milliseconds since the last acknowledgement came in), tcpi_rtt (the smoothed round trip, µs)
_TCPI_UNACKED = slice(24, 28)
_TCPI_LAST_ACK_RECV = slice(56, 60)
_TCPI_RTT = slice(68, 72)


def _tcp_info(transport: asyncio.BaseTransport | None) -> bytes | None:
    """Linux ``TCP_INFO`` of a transport's connection (at least up to ``tcpi_rtt``), or None
    where there is none to read."""
    own = _fd_socket(transport) if _TCP_INFO is not None and transport is not None else None
    if own is None:
        return None
    try:
        info = own.getsockopt(_IPPROTO_TCP, _TCP_INFO, 104)
    except OSError:
        return None
    finally:
        own.detach()
    return info if len(info) >= _TCPI_RTT.stop else None


def tcp_rtt(transport: asyncio.BaseTransport | None) -> float | None:
    """The kernel's smoothed round-trip time of a TCP transport's connection in seconds
    (Linux ``TCP_INFO``; on an accepted connection, measured by the TCP handshake), or None
    where there is none to read."""
    info = _tcp_info(transport)
    if info is None:
        return None
    rtt = int.from_bytes(info[_TCPI_RTT], sys.byteorder)
    return rtt / 1e6 if rtt else None


def tcp_heard(transport: asyncio.BaseTransport | None, now: float) -> float | None:
    """When the peer's TCP was last heard from on a transport's connection (Linux
    ``TCP_INFO``), for a link that is not read: the time of its last acknowledgement while
    segments sent wait for one, and ``now`` while none does (nothing sent is unanswered: what
    waits behind a closed window is not in flight, and TCP probes that window itself). None
    where that cannot be read."""
    info = _tcp_info(transport)
    if info is None:
        return None
    if not int.from_bytes(info[_TCPI_UNACKED], sys.byteorder):
        return now
    return now - int.from_bytes(info[_TCPI_LAST_ACK_RECV], sys.byteorder) / 1000.0


def _cannot_cancel() -> bool:
    return False


class Deadline:
    """A deadline for work awaited in the running task, that cancels this task itself
    (``asyncio.wait_for`` would run the work in a task of its own: another task, future and
    callbacks for every new session or link). ``await deadline.run(aw)``: ``aw``'s result, or
    ``asyncio.TimeoutError("no WHAT within ... s")`` if the deadline cancelled it. When the
    deadline comes and ``may_cancel()`` is false, the work got far enough to finish (its
    connection is handed on) and is left to."""

    __slots__ = ("loop", "timeout", "may_cancel", "what", "task", "expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float,
                 may_cancel: Callable[[], bool], what: str) -> None:
        self.loop = loop
        self.timeout = timeout
        self.may_cancel = may_cancel
        self.what = what
        self.task: asyncio.Task[Any] | None = None
        self.expired = False

    async def run(self, aw: Any) -> Any:
        self.task = asyncio.current_task(self.loop)  # (given the loop: no getpid() call)
        timer = self.loop.call_later(self.timeout, self.fire)
        try:
            return await aw
        except asyncio.CancelledError:
            if not self.expired:
                raise
            if self.task is not None and hasattr(self.task, "uncancel"):
                self.task.uncancel()  # (Python 3.11+: this cancellation is handled here)
            raise asyncio.TimeoutError(f"no {self.what} within {self.timeout:g} s") from None
        finally:
            timer.cancel()
            # (``may_cancel`` is often a closure over the deadline's owner, which holds the
            # deadline: without these the owner, the task and what they hold would wait for
            # the cyclic garbage collector)
            self.task = None
            self.may_cancel = _cannot_cancel

    def fire(self) -> None:
        """The deadline passes (called by its timer)."""
        if self.task is not None and not self.expired and self.may_cancel():
            self.expired = True
            self.task.cancel()


_LINGER_ZERO = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {l_onoff=1, l_linger=0}


def abort_with_rst(transport: asyncio.BaseTransport | None) -> None:
    """Close a TCP connection with a reset (SO_LINGER 0), so the peer sees it was not clean."""
    if transport is None or transport.is_closing():
        return
    _set_tcp_options(transport, [(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)])
    transport.abort()  # type: ignore[attr-defined]


def _not_connected(*args: Any) -> Any:
    raise RuntimeError("no transport yet (connection_made not called)")


class _EndpointBase:
    """What :class:`Endpoint` does (a separate base so that it compiles to an extension type)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.transport: asyncio.Transport | None = None
        #: the transport's write, writelines and get_write_buffer_size, bound once (the
        #: per-message path calls them without a method lookup each time)
        self._write: Callable[..., Any] = _not_connected
        self._writelines: Callable[..., Any] = _not_connected
        self._buffered: Callable[..., Any] = _not_connected
        self.paused = False  # reading paused by us (replay buffer full)
        self.eof = False
        self.closed = False
        self._spare: bytearray | None = None
        self._in_spare = False
        #: bytes offered to the next read: doubles while reads fill their offer (bulk); when a
        #: read drains the socket, the smallest MIN_READ_SIZE * 2**k above the whole burst (the
        #: reads since the last drain), so that a burst like the last one takes one read
        self._hint = MIN_READ_SIZE
        self._burst = 0
        self.pending: list[bytes] = []  # read while the replay buffer was full
        self._offered = 0

    # -- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self._write = transport.write
        self._writelines = writelines_of(transport)
        self._buffered = transport.get_write_buffer_size
        # what waits for a slow sink is bounded by the peer's replay limit plus this
        tune_socket(transport, high=ENDPOINT_HIGH_WATER, low=ENDPOINT_LOW_WATER)
        self.runner.endpoint_made(cast(Endpoint, self))

    def get_buffer(self, sizehint: int) -> memoryview | bytearray:
        runner = self.runner
        if not self.pending:
            if isinstance(runner, Runner):
                r = runner  # (compiled: typed, so the engine's calls below are C calls)
                eng = r.engine
                v = eng._recv_window(self._hint) if eng._free() > 0 else None
            else:  # the client's plain-relay fallback bridge
                b = runner.engine
                v = b.send_view(self._hint) if b.send_free > 0 else None
            if v is not None:
                n = len(v)
                if n:
                    self._in_spare = False
                    self._offered = n
                    return v
        # Replay buffer full (or data arrived after pause_reading): park it, bounded.
        self._in_spare = True
        if self._spare is None:
            self._spare = bytearray(SPARE_SIZE)
        return self._spare

    def buffer_updated(self, nbytes: int) -> None:
        runner = self.runner
        # (compiled: typed, so the calls through it below are C calls; None for the client's
        # plain-relay fallback bridge)
        r = runner if isinstance(runner, Runner) else None
        if self._in_spare:
            assert self._spare is not None
            self.pending.append(bytes(self._spare[:nbytes]))
            self.pause()
        else:
            if r is not None:
                r.engine._commit_recv(nbytes)
            else:
                runner.engine.commit_view(nbytes)
            if nbytes >= self._offered:  # filled: more may be waiting
                self._burst += nbytes
                if self._hint < _READ_SIZE:
                    self._hint *= 2
            else:  # drained: the burst ends here
                total = self._burst + nbytes
                self._burst = 0
                hint = _MIN_READ_SIZE
                while hint <= total and hint < _READ_SIZE:
                    hint *= 2
                self._hint = hint
        if r is not None:
            r._pump_source()
        else:
            runner.pump()

    def eof_received(self) -> bool:
        self.eof = True
        self.runner.endpoint_eof()
        return True  # keep the write side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.runner.endpoint_lost(exc)
        # The transport calls no more. Without the endpoint's reference back, an ended
        # session (runner <-> endpoint, and all they hold: engine, replay buffers, link,
        # transports) is freed by reference counting at once, not by a pass of the cyclic
        # garbage collector that has to find it first (benchmarks/HISTORY.md, "what a new
        # session costs").
        self.runner = None  # type: ignore[assignment]

    def pause_writing(self) -> None:
        self.runner.sink_paused()

    def resume_writing(self) -> None:
        self.runner.sink_resumed()

    # -- used by the runner ------------------------------------------------------------------
    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()


class Endpoint(_EndpointBase, asyncio.BufferedProtocol):
    """The plain TCP side of a session: the application (client) or the backend (server)."""


class _LinkBase:
    """What :class:`Link` does (a separate base so that it compiles to an extension type)."""

    def __init__(self, owner: Any, tls_setup: Any = None) -> None:
        self.owner = owner  # runner, or the server's handshake handler before attach
        self.transport: asyncio.Transport | None = None
        #: TLS run by the link itself over a plain transport (icafast.aio.tlslink): the
        #: handshake until it is done, then the pipe every record goes through
        self.tls_setup = tls_setup
        self.tls: Any = None
        #: the ssl.SSLObject of a TLS link (either kind), for its certificate and version
        self.ssl_object: Any = None
        #: the transport's write and writelines, bound once (as the endpoint's)
        self._write: Callable[..., Any] = _not_connected
        self._writelines: Callable[..., Any] = _not_connected
        self.link_id = 0  # engine's link number once attached
        #: called once, without arguments, when the connection is gone (however it ended):
        #: for whoever must know that the last bytes written to the link went out or never
        #: will (a client that stops waits for this after its CLOSE)
        self.on_lost: Callable[[], Any] | None = None
        self.write_paused = False
        #: reading paused by the runner: too much waits for the sink (SINK_BACKLOG_MIN)
        self.reading_held = False
        self.closed = False
        self.peer = ""
        #: TLS: each buffer given to ``writelines`` becomes its own TLS record (header and
        #: payload: two records per frame, each with its own overhead and cipher call), so a
        #: burst of frames is joined into one write instead
        self.join_writes = False
        self._bulk: _BulkReader | None = None  # while streaming: see BULK_READ
        # how many times it went to bulk reads, and its reads in that mode (for tests and
        # debugging)
        self.bulk_starts = self.bulk_reads = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self._use(transport)
        tune_socket(transport, notsent_lowat=LINK_NOTSENT_LOWAT)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = format_hostport(str(peer[0]), peer[1])
        else:  # (a connection reset as it was accepted has no peer address any more)
            self.peer = "?"
        if self.tls_setup is not None:
            # An owner may turn the connection away before any TLS work (a server with too
            # many connections in their handshakes already): it closes the link itself
            opened = getattr(self.owner, "link_opened", None)
            if opened is not None and not opened(self):
                self.tls_setup = None
                return
            self.tls_setup.start(self, transport)  # the owner hears of the link once secured
            return
        self.owner.link_made(self)

    def secured(self, pipe: Any, ssl_object: Any) -> None:
        """The TLS handshake is done (called by the link's TLSSetup): from now on every write
        is sealed into records and every read opened by ``pipe``."""
        self.tls_setup = None
        self.tls = pipe
        self.ssl_object = ssl_object
        pipe.attach(self.transport.write)  # type: ignore[union-attr]
        pipe.quiet_max = HEADER_SIZE  # a frame without payload: a keepalive, an ack
        # (writelines too: the runner gives it a list, and the pipe joins a burst's small
        # buffers into records)
        self._write = self._writelines = pipe.send
        self.join_writes = False
        self.owner.link_made(self)

    def secured_by_loop(self, transport: asyncio.BaseTransport) -> None:
        """The event loop's TLS transport finished the handshake (a server link's
        LoopTLSSetup): from now on the link writes to and reads from ``transport``."""
        transport = cast(asyncio.Transport, transport)
        self.tls_setup = None
        self._use(transport)
        # (its socket's options were set on the plain transport: only its own write limits)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        self.owner.link_made(self)

    def _use(self, transport: asyncio.Transport) -> None:
        """Write to and read from ``transport`` (its write and writelines bound once)."""
        self.transport = transport
        self._write = transport.write
        self._writelines = writelines_of(transport)
        self.join_writes = transport.get_extra_info("sslcontext") is not None
        self.ssl_object = transport.get_extra_info("ssl_object")

    def data_received(self, data: Any) -> None:  # type: ignore[override]
        tls = self.tls
        if tls is not None:  # TLS run by the link: open the records
            try:
                data = tls.open(data)
            except ssl.SSLError as e:
                self.closed = True
                self.owner.link_lost(self, f"TLS error: {e}")
                self.close(abort=True)
                return
            if not data:
                if tls.peer_closed and not self.closed:
                    self.closed = True
                    self.owner.link_lost(self, "connection closed by peer (TLS close_notify)")
                    self.close()
                return
        elif self.tls_setup is not None:  # still in the TLS handshake
            self.tls_setup.feed(data)
            return
        owner = self.owner
        if isinstance(owner, Runner):
            r = owner  # (compiled: typed, so the call below is a C call)
            if len(data) >= _BULK_READ and self._bulk is None and not self.closed:
                self._start_bulk()
            r._link_data(self, data)
        else:  # the server's handshake handler, or a lingering link's discarder
            owner.link_data(self, data)

    def _start_bulk(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            self._bulk = _BulkReader(self)
            self.bulk_starts += 1
            t.set_protocol(self._bulk)  # (from the next read on)

    def _stop_bulk(self) -> None:
        if self._bulk is not None:
            self._bulk = None
            t = self.transport
            if t is not None and not t.is_closing():
                t.set_protocol(cast(asyncio.BaseProtocol, self))

    def eof_received(self) -> bool:
        if self.tls_setup is not None:
            self.tls_setup.lost(None)
            return False
        self.owner.link_lost(self, "connection closed by peer")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            # (the connection is gone, and every transport says it is closing, but for
            # Python 3.10's asyncio TLS transport after its connection was lost: it must be
            # closed, or it warns of an unclosed transport when collected)
            t.close()
        on_lost = self.on_lost
        if on_lost is not None:
            self.on_lost = None
            on_lost()
        b = self._bulk
        if b is not None:
            self._bulk = None
            b.lost = True  # (what a transport still calls it with is not for the owner)
        if self.tls_setup is not None:
            self.tls_setup.lost(exc)
            return
        if not self.closed:
            self.closed = True
            reason = f"connection lost: {exc}" if exc else "connection closed"
            self.owner.link_lost(self, reason)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.owner.link_writable(self)

    def close(self, abort: bool = False) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            if abort:
                abort_with_rst(self.transport)
            else:
                self.close_notify()
                self.transport.close()

    def close_notify(self) -> None:
        """TLS run by the link: send the close_notify alert (before closing or half-closing
        the connection), once: a lingering link half-closed after it (_linger) must not write
        again when it is closed. Nothing otherwise."""
        tls = self.tls
        if tls is not None and self.transport is not None:
            self.tls = None  # (what still arrives is dropped unread: the owner discards it)
            try:
                self.transport.write(tls.close())
            except ssl.SSLError:
                pass


class _BulkBuffer(threading.local):
    """The buffer that streaming links read into: one per thread (so one per event loop), not
    one per link, so that sessions that stall or idle in bulk mode hold none of their own."""

    buf: bytearray | None = None
    refs = 0  # references to ``buf`` while nothing else holds it (see get_buffer)
    allocated = 0  # buffers made (for tests and debugging)


_bulk_buffer = _BulkBuffer()


class _BulkReaderBase:
    """What :class:`_BulkReader` does (a separate base so that it compiles to an extension
    type)."""

    def __init__(self, link: _LinkBase) -> None:
        self.link = link
        self.lost = False
        self._small = 0  # small reads in a row

    def get_buffer(self, sizehint: int) -> memoryview:
        shared = _bulk_buffer
        b = shared.buf
        # Reused only while nothing else holds it: a payload view of an earlier read that a
        # transport still queues, or the engine still holds, keeps it (and the read gets a new
        # one). Each read's payloads are views of one memoryview of the buffer, which holds a
        # reference to it, so the count tells, in compiled code or not.
        if b is None or sys.getrefcount(b) > shared.refs:
            b = shared.buf = bytearray(_READ_SIZE)
            shared.refs = sys.getrefcount(b)
            shared.allocated += 1
        # (a memoryview, not the bytearray: stdlib asyncio's TLS transport fills the rest of
        # the buffer through a slice of it, and a bytearray's slice is a copy)
        return memoryview(b)

    def buffer_updated(self, nbytes: int) -> None:
        # The loop calls get_buffer, receives into what it returned and calls this, with no
        # other read of this thread in between: the bytes are in this thread's buffer.
        if self.lost:
            return
        b = _bulk_buffer.buf
        assert b is not None
        link = self.link
        link.bulk_reads += 1
        if nbytes < _MIN_READ_SIZE:
            self._small += 1
            if self._small >= _BULK_SMALL_READS:
                link._stop_bulk()  # (from the next read on)
        else:
            self._small = 0
        link.data_received(memoryview(b)[:nbytes])

    def data_received(self, data: Any) -> None:  # (a transport between two modes may call it)
        self.link.data_received(data)

    def eof_received(self) -> bool:
        return self.link.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.connection_lost(exc)

    def pause_writing(self) -> None:
        self.link.pause_writing()

    def resume_writing(self) -> None:
        self.link.resume_writing()


class _BulkReader(_BulkReaderBase, asyncio.BufferedProtocol):
    """A streaming link's protocol: reads go into the thread's shared buffer (see BULK_READ).
    The transport's other calls go to the link itself."""


class Link(_LinkBase, asyncio.Protocol):
    """The framed connection between client and server (one per attempt).

    A plain Protocol on purpose: the event loop reads into its own shared buffer and hands us an
    immutable bytes object, so an idle link holds no receive buffer (10,000 idle sessions stay
    small) and payload memoryviews into it stay valid however long a transport queues them."""


StatusCallback = Callable[[ev.Event, SessionEngine], None]

LINGER = 2.0  # seconds a link stays open after our CLOSE, so the peer reads it


class _Discard:
    """Owner of a lingering link: whatever still arrives is dropped."""

    def __init__(self) -> None:
        self.timer: asyncio.TimerHandle | None = None  # closes the link after LINGER at most

    def link_made(self, link: Link) -> None:  # pragma: no cover - never called
        pass

    def link_data(self, link: Link, data: bytes) -> None:
        pass

    def link_lost(self, link: Link, reason: str) -> None:
        link.close()
        if self.timer is not None:  # (the peer closed first, as it should: the link and its
            self.timer.cancel()  # transport are not kept for the rest of LINGER)
            self.timer = None

    def link_writable(self, link: Link) -> None:
        pass


def _linger(loop: asyncio.AbstractEventLoop, link: Link) -> None:
    """Close a link after the CLOSE frame we just queued has reached the peer.

    Closing a socket that still has unread data makes the kernel send a reset at once and drop
    what we had queued, CLOSE included. So: half-close (where the transport can), keep reading
    and dropping until the peer closes, and close for good after LINGER seconds at most."""
    t = link.transport
    if t is None or t.is_closing():
        return
    if not t.can_write_eof():  # TLS: no half-close; close after the flush as before
        link.close()
        return
    owner = link.owner = _Discard()
    try:
        link.close_notify()
        t.write_eof()
    except (OSError, RuntimeError):
        link.close()
        return
    owner.timer = loop.call_later(LINGER, link.close)
    LINGERING[link] = loop


#: Every live runner (weakly held), so that a whole process can be shut down cleanly.
RUNNERS: weakref.WeakSet[Runner] = weakref.WeakSet()
#: Links lingering after a CLOSE, and their loops (weakly held: each link closes when its peer
#: does, or at LINGER at most).
LINGERING: weakref.WeakKeyDictionary[Link, asyncio.AbstractEventLoop] = (
    weakref.WeakKeyDictionary())


class Runner:
    """Drives one session engine: feeds it socket input and time, carries out its output."""

    def __init__(self, loop: asyncio.AbstractEventLoop, engine: SessionEngine, name: str,
                 on_status: StatusCallback | None = None) -> None:
        self.loop = loop
        self.engine = engine
        self.name = name
        self.endpoint: Endpoint | None = None
        self.link: Link | None = None
        self.on_status = on_status
        self._timer: asyncio.TimerHandle | None = None  # an exact timer of its own, or
        self._tick = 0  # ... the shared tick it is due at (0: none)
        self._timer_at = _NEVER  # when the armed one fires (inf: none is armed)
        self._ticks = _ticks_of(loop)
        self._slot = _TickSlot(self)
        self._done = False
        self._close_link_after_flush = False
        self._sink_written = False  # bytes written to the endpoint since its backlog was read
        self._more_due = False  # a pump is scheduled for the rest of a framed burst
        #: the most that may wait for the sink before the link is no longer read
        self._sink_cap = max(engine.config.replay_limit, SINK_BACKLOG_MIN)
        self._said_held = False  # _hold_link logged it (at INFO once a session)
        self.closed_future: asyncio.Future[ev.SessionClosed] = loop.create_future()
        self._time = loop.time  # (bound once: the per-message path calls it)
        RUNNERS.add(self)

    @property
    def sid(self) -> str:
        return short_id(self.engine.session_id)

    def now(self) -> float:
        return self.loop.time()

    # -- endpoint side -----------------------------------------------------------------------
    def endpoint_made(self, ep: Endpoint) -> None:
        self.endpoint = ep

    def endpoint_eof(self) -> None:
        if self.engine.state is not State.CLOSED:
            self._drain_pending()
            if self.endpoint is not None and not self.endpoint.pending:
                self.engine.send_eof()
        self._pump()

    def endpoint_lost(self, exc: Exception | None) -> None:
        eng = self.engine
        if eng.state is State.CLOSED or self._done:
            return
        if exc is None and self.endpoint is not None and self.endpoint.eof:
            # Clean close after EOF: the FIN is queued; wait for the session to finish.
            if not eng._tx_fin:  # noqa: SLF001 - pending data still to queue
                self._drain_pending()
                eng.send_eof()
            self._pump()
            return
        what = "application" if eng.role == "client" else "backend"
        eng.close(CLOSE_ABORTED, f"{what} connection {'reset: ' + str(exc) if exc else 'closed'}",
                  self.now())
        self._pump()

    def sink_paused(self) -> None:
        # Keep reading the link (keepalives must flow, or a live link would look dead). What
        # the sink has not taken is not acknowledged (sink_backlog), so the peer stops once its
        # replay buffer is full.
        pass

    def sink_resumed(self) -> None:
        link = self.link
        if link is not None and link.reading_held:
            link.reading_held = False
            if link.transport is not None and not link.closed:
                link.transport.resume_reading()
            self.engine.pause_reading(False, self.now())
        self._pump()  # the backlog shrank: acknowledge

    def _hold_link(self) -> None:
        """More than ``_sink_cap`` waits for the sink: the peer sends beyond what was
        acknowledged (a correct one stops at its replay limit). Stop reading the link until
        the sink has taken it (``sink_resumed``)."""
        link = self.link
        if link is None or link.reading_held or link.closed or link.transport is None:
            return
        link.reading_held = True
        link.transport.pause_reading()
        self.engine.pause_reading(True, self.now())
        self._transport_heard(link)
        # (said once a session: such a peer has the link paused each time the sink drains)
        level = logging.DEBUG if self._said_held else logging.INFO
        self._said_held = True
        log.log(level, "session %s: %d bytes wait for the %s, more than %d: the link is not "
                "read until it takes them (the peer sends beyond its acknowledgements)",
                self.sid, self.engine.sink_backlog,
                "application" if self.engine.role == "client" else "backend", self._sink_cap)

    def _transport_heard(self, link: Link) -> None:
        """A link not read (``_hold_link``): tell the engine when its TCP peer was last
        heard from, where the system says (the keepalives the engine sends meanwhile are
        acknowledged by a peer that is there)."""
        at = tcp_heard(link.transport, self.loop.time())
        if at is not None:
            self.engine.heard_by_transport(at)

    def _drain_pending(self) -> None:
        ep = self.endpoint
        eng = self.engine
        if ep is None:
            return
        while ep.pending and eng.send_free >= len(ep.pending[0]):
            eng.send_data(ep.pending.pop(0))

    # -- link side ---------------------------------------------------------------------------
    def link_made(self, link: Link) -> None:
        raise NotImplementedError

    def link_data(self, link: Link, data: bytes) -> None:
        self._link_data(link, data)

    def _link_data(self, link: _LinkBase, data: bytes) -> None:
        if link is not self.link:
            return
        eng = self.engine
        chunk = eng._receive_one(data, self._time())
        if chunk is None:
            self._pump()
            return
        # The usual case: one DATA frame's new bytes, without an event. The timer is armed
        # before they are written, and little is left to do after: on a shared CPU the next hop
        # waits until this process blocks again.
        self._schedule()
        self._deliver(chunk)
        ep = self.endpoint
        if ep is not None and ep.transport is not None and not ep.closed:
            eng.sink_backlog = ep._buffered()
            self._sink_written = False
            link = self.link
            if (not ep.paused and not ep.pending and not self._close_link_after_flush
                    and eng.sink_backlog <= self._sink_cap
                    and link is not None and not link.closed and eng._output_idle()):
                return  # nothing to write, nothing to resume, the timer is armed
        self._pump()

    def link_lost(self, link: Link, reason: str) -> None:
        link.closed = True
        if link is self.link:
            self.link = None
            self.engine.connection_lost(self.now(), reason, link_id=link.link_id)
            self._pump()

    def link_writable(self, link: Link) -> None:
        if link is self.link:
            self._pump()

    # -- the pump ----------------------------------------------------------------------------
    def pump(self) -> None:
        """Carry out everything the engine wants: events, bytes, back-pressure, timer."""
        self._pump()

    def _pump(self) -> None:  # (compiled: a C method, for the calls within this module)
        eng = self.engine
        batch: list[Any] | None = None
        while eng._events and (e := eng._next_raw()) is not None:
            t = type(e)
            if t is bytes or t is memoryview or not isinstance(e, _Event):
                # received bytes: the common case, without the dispatch (and, compiled, without
                # a full isinstance against the Event class for each)
                if batch is None:
                    batch = [e]
                else:
                    batch.append(e)
            else:
                if batch is not None:
                    self._deliver_all(batch)
                    batch = None
                self.handle_event(e)
        if batch is not None:
            self._deliver_all(batch)
        ep = self.endpoint
        if ep is not None and ep.transport is not None and not ep.closed and (
                self._sink_written or eng.sink_backlog):  # (else it is still 0)
            # not yet taken by the sink: not acknowledged (bounds what piles up there)
            eng.sink_backlog = ep._buffered()
            self._sink_written = False
            if eng.sink_backlog > self._sink_cap:
                self._hold_link()
        link = self.link
        if link is not None and link.transport is not None and not link.closed:
            bufs = eng.data_to_send(not link.write_paused)
            if bufs:
                if len(bufs) == 1:  # (a round trip's frame: write costs less than writelines)
                    link._write(bufs[0])
                elif link.join_writes:
                    link._write(b"".join(bufs))
                else:
                    link._writelines(bufs)
                if not self._more_due and not link.write_paused and eng.has_unsent():
                    # a burst was framed (protocol.MAX_BURST): the rest after the loop's turn
                    self._more_due = True
                    self.loop.call_soon(self._more)
                elif link.write_paused and link.transport.get_write_buffer_size() > \
                        LINK_UNSENT_MAX:
                    # only control frames go out now: the peer sends and reads nothing
                    self.link = None
                    link.close(abort=True)
                    eng.connection_lost(self._time(), "the peer reads nothing: more than "
                                        f"{LINK_UNSENT_MAX} bytes unsent to it",
                                        link.link_id)
                    self._pump()
                    return
            if self._close_link_after_flush:
                self._close_link_after_flush = False
                self.link = None
                _linger(self.loop, link)
        elif self._close_link_after_flush:
            eng.data_to_send(False)
        ep = self.endpoint
        if ep is not None and not ep.closed:
            if ep.pending:
                self._drain_pending()
                if not ep.pending and ep.eof and not eng._tx_fin:  # noqa: SLF001
                    eng.send_eof()
                    self._pump()
                    return
            if ep.paused:
                if not ep.pending and eng._free() >= min(_READ_SIZE, eng.send_window // 4):
                    ep.resume()
            elif eng._free() == 0 and not ep.eof:
                ep.pause()
        self._schedule()

    def _more(self) -> None:
        self._more_due = False
        self._pump()

    def _pump_source(self) -> None:
        """``_pump`` after a receive from the endpoint into the replay buffer, with a shortcut
        for the usual case: nothing else to do but send those bytes as one frame."""
        eng = self.engine
        link = self.link
        ep = self.endpoint
        if (not eng._events and not self._sink_written and not eng.sink_backlog
                and not self._close_link_after_flush and link is not None
                and link.transport is not None and not link.closed and not link.write_paused
                and ep is not None and not ep.paused and not ep.pending):
            frame = eng._frame_one()
            if frame is not None:  # (the write last: see _link_data)
                if eng._free() == 0 and not ep.eof:
                    ep.pause()
                self._schedule()
                link._write(frame)
                return
        self._pump()

    def _schedule(self) -> None:
        t = self.engine._deadline()
        if t == _NEVER:
            self._cancel_timer()
            return
        if self._timer_at <= t:
            return  # the armed timer fires first; it will re-arm
        if t - self.loop.time() > _COALESCE_AFTER:
            tick = -int(-t // _TIMER_TICK)  # the first tick at or after t
            if tick == self._tick:
                return  # a deadline earlier within the same tick
            self._cancel_timer()
            self._tick = tick
            self._timer_at = tick * _TIMER_TICK
            self._ticks.add(self, tick)
        else:
            self._cancel_timer()
            self._timer_at = t
            self._timer = self.loop.call_at(t, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._tick = 0  # a tick's entry for us is skipped when it fires
        self._timer_at = _NEVER

    def _on_timer(self) -> None:
        self._timer_fired()

    def _timer_fired(self) -> None:
        self._timer = None
        self._timer_at = _NEVER
        self._tick = 0
        now = self.loop.time()
        link = self.link
        if link is not None and link.reading_held:
            self._transport_heard(link)
        t = self.engine._deadline()
        if now < t != _NEVER:
            # Armed for a deadline that moved later (data or a PING arrived since): nothing is
            # due, so only re-arm.
            self._schedule()
            return
        self.engine.handle_timer(now)
        self._pump()
        link = self.link
        if link is not None and link.tls is not None:
            # (a session's timers fire every ack delay or keepalive interval at most: a quiet
            # TLS link gives back its record buffers within one)
            link.tls.idle()

    # -- events ------------------------------------------------------------------------------
    def _sink_queues(self, ep: _EndpointBase) -> bool:
        """Whether what is written to the endpoint now will wait in its buffer. Only the two
        delivery methods below write to it, so when nothing was written since the last pump
        found its buffer empty, the transport sends at once and the buffer is not asked."""
        if not self._sink_written and not self.engine.sink_backlog:
            return False
        return bool(ep._buffered())

    def _deliver(self, data: Any) -> None:
        ep = self.endpoint
        if ep is not None and ep.transport is not None and not ep.closed:
            # a payload that will wait is copied, so its view does not pin the whole received
            # block; otherwise the transport sends the view at once, or keeps it
            ep._write(bytes(data) if self._sink_queues(ep) else data)
            self._sink_written = True

    def _deliver_all(self, bufs: list[Any]) -> None:
        """Write the payloads of several DATA frames decoded from one read of the link: one
        ``writelines`` (a single writev while the sink keeps up) instead of a write per frame.
        Bulk data arrives as 64 KiB frames in reads of up to 256 KiB, so this saves about three
        system calls in four toward the sink."""
        if len(bufs) == 1:
            self._deliver(bufs[0])
            return
        ep = self.endpoint
        if ep is not None and ep.transport is not None and not ep.closed:
            if self._sink_queues(ep):
                bufs = [bytes(b) for b in bufs]  # (as in _deliver)
            ep._writelines(bufs)
            self._sink_written = True

    def handle_event(self, e: ev.Event) -> None:
        ep = self.endpoint
        if isinstance(e, ev.DataReceived):
            self._deliver(e.data)
            return
        if isinstance(e, ev.StreamEnded):
            if ep is not None and ep.transport is not None and not ep.closed:
                if ep.transport.can_write_eof():
                    ep.transport.write_eof()
            return
        if isinstance(e, ev.LinkLost):
            link = self.link
            if link is not None and link.link_id == e.link_id:
                self.link = None
                link.close(abort=True)
            log.info("session %s: link lost (%s)", self.sid, e.reason)
        elif isinstance(e, ev.LinkUp):
            if e.resumed:
                log.info("session %s: resumed on link %d, %d bytes replayed%s", self.sid,
                         e.link_id, e.replayed, window_note(self.engine))
            else:
                log.info("session %s: new session active%s", self.sid, window_note(self.engine))
        elif isinstance(e, ev.SessionClosed):
            self._on_closed(e)
        elif isinstance(e, ev.SessionHeld):
            log.info("session %s: reliability timeout, held disconnected for %gs", self.sid,
                     e.hold)
        self.status(e)

    def status(self, e: ev.Event) -> None:
        if self.on_status is not None:
            try:
                self.on_status(e, self.engine)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # an embedder's callback must not break the relay
                # (asyncio's rule for a callback: a CancelledError or any other BaseException
                # raised here would otherwise kill the link, and the session would reconnect,
                # call back, and lose the link again, in a loop)
                log.exception("status callback failed")

    def _on_closed(self, e: ev.SessionClosed) -> None:
        self._done = True
        log.info("session %s: closed (%s)%s", self.sid, e.reason, "" if e.graceful else " [abort]")
        self._close_link_after_flush = True
        ep = self.endpoint
        if ep is not None and ep.transport is not None and not ep.closed:
            if e.graceful:
                ep.transport.close()
            else:
                abort_with_rst(ep.transport)
        self._cancel_timer()
        self._slot.runner = None  # (the ticks still to fire keep nothing of the session)
        if not self.closed_future.done():
            self.closed_future.set_result(e)
        self.session_closed(e)

    def abort(self, reason: str = "shutting down") -> None:
        """End the session now: CLOSE to the peer if possible, reset both connections."""
        if not self._done:
            self.engine.close(CLOSE_ABORTED, reason, self.now())
            self._pump()
        if self.link is not None:
            self.link.close(abort=True)
            self.link = None
        if self.endpoint is not None:
            abort_with_rst(self.endpoint.transport)

    def let_go(self) -> None:
        """The session went on in another process (``RelayServer.hand_over``,
        ``RelayClient.hand_over``), which has the endpoint connection's descriptor: stop here
        without a word to either peer. The link is reset (the session resumes between the
        other process and the peer); the endpoint connection's descriptor is closed, and its
        TCP connection, which the other process holds too, goes on."""
        self._done = True
        self._cancel_timer()
        self._slot.runner = None
        link = self.link
        self.link = None
        if link is not None:
            link.close(abort=True)
        ep = self.endpoint
        self.endpoint = None  # (nothing is written to it from now on: a burst still due
        if ep is not None and ep.transport is not None and not ep.closed:  # finds none)
            ep.closed = True
            ep.transport.abort()  # (no SO_LINGER of 0, as abort_with_rst sets: no RST)

    def session_closed(self, e: ev.SessionClosed) -> None:
        """Hook for subclasses (server: forget the session)."""
