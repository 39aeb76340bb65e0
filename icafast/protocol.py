"""The sans-IO session engine (docs/PROTOCOL.md, sections 3-6).

No sockets, no event loop, no clock: callers pass in received bytes and the current time (``now``,
seconds on a monotonic clock) and take out bytes to send (``data_to_send``), events
(``next_event``) and the next deadline (``get_timer``/``handle_timer``).

- :class:`ClientSession` — one session as seen by the client: handshakes every link itself
  (NEW the first time, RESUME after a break) and schedules reconnects with back-off.
- :class:`ServerHandshake` — the server side of one fresh link until it asks for NEW or RESUME.
- :class:`ServerSession` — one session as seen by the server; links are attached to it after
  the handshake (``accept``), replacing (taking over) any older link.

Both session classes share :class:`SessionEngine`: DATA with absolute offsets, cumulative acks,
replay on resume, half-close (FIN), PING/PONG keepalive and RTT, dead-link detection.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import random
import secrets
import struct
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from . import _impl
from .errors import FrameError, ProtocolError, ReplayFullError
from .events import (
    DataReceived,
    Event,
    HandshakeFailed,
    HandshakeRejected,
    LinkLost,
    LinkUp,
    NewSessionRequested,
    ReconnectDue,
    ResumeRequested,
    SessionClosed,
    SessionHeld,
    StreamEnded,
)
from .wire import DEFAULT_MAX_PAYLOAD, FLAG_FIN, MAX_OFFSET, REPLAY_LIMIT_MAX, FrameType

_core = _impl.core
FrameDecoder = _core.FrameDecoder
ReplayBuffer = _core.ReplayBuffer
encode_header = _core.encode_header
encode_frame = _core.encode_frame

__all__ = [
    "PROTOCOL_VERSION",
    "MAGIC",
    "Config",
    "Policy",
    "State",
    "SessionEngine",
    "ClientSession",
    "ServerHandshake",
    "ServerSession",
    "make_proof",
    "rotate_secret",
    "send_window_for",
    "REJECT_VERSION",
    "REJECT_UNKNOWN_SESSION",
    "REJECT_BAD_PROOF",
    "REJECT_CLOSED",
    "REJECT_BUSY",
    "REJECT_BACKEND",
    "REJECT_PROTOCOL",
    "REJECT_RATE_LIMITED",
    "CLOSE_DONE",
    "CLOSE_ABORTED",
    "CLOSE_ADMIN",
    "CLOSE_TIMEOUT",
    "CLOSE_PROTOCOL",
    "CLOSE_SHUTDOWN",
    "CLOSE_REJECTED",
]

PROTOCOL_VERSION = 1
MAGIC = b"ICAFAST\x00"
NONCE_SIZE = 32
SESSION_ID_SIZE = 16
SECRET_SIZE = 32
#: NEW's payload: one random token per session-to-be, the same on every NEW the client sends
#: for it, so that a repeated NEW (the ACCEPT was lost) gets the session already made
NEW_TOKEN_SIZE = 16
PROOF_SIZE = 32

# REJECT reason codes (u16 at the start of a REJECT payload).
REJECT_VERSION = 1
REJECT_UNKNOWN_SESSION = 2
REJECT_BAD_PROOF = 3
REJECT_CLOSED = 4
REJECT_BUSY = 5
REJECT_BACKEND = 6
REJECT_PROTOCOL = 7
REJECT_RATE_LIMITED = 8

# CLOSE reason codes (u16 at the start of a CLOSE payload; also SessionClosed.code).
CLOSE_DONE = 0  # both directions finished, every byte delivered
CLOSE_ABORTED = 1  # the application or backend connection was reset / failed
CLOSE_ADMIN = 2  # an operator reset the session
CLOSE_TIMEOUT = 3  # reliability timeout (or hold time) ran out
CLOSE_PROTOCOL = 4  # the peer broke the protocol beyond repair
CLOSE_SHUTDOWN = 5  # the server is shutting down
CLOSE_REJECTED = 6  # local only: the server rejected the session (REJECT)

# magic, min version, max version, max payload, replay limit, nonce
_HELLO = struct.Struct(">8sHHIQ32s")
_RESUME = struct.Struct(">16s32s")  # session id, proof
_ACCEPT = struct.Struct(">16sBBHIIIIQ")  # id, resumed, on_timeout, reserved, 4 x ms, replay limit
_CODE = struct.Struct(">H")
_MAX_REASON = 256

_TYPE_DATA = int(FrameType.DATA)
_TYPE_ACK = int(FrameType.ACK)
_TYPE_PING = int(FrameType.PING)
_TYPE_PONG = int(FrameType.PONG)
_TYPE_CLOSE = int(FrameType.CLOSE)

#: Small payloads are copied rather than viewed, where a copy of about this many bytes costs
#: less than a memoryview and a second buffer to write: the last DATA frame of a burst, if it has
#: at most this much payload, is returned by ``data_to_send`` as one bytes object (header and a
#: copy of the payload), other frames as the header and a view of the replay buffer; received
#: payloads shorter than this come as bytes (``FrameDecoder(copy_below=...)``), longer ones as
#: views of the received block.
SMALL_FRAME = 2048

#: Stream bytes framed by one ``data_to_send`` call at most (the link transport's own high
#: water mark): after a resume, or when a paused link resumes, megabytes may wait unsent, and
#: framing them in one go would hold the event loop for as long as their checksums take (with
#: the pure-Python core, about 90 ms per MiB), while keepalives and other sessions wait.
#: What is left is for the next call; ``has_unsent`` says when one is needed.
MAX_BURST = 1024 * 1024


class State(str, enum.Enum):
    """Session states, as shown by ``icafast sessions``."""

    CONNECTING = "CONNECTING"  # client: first handshake not done yet
    ACTIVE = "ACTIVE"  # a link is up
    DISCONNECTED = "DISCONNECTED"  # link broken; within the reliability timeout or held
    CLOSED = "CLOSED"


_CLOSED = State.CLOSED  # (module constants: faster than the enum's attribute in hot paths)
_ACTIVE = State.ACTIVE


@dataclass(frozen=True)
class Policy:
    """Timeouts that govern a session. The server's policy wins: it is sent in ACCEPT."""

    keepalive_interval: float = 3.0
    dead_timeout: float = 10.0
    reliability_timeout: float = 180.0
    on_timeout: str = "reset"  # "reset" or "disconnect"
    hold: float = 3600.0


@dataclass(frozen=True)
class Config:
    """Engine settings. Times in seconds (fractions allowed), sizes in bytes."""

    keepalive_interval: float = 3.0
    dead_timeout: float = 10.0
    reliability_timeout: float = 180.0
    on_timeout: str = "reset"
    hold: float = 3600.0
    replay_limit: int = 8 * 1024 * 1024
    handshake_timeout: float = 10.0
    max_payload: int = DEFAULT_MAX_PAYLOAD
    frame_size: int = 64 * 1024
    # Standalone-ACK delay. Long, as TCP's delayed-ACK maximum: a reply usually carries the ack
    # sooner, and the adapter's timer armed for a deadline that a piggybacked ack made moot
    # still wakes the process once per ack_delay (benchmarks/README.md: round-trip p99).
    ack_delay: float = 0.2
    ack_threshold: int = 0  # 0: min(256 KiB, replay_limit // 4)
    reconnect_initial: float = 0.05
    reconnect_max: float = 5.0
    connect_retry: float = 10.0  # client: how long to keep trying to set up a new session

    def __post_init__(self) -> None:
        if not self.keepalive_interval > 0:
            raise ValueError("keepalive_interval must be > 0")
        if not self.dead_timeout > self.keepalive_interval:
            raise ValueError("dead_timeout must be greater than keepalive_interval")
        if not self.reliability_timeout >= 0:
            raise ValueError("reliability_timeout must be >= 0")
        if self.on_timeout not in ("reset", "disconnect"):
            raise ValueError("on_timeout must be 'reset' or 'disconnect'")
        if not self.hold >= 0:
            raise ValueError("hold must be >= 0")
        if not 1024 <= self.replay_limit <= REPLAY_LIMIT_MAX:
            # (above, every session would fail as it is made: the replay buffer's limit)
            raise ValueError(f"replay_limit must be in 1024..{REPLAY_LIMIT_MAX} bytes")
        if not self.connect_retry >= 0:
            raise ValueError("connect_retry must be >= 0")
        if not self.handshake_timeout > 0:
            raise ValueError("handshake_timeout must be > 0")
        if not 1024 <= self.max_payload <= 0xFFFFFFFF:
            raise ValueError("max_payload must be in 1024..2**32-1")
        if not 1 <= self.frame_size:
            raise ValueError("frame_size must be positive")
        for name in ("keepalive_interval", "dead_timeout", "reliability_timeout", "hold"):
            if getattr(self, name) * 1000 > 0xFFFFFFFF:
                raise ValueError(f"{name} too large (at most 49 days)")

    @functools.cached_property
    def policy(self) -> Policy:  # (once per Config: every new session asks for it)
        return Policy(
            self.keepalive_interval,
            self.dead_timeout,
            self.reliability_timeout,
            self.on_timeout,
            self.hold,
        )


def make_proof(secret: bytes, session_id: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """The RESUME proof: HMAC-SHA256(secret, label | session id | client nonce | server nonce)."""
    msg = b"icafast resume v1" + session_id + client_nonce + server_nonce
    return hmac.new(secret, msg, hashlib.sha256).digest()


def rotate_secret(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """The secret that replaces ``secret`` after a successful resume (both sides derive it)."""
    msg = b"icafast rotate v1" + client_nonce + server_nonce
    return hmac.new(secret, msg, hashlib.sha256).digest()


def _reason_payload(code: int, reason: str) -> bytes:
    return _CODE.pack(code) + reason.encode("utf-8", "replace")[:_MAX_REASON]


def _parse_reason(payload: Any) -> tuple[int, str]:
    p = bytes(payload)
    if len(p) < 2:
        raise ProtocolError("REJECT/CLOSE payload shorter than 2 bytes")
    (code,) = _CODE.unpack_from(p, 0)
    return code, printable(p[2 : 2 + _MAX_REASON].decode("utf-8", "replace"))


def printable(text: str) -> str:
    """``text`` from the wire, fit for a log line: each character that is not printable (a
    line break, an escape sequence's ESC, ...) written as its Python escape, so that a peer's
    reason cannot forge or hide log lines."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


#: The send window: how much of its stream a side keeps in flight, unacknowledged. A path whose
#: handshake round trip is short needs far less than the replay limit to run at full speed, and
#: a smaller window keeps a busy session's replay ring smaller: 4 MiB instead of 8 on a short
#: path (benchmarks/HISTORY.md, "a send window sized from the handshake"). The window covers the
#: round trip at WINDOW_RATE, is at least WINDOW_MIN (scheduling gaps of a busy host) and at
#: most the replay limit: 4 MiB up to a 1 ms round trip, the full 8 MiB from 2 ms on.
#: - The rate, 4 MiB per millisecond (4.2 GB/s), is twice the fastest session measured. A
#:   round trip read up to 1 ms short (uvloop's loop clock counts whole milliseconds) still
#:   gets a window that covers it.
#: - A round trip read as exactly 1 ms, as a short path often is by such a clock, gets
#:   exactly WINDOW_MIN: the ring grows by doubling, and a window just over 4 MiB would make
#:   it 8 MiB.
WINDOW_MIN = 4 * 1024 * 1024
WINDOW_RATE = WINDOW_MIN * 1000  # bytes per second


#: Window control (PROTOCOL.md 4.7, "window control"). A sender limited by its send window
#: measures its delivery rate (bytes acknowledged per second) with the window sized from the
#: handshake (high) and then with a quarter of it (low, at least four ack thresholds), and
#: keeps the low window only if it delivers at least WC_MARGIN times as much. On a short path
#: whose hops share a CPU the low window is the faster: a ring and socket buffers that stay in
#: the CPU's cache (benchmarks/HISTORY.md, "a send window that measures itself"); on a long
#: path, or hops with CPUs of their own, the high one.
WC_EPOCH = 0.05  # seconds a measurement lasts, at least (and two windows acknowledged)
WC_PROBE_MAX = 2.0  # a probe without a measurement by then (not window-limited) ends
WC_HOLD_MIN = 0.25  # seconds a choice holds before the next pair of measurements...
WC_HOLD_MAX = 4.0  # ...doubling up to this while the choice stays the same
WC_MARGIN = 1.04
_WC_HOLD = 0  # a choice holds until _wc_until
_WC_HIGH = 1  # measuring the high window (until _wc_until at most)
_WC_LOW = 2  # measuring the low window


def send_window_for(rtt: float, replay_limit: int) -> int:
    """The send window for a link whose handshake took ``rtt`` seconds (PROTOCOL.md 4.7)."""
    w = rtt * WINDOW_RATE
    if not w > WINDOW_MIN:  # (a NaN too)
        w = WINDOW_MIN
    return replay_limit if w >= replay_limit else int(w)


def _ms(seconds: float) -> int:
    return min(0xFFFFFFFF, max(0, round(seconds * 1000)))


def _us(now: float) -> int:
    return int(now * 1_000_000) & MAX_OFFSET


# Link phases.
_HELLO_SENT = 1  # client sent HELLO, waits for the server's HELLO
_AUTH_SENT = 2  # client sent NEW/RESUME, waits for ACCEPT/REJECT
_ESTABLISHED = 3

#: The last stream offset (PROTOCOL.md 4.1): the compiled engine keeps offsets in 64-bit C
#: integers, and no offset or ack it handles may pass this
_MAX_OFFSET = MAX_OFFSET
#: "no deadline" for the timers kept as C doubles in the compiled engine
_NEVER = float("inf")
_FLAG_FIN = FLAG_FIN  # (a C constant in the compiled engine)


class _Link:
    """Per-connection state: decoder, nonces, keepalive bookkeeping."""

    __slots__ = (
        "id",
        "decoder",
        "phase",
        "nonce",
        "peer_nonce",
        "started",
        "last_rx",
        "last_heard",
        "last_ping",
        "ping_ts",
        "peer_max_payload",
        "confirm_secret",
        "reading_paused",
        "acks_heard",
    )

    def __init__(self, link_id: int, decoder: Any, phase: int, now: float) -> None:
        self.id = link_id
        self.decoder = decoder
        self.phase = phase
        self.nonce = b""
        self.peer_nonce = b""
        self.started = now
        self.last_rx = now
        self.last_heard = now
        self.last_ping = now
        self.ping_ts: int | None = None
        self.peer_max_payload = DEFAULT_MAX_PAYLOAD
        self.confirm_secret = False
        #: the adapter stopped reading the link (too much waits for the local sink): nothing
        #: can be heard from it meanwhile, so it cannot be declared dead (``pause_reading``)
        self.reading_paused = False
        #: while reading is paused, the adapter says when the peer's TCP last acknowledged
        #: (``heard_by_transport``): the dead timeout then applies to that
        self.acks_heard = False


class SessionEngine:
    """What client and server sessions share: the reliable byte stream over changing links."""

    role = "?"
    #: this side PINGs after ``keepalive_interval`` of receive silence; the other side waits
    #: halfway to the dead timeout, so on an idle link only one PING/PONG pair per interval
    #: crosses (PROTOCOL.md 5). The server leads: its RTT is what ``icafast sessions`` shows.
    leads_keepalive = False

    def __init__(self, config: Config, now: float) -> None:
        self.config = config
        # hot-path copies of settings (the config is frozen; the policy goes through its setter)
        self._ack_delay = config.ack_delay
        self._frame_size = config.frame_size
        self._burst = MAX_BURST
        self._handshake_timeout = config.handshake_timeout
        self.policy = config.policy
        self.session_id = b""
        self.state = State.CONNECTING
        self.created = now
        self.tx = ReplayBuffer(config.replay_limit)
        #: what may be unacknowledged: the replay limit until a handshake sizes it (_set_window)
        self._window = config.replay_limit
        #: the replay limit the peer announced in its HELLO (its own until one came): the send
        #: window never exceeds it (_peer_limit)
        self._peer_replay_limit = config.replay_limit
        # window control: the two windows (equal: none), the phase and its measurement
        self._window_hi = self._window_lo = self._wc_choice = self._window
        self._wc_phase = _WC_HOLD
        self._wc_until = _NEVER  # end of the hold, or of the probe
        self._wc_hold = WC_HOLD_MIN  # the next hold's length
        self._wc_t0 = 0.0  # the measurement's start
        self._wc_rate = self._wc_rate_lo = 0.0  # each window's last rate (bytes/s; 0: none)
        self._wc_b0 = 0  # ack at the measurement's start
        self._wc_settle = 0  # the measurement starts past this ack
        self._wc_full = 0  # the last ack that found the window (nearly) full
        self.handshake_rtt: float | None = None  # the last link's, which sized the window
        self._tx_sent = 0  # next offset to frame on the current link (FIN counts as one)
        self._tx_high = 0  # the furthest _tx_sent reached on an earlier link (see _on_ack)
        self._tx_fin = False  # the local source ended: FIN sits at offset tx.end
        self._tx_fin_acked = False
        self._peer_ack = 0  # highest cumulative ack from the peer
        self._rx = 0  # next offset expected from the peer (FIN counts as one)
        self._rx_fin = False
        self._rx_acked = 0  # last ack value we sent
        self._ack_hold: int | None = None  # acks frozen here while the local sink is full
        self._ack_now = False  # an ACK is due with the next data_to_send
        self._now = now  # the latest time we were given
        #: bytes received but still queued toward the local sink (set by the adapter): they are
        #: not acknowledged yet, which bounds what can pile up there by the peer's replay limit
        self.sink_backlog = 0
        self._ack_due = _NEVER  # when a standalone ACK is due
        self._ack_threshold = config.ack_threshold or min(256 * 1024, config.replay_limit // 4)
        self._link: _Link | None = None
        self._link_seq = 0
        self._out: list[Any] = []
        #: events, and received stream bytes as bare chunks (``next_event`` wraps them),
        #: taken from index ``_ev_head`` on and cleared when all are taken
        self._events: list[Any] = []
        self._ev_head = 0
        self._disconnected_at: float | None = None
        # statistics for ``icafast sessions`` and logs
        self.reconnects = 0
        self.bytes_received = 0
        self.replayed_total = 0
        self.last_activity = now
        self.srtt: float | None = None
        self.rttvar: float | None = None
        self.close_reason = ""

    # -- inspection --------------------------------------------------------------------------
    @property
    def link_id(self) -> int:
        """Number of the current link (0: none)."""
        return self._link.id if self._link is not None else 0

    @property
    def established(self) -> bool:
        return self._link is not None and self._link.phase == _ESTABLISHED

    @property
    def bytes_sent(self) -> int:
        """Bytes of the local stream the peer has acknowledged."""
        return self.tx.start

    @property
    def unacked(self) -> int:
        return len(self.tx)

    @property
    def send_free(self) -> int:
        """Bytes the local source may still send before back-pressure applies."""
        return self._free()

    def _free(self) -> int:  # (send_free without the property's lookup, for the adapter)
        if self._tx_fin:
            return 0
        return self._room()

    def _room(self) -> int:
        """Bytes the send window has room for (the FIN aside)."""
        tx = self.tx
        # (from the replay buffer's fields: C fields in the compiled engine, see _core.pxd)
        used = tx._end - tx._start
        w = self._window
        return w - used if used < w else 0

    @property
    def send_window(self) -> int:
        """How many bytes of the local stream may be unacknowledged at a time: sized from the
        handshake round trip, at most ``replay_limit``, and a quarter of that while window
        control finds the smaller one faster (PROTOCOL.md 4.7)."""
        return self._window

    def _set_window(self, rtt: float) -> None:
        self.handshake_rtt = rtt
        limit = self.config.replay_limit
        if self._peer_replay_limit < limit:
            limit = self._peer_replay_limit
        hi = send_window_for(rtt, limit)
        lo = hi // 4
        floor = 4 * min(256 * 1024, limit // 4)
        if lo < floor:
            lo = floor
        self._window = self._window_hi = self._wc_choice = hi
        self._window_lo = lo
        self._wc_hold = WC_HOLD_MIN
        if lo < hi:  # measure the high window first
            self._wc_switch(_WC_HIGH, hi, self._peer_ack)
        else:
            self._wc_phase = _WC_HOLD
            self._wc_until = _NEVER

    def _wc_switch(self, phase: int, window: int, ack: int) -> None:
        """Start measuring ``window``: from the ack that covers what the old one put in
        flight (at most the high window), until the probe's deadline."""
        self._wc_phase = phase
        self._window = window
        self._wc_settle = ack + self._window_hi
        self._wc_b0 = self._wc_full = ack
        self._wc_t0 = self._now
        self._wc_until = self._now + WC_PROBE_MAX

    def _wc_hold_for(self, window: int) -> None:
        """Keep ``window`` for a hold: twice the last one if the choice is the same."""
        if window == self._wc_choice:
            hold = self._wc_hold * 2
            self._wc_hold = hold if hold < WC_HOLD_MAX else WC_HOLD_MAX
        else:
            self._wc_hold = WC_HOLD_MIN
        self._window = self._wc_choice = window
        self._wc_phase = _WC_HOLD
        self._wc_until = self._now + self._wc_hold

    def _wc_ack(self, used: int, ack: int) -> None:
        """Window control, for an ack of ``ack`` that found ``used`` bytes unacknowledged."""
        now = self._now
        phase = self._wc_phase
        if phase == _WC_HOLD:
            if now >= self._wc_until:
                self._wc_switch(_WC_HIGH, self._window_hi, ack)
            return
        if now >= self._wc_until:  # no measurement: the window does not limit the sender
            self._wc_hold_for(self._window_hi)
            return
        if used * 8 >= self._window * 7:
            self._wc_full = ack
        if ack <= self._wc_settle or ack - self._wc_full > self._window:
            # settling, or a whole window acknowledged and not once (nearly) full: the source
            # does not keep up, and the measurement starts again
            self._wc_b0 = ack
            self._wc_t0 = now
            return
        dt = now - self._wc_t0
        if dt < WC_EPOCH or ack - self._wc_b0 < 2 * self._window:
            return  # (two windows: at least two round trips, however long they are)
        rate = (ack - self._wc_b0) / dt
        if phase == _WC_HIGH:
            self._wc_rate = rate
            self._wc_switch(_WC_LOW, self._window_lo, ack)
        else:
            self._wc_rate_lo = rate
            self._wc_hold_for(
                self._window_lo if rate >= self._wc_rate * WC_MARGIN else self._window_hi)

    @property
    def finished(self) -> bool:
        """Both directions ended and the peer acknowledged our end."""
        return self._rx_fin and self._tx_fin_acked

    def next_event(self) -> Event | None:
        e = self._next_raw()
        return e if e is None or isinstance(e, Event) else DataReceived(e)

    def _next_raw(self) -> Any:
        """``next_event()`` for the adapter: received stream bytes come as the bytes-like
        chunk itself, not wrapped in a DataReceived (which costs an object per frame)."""
        events = self._events
        i = self._ev_head
        if i >= len(events):
            return None
        e = events[i]
        i += 1
        if i == len(events):
            self._events = []
            i = 0
        self._ev_head = i
        return e

    @property
    def policy(self) -> Policy:
        """The timeouts in force: our own until the server's arrive in ACCEPT."""
        return self._policy

    @policy.setter
    def policy(self, p: Policy) -> None:
        self._policy = p
        self._dead_timeout = p.dead_timeout
        if self.leads_keepalive:
            self._ping_after = p.keepalive_interval
        else:
            self._ping_after = (p.keepalive_interval + p.dead_timeout) / 2

    # -- the local source (application or backend) -------------------------------------------
    def send_data(self, data: Any) -> None:
        """Queue stream bytes; raises ReplayFullError (nothing queued) past ``send_free``."""
        if self._tx_fin:
            raise ProtocolError("send_data after send_eof")
        tx = self.tx
        if self._window < tx._limit:  # (else the replay buffer's own check is the window's)
            room = self._room()
            n = memoryview(data).nbytes
            if n > room:
                raise ReplayFullError(
                    f"send of {n} bytes exceeds the {room} bytes free (send window {self._window})"
                )
        tx.append(data)

    def send_view(self, max_bytes: int | None = None) -> memoryview:
        """Writable view into the replay buffer for receiving straight into it (recv_into): at
        most ``max_bytes`` long and at most what the send window has room for."""
        room = self._room()
        return self.tx.write_view(room if max_bytes is None or max_bytes > room else max_bytes)

    def commit_view(self, n: int) -> None:
        self.tx.commit(n)

    def _recv_window(self, max_bytes: int) -> Any:
        """``send_view`` for an adapter that fills it at once (``BufferedProtocol.get_buffer``)
        and calls ``_commit_recv`` next: with the compiled core, one reused window object
        instead of a new memoryview per receive."""
        room = self._room()
        return self.tx.recv_window(max_bytes if max_bytes < room else room)

    def _commit_recv(self, n: int) -> None:
        self.tx._commit(n)

    def send_eof(self) -> None:
        """The local source ended (half-close): a FIN follows the last byte. Raises
        ProtocolError if the stream reached offset 2**64-1, where its FIN's ack would not fit
        (PROTOCOL.md 4.1)."""
        if self.tx._end >= _MAX_OFFSET:  # (its ack, one past it, would not fit 64 bits)
            raise ProtocolError("the stream reached the last 64-bit offset: no room for its FIN")
        self._tx_fin = True

    # -- output ------------------------------------------------------------------------------
    def data_to_send(self, include_data: bool = True) -> list[Any]:
        """Buffers to write, in order, on the current link (write them with writelines).

        With ``include_data=False`` (the link's send buffer is full) only control frames
        are returned and new stream data waits in the replay buffer. At most ``MAX_BURST``
        stream bytes are framed per call: while ``has_unsent()``, call again (after giving the
        event loop a turn).
        """
        link = self._link
        # (nothing follows a CLOSE: the peer ends the session on it and the link is closed)
        if link is not None and link.phase == _ESTABLISHED and self.state is not _CLOSED:
            if include_data:
                self._frame_data(link)
            ackv = self._ack_value()
            if ackv != self._rx_acked and (
                self._ack_now or ackv - self._rx_acked >= self._ack_threshold
            ):
                self._out.append(encode_frame(_TYPE_ACK, 0, 0, ackv))
                self._sent_ack()
            if self._rx != self._rx_acked and self._ack_due == _NEVER:
                self._ack_due = self._now + self._ack_delay  # the rest, a little later
        out = self._out
        if not out:
            return out
        self._out = []
        return out

    def _frame_one(self) -> Any:
        """``data_to_send()`` for the adapter's usual case after a receive from the local source:
        what is unsent fits one small DATA frame on an established link, and nothing else
        waits. Returns that frame's bytes and leaves the state ``data_to_send`` would leave;
        otherwise None, with nothing changed (``data_to_send`` then does it all). Nothing
        follows a CLOSE, as there: a closed session keeps its link only to flush that CLOSE."""
        link = self._link
        if (link is None or link.phase != _ESTABLISHED or self._out or self._tx_fin
                or self.state is _CLOSED):
            return None
        sent = self._tx_sent  # (no FIN: at most the end)
        n = self.tx._end - sent
        if not n or n > SMALL_FRAME or n > self._frame_size or n > link.peer_max_payload:
            return None
        frame = self.tx._frame_at(_TYPE_DATA, 0, sent, n, self._ack_value())
        self._tx_sent = sent + n
        self._sent_ack()
        if self._rx != self._rx_acked:  # (what data_to_send does after an ack)
            self._ack_due = self._now + self._ack_delay
        return frame

    def _output_idle(self) -> bool:
        """True when ``data_to_send()`` would return nothing and change nothing (the adapter
        then skips it): an established link, no frame queued, no stream bytes or FIN unsent, no
        ack due now, and a later ack already timed."""
        link = self._link
        if link is None or link.phase != _ESTABLISHED or self._out or self._tx_fin:
            return False
        if self._tx_sent != self.tx._end:
            return False
        ackv = self._ack_value()
        if ackv != self._rx_acked and (
                self._ack_now or ackv - self._rx_acked >= self._ack_threshold):
            return False
        return self._rx == self._rx_acked or self._ack_due != _NEVER

    def has_unsent(self) -> bool:
        """Stream bytes wait in the replay buffer, not yet framed (``data_to_send`` framed a
        burst of ``MAX_BURST`` and stopped, or the link's send buffer was full)."""
        return self._tx_sent < self.tx._end

    def _frame_data(self, link: _Link) -> None:
        end = self.tx._end  # (tx.end; a C field in the compiled engine)
        sent = self._tx_sent
        if sent > end:
            return  # FIN already sent
        out = self._out
        fin = self._tx_fin
        if end - sent > self._burst:  # the rest on the next call (MAX_BURST)
            end = sent + self._burst
            fin = False
        if sent < end:
            size = min(self._frame_size, link.peer_max_payload)
            rx = self._ack_value()
            tx = self.tx
            high = self._tx_high
            while sent < end:
                n = end - sent
                if n <= SMALL_FRAME and n <= size:
                    # one buffer: copying a little costs less than a second buffer to write
                    out.append(tx._frame_at(_TYPE_DATA, _FLAG_FIN if fin else 0, sent, n, rx))
                    sent = end + 1 if fin else end
                    break
                if sent < high:
                    # A replay of bytes an earlier link carried: the peer may have them, and
                    # ack them before this link's transport has sent them (_on_ack). The ring
                    # would then reuse their memory for new bytes under a view still queued,
                    # so these frames are copies (the ring's views stay valid only until the
                    # bytes they show are acknowledged).
                    if n > size:
                        n = size
                    if n > high - sent:
                        n = high - sent
                    last = fin and sent + n == end
                    out.append(tx._frame_at(_TYPE_DATA, _FLAG_FIN if last else 0, sent, n, rx))
                    sent += n
                    if last:
                        sent += 1
                    continue
                for v in tx.views(sent, size):  # header, then the ring's own bytes (vectored)
                    n = len(v)
                    last = fin and sent + n == end
                    out.append(encode_header(_TYPE_DATA, FLAG_FIN if last else 0, sent, rx, v))
                    out.append(v)
                    sent += n
                    if last:
                        sent += 1
                    break  # one contiguous view per frame
            self._tx_sent = sent
            self._sent_ack()
        if fin and sent == end:
            out.append(encode_frame(_TYPE_DATA, FLAG_FIN, end, self._ack_value()))
            self._tx_sent = end + 1
            self._sent_ack()

    def _ack_value(self) -> int:
        """The cumulative ack we send: what the local sink took (received bytes minus those still
        queued toward it, ``sink_backlog``), frozen while acks are held; never backwards."""
        if self._ack_hold is None:
            rx = self._rx
            backlog = self.sink_backlog
            if backlog and self._rx_fin:
                backlog += 1  # (the FIN reaches the sink after what waits before it)
            v = rx - backlog if backlog < rx else 0  # (unsigned in the compiled engine)
        else:
            v = self._ack_hold
        return v if v > self._rx_acked else self._rx_acked

    def _peer_limit(self, peer_replay_limit: int) -> None:
        """Ack often enough for the peer's replay buffer: at least every quarter of it. And
        never let more be unacknowledged than the peer announced it keeps (PROTOCOL.md 4.7):
        past that, the peer may stop reading the link, and a link it does not read brings it
        no acks either, so with a stream each way both sides could wait on each other."""
        own = self.config.ack_threshold or 256 * 1024
        self._ack_threshold = max(1, min(own, peer_replay_limit // 4))
        self._peer_replay_limit = peer_replay_limit
        if self._window_hi > peer_replay_limit:  # (no round trip to size it from, yet)
            self._window_hi = peer_replay_limit
            if self._window_lo >= peer_replay_limit:  # (one window: no control)
                self._window_lo = self._wc_choice = self._window = peer_replay_limit
                self._wc_phase = _WC_HOLD
                self._wc_until = _NEVER
            else:  # (the low one stays; the high one is this)
                if self._wc_choice > peer_replay_limit:
                    self._wc_choice = peer_replay_limit
                if self._window > peer_replay_limit:
                    self._window = peer_replay_limit

    def _sent_ack(self) -> None:
        self._rx_acked = self._ack_value()
        self._ack_due = _NEVER
        self._ack_now = False

    def _send_control(self, ftype: int, seq: int = 0, payload: bytes = b"") -> None:
        # Control frames repeat the last ack sent; ack progress is decided in data_to_send,
        # after the adapter has delivered what was received (so sink_backlog is current).
        self._out.append(encode_frame(ftype, 0, seq, self._rx_acked, payload))

    def hold_acks(self, hold: bool) -> None:
        """The local sink (application or backend) stopped taking data (``hold=True``) or took
        it again. While held, acks stay where they were, so the peer stops sending once its
        replay buffer is full: what waits in the sink is bounded by the peer's replay limit, and
        the link is still read, so keepalives keep working and a live link never looks dead."""
        if hold:
            if self._ack_hold is None:
                self._ack_hold = self._rx_acked
        elif self._ack_hold is not None:
            self._ack_hold = None
            self._ack_now = True

    def pause_reading(self, paused: bool, now: float) -> None:
        """The adapter stopped (``paused``) or resumed reading the current link: it does so
        while more than it will hold waits for the local sink, from a peer that sends beyond
        the acks (PROTOCOL.md 4.7). Nothing is read from the link meanwhile, so its dead
        timeout does not apply (unless the adapter tells when the peer's TCP was last heard:
        ``heard_by_transport``); it runs again from the time reading resumes."""
        link = self._link
        if link is None:
            return
        link.reading_paused = paused
        link.acks_heard = False
        if not paused:
            link.last_rx = now

    def heard_by_transport(self, at: float) -> None:
        """While the adapter does not read the current link (``pause_reading``): the peer's
        transport was last heard at ``at`` (Linux: the last TCP acknowledgement of what was
        sent on the link, keepalives among it, and ``now`` where nothing sent waits for one).
        From then on until reading resumes, the link is declared dead once nothing has been
        heard that way for the dead timeout: a peer that vanished is found as when the link
        is read, not only by TCP's own timeout (PROTOCOL.md 4.7)."""
        link = self._link
        if link is None or not link.reading_paused:
            return
        link.acks_heard = True
        if at > link.last_rx:
            link.last_rx = at

    # -- input -------------------------------------------------------------------------------
    def receive_data(self, data: Any, now: float) -> None:
        """Bytes received on the current link."""
        self._now = now
        link = self._link
        if link is None or self.state is _CLOSED:
            return
        if link.phase != _ESTABLISHED and link.decoder.offset == 0 and not link.decoder.buffered:
            first = memoryview(data)[:1].tobytes()
            if first and first[0] not in (FrameType.HELLO, FrameType.REJECT):
                self._link_failed(f"not an icafast server (first byte 0x{first[0]:02x})", now)
                return
        try:
            frames = link.decoder.feed(data)
        except FrameError as e:
            self._link_failed(f"malformed frame: {e}", now)
            return
        link.last_rx = now
        self._frames_in(link, frames, now)

    def _frames_in(self, link: _Link, frames: list[Any], now: float) -> None:
        """Decoded frames of ``link``: a protocol error drops it (if it is still the link)."""
        try:
            if link.phase == _ESTABLISHED:
                self._receive_frames(link, frames, now)
            else:
                self._handshake_frames(link, frames, now)
        except ProtocolError as e:
            if self._link is link:
                self._link_failed(f"protocol error: {e}", now)

    def _receive_one(self, data: Any, now: float) -> Any:
        """``receive_data`` for the adapter, with a shortcut for its usual case: ``data`` is one
        whole DATA frame, in order, on an established link, with nothing else to report. Its
        payload (the new stream bytes) is then returned for the adapter to deliver at once,
        without an event. Otherwise None, and everything is as after ``receive_data`` (received
        bytes among the events)."""
        link = self._link
        if (link is None or link.phase != _ESTABLISHED or link.confirm_secret or self._events
                or self.state is _CLOSED):
            self.receive_data(data, now)
            return None
        self._now = now
        try:
            f = link.decoder.feed_one(data)
        except FrameError as e:
            self._link_failed(f"malformed frame: {e}", now)
            return None
        if f is None:  # not exactly one frame
            self.receive_data(data, now)
            return None
        link.last_rx = now
        p = f.payload
        n = len(p)
        rx = self._rx
        if (f.type != _TYPE_DATA or f.flags or f.seq != rx or not n or self._rx_fin
                or n > _MAX_OFFSET - rx):
            self._frames_in(link, [f], now)
            return None
        if f.ack != self._peer_ack:
            try:
                self._on_ack(f.ack)
            except ProtocolError as e:
                self._link_failed(f"protocol error: {e}", now)
                return None
        # what _receive_frames and _on_data do for this frame (no FIN: nothing can finish)
        self._rx = rx + n
        self.bytes_received += n
        self.last_activity = now
        link.last_heard = now
        if self._ack_due == _NEVER:  # (_rx moved past _rx_acked)
            self._ack_due = now + self._ack_delay  # data_to_send may ack sooner
        return p

    def _receive_frames(self, link: _Link, frames: list[Any], now: float) -> None:
        heard = True
        if frames and link.confirm_secret:
            self._confirm_secret()
            link.confirm_secret = False
        for f in frames:
            if self._link is not link:
                return  # closed while handling an earlier frame
            if f.ack != self._peer_ack:
                self._on_ack(f.ack)
            t = f.type
            if t == _TYPE_DATA:
                self._on_data(f, now)
            elif t == _TYPE_ACK:
                pass
            elif t == _TYPE_PING:
                self._send_control(_TYPE_PONG, f.seq)
                self._shrink_if_idle()  # the peer heard nothing for an interval
            elif t == _TYPE_PONG:
                if link.ping_ts is not None and f.seq == link.ping_ts:
                    self._rtt_sample(now - link.last_ping)
                    link.ping_ts = None
                    # only the answer to our PING: it does not postpone the next one
                    # (PROTOCOL.md 5), so an idle link's timer fires once per PING
                    heard = len(frames) != 1
            elif t == _TYPE_CLOSE:
                code, reason = _parse_reason(f.payload)
                if code > CLOSE_SHUTDOWN:  # (not one a peer sends: 6.4)
                    reason = f"code {code}, {reason}" if reason else f"code {code}"
                self._closed(code, f"peer closed: {reason}", graceful=code == CLOSE_DONE
                             and self._both_ended())
                return
            else:
                raise ProtocolError(f"unexpected frame type 0x{t:02x} on an established link")
        if heard:
            link.last_heard = now
        if self._rx != self._rx_acked and self._ack_due == _NEVER:
            self._ack_due = now + self._ack_delay  # data_to_send may ack sooner
        self._check_done()

    def _both_ended(self) -> bool:
        """This side has the peer's FIN and has sent its own: what a CLOSE 0 says (PROTOCOL.md
        6.4). A CLOSE 0 without them is an abortive end: an end of stream passed on to the
        local endpoint would hide that bytes are missing."""
        sent = self._tx_sent if self._tx_sent > self._tx_high else self._tx_high
        return self._rx_fin and self._tx_fin and sent > self.tx._end

    def _tx_limit(self) -> int:
        """One past the last offset of our stream (the FIN counts as one)."""
        end = self.tx._end  # (below the last offset if there is a FIN: see send_eof)
        return end + 1 if self._tx_fin else end

    def _apply_ack(self, ack: int) -> None:
        """The peer has everything before ``ack`` (already checked): free it."""
        self._peer_ack = ack
        tx = self.tx
        end = tx._end
        tx._ack_at(ack if ack < end else end)
        if self._tx_fin and ack == end + 1:
            self._tx_fin_acked = True

    def _on_ack(self, ack: int) -> None:
        # What was sent, on this link or an earlier one: after a resume the peer may ack bytes
        # it received on the old link before they are sent again (its ACCEPT/RESUME offset is
        # its ack, which its sink may pass right after), PROTOCOL.md 4.5.
        sent = self._tx_sent if self._tx_sent > self._peer_ack else self._peer_ack
        if self._tx_high > sent:
            sent = self._tx_high
        upper = min(self._tx_limit(), sent)
        if not self._peer_ack <= ack <= upper:
            raise ProtocolError(f"ack {ack} outside [{self._peer_ack}, {upper}]")
        tx = self.tx
        used = tx._end - tx._start
        self._apply_ack(ack)
        if self._window_lo < self._window_hi:
            self._wc_ack(used, ack)
            if len(tx._buf) >= 2 * self._window and tx._end - tx._start <= self._window:
                tx.shrink()  # (the low window: a ring that cycles through less memory)
        if ack > self._tx_sent:  # acknowledged: not sent again
            self._tx_sent = ack

    def _on_data(self, f: Any, now: float) -> None:
        s = f.seq
        p = f.payload
        n = len(p)
        fin = 1 if f.flags & _FLAG_FIN else 0
        rx = self._rx
        if s > rx:
            raise ProtocolError(f"DATA at offset {s} leaves a gap (expected {rx})")
        if n + fin > _MAX_OFFSET - s:  # (its end, or its FIN's ack, would not fit 64 bits)
            raise ProtocolError(f"DATA at offset {s} passes the last 64-bit offset")
        if self._rx_fin:
            if s + n + fin > rx:
                raise ProtocolError("DATA after the end of the stream")
            return
        skip = rx - s
        if skip < n:
            chunk = p[skip:] if skip else p
            self._rx = rx + n - skip
            self.bytes_received += n - skip
            self.last_activity = now
            self._events.append(chunk)  # next_event() wraps it in a DataReceived
        if fin and s + n == self._rx:
            self._rx_fin = True
            self._rx += 1
            if self._tx_fin:
                # our stream ended too: the peer may be waiting for this ack to end the
                # session, so it goes at once. Otherwise it rides on our FIN (or on earlier
                # data, or goes when the ack deadline passes): the peer needs it only to free
                # its replay buffer, and a FIN answered by a FIN costs one frame, not two.
                self._ack_now = True
            self._events.append(StreamEnded())

    def _rtt_sample(self, r: float) -> None:
        # RFC 6298 smoothing.
        if self.srtt is None or self.rttvar is None:
            self.srtt, self.rttvar = r, r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r

    def _check_received(self, received: int) -> None:
        """A peer's received offset (RESUME/ACCEPT) must lie in [acked, what we sent]: as an
        ack (_on_ack), it cannot cover what was never sent, on any link (PROTOCOL.md 4.5).
        (Bytes queued while no link was up would otherwise be freed unseen.)"""
        sent = self._tx_sent if self._tx_sent > self._peer_ack else self._peer_ack
        if self._tx_high > sent:
            sent = self._tx_high
        limit = min(self._tx_limit(), sent)
        if not self._peer_ack <= received <= limit:
            raise ProtocolError(
                f"peer's received offset {received} outside [{self._peer_ack}, {limit}]"
            )

    def _rewind(self, received: int) -> int:
        """The peer says it has everything before ``received``: resend from there."""
        self._check_received(received)
        self._apply_ack(received)
        sent = self._tx_sent
        replay = sent - received if sent > received else 0
        if sent > self._tx_high:
            self._tx_high = sent
        self._tx_sent = received
        return replay

    def _check_done(self) -> None:
        pass

    # -- links -------------------------------------------------------------------------------
    def _new_link(self, decoder: Any, phase: int, now: float) -> _Link:
        self._link_seq += 1
        return _Link(self._link_seq, decoder, phase, now)

    def connection_lost(self, now: float, reason: str = "connection closed", link_id: int = 0):
        """The adapter's connection for ``link_id`` (0: the current one) closed or failed."""
        link = self._link
        if link is None or (link_id and link_id != link.id):
            return
        cut = link.decoder.buffered
        if cut:  # (the peer, or the network, stopped within a frame: worth saying)
            reason = f"{reason}, {cut} bytes into a frame"
        self._link_failed(reason, now)

    def _link_failed(self, reason: str, now: float) -> None:
        link = self._link
        if link is None:
            return
        self._link = None
        self._out = []
        self._ack_due = _NEVER
        if self.state is State.CLOSED:
            return
        if link.phase == _ESTABLISHED:
            self.state = State.DISCONNECTED
            self._disconnected_at = now
            self._events.append(LinkLost(reason, link.id))
        self._after_link_failed(link, reason, now)

    def _after_link_failed(self, link: _Link, reason: str, now: float) -> None:
        pass

    def _confirm_secret(self) -> None:
        pass

    def _closed(self, code: int, reason: str, graceful: bool) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.close_reason = reason
        self._events.append(SessionClosed(code, reason, graceful))

    def close(self, code: int, reason: str, now: float = 0.0) -> None:
        """End the session abortively (or, with CLOSE_DONE, after everything was delivered):
        tell the peer with CLOSE if a link is up. The adapter then closes the link."""
        if self.state is State.CLOSED:
            return
        if self.established:
            if code == CLOSE_DONE:
                # everything received, the peer's FIN included: when that FIN came last,
                # nothing but this CLOSE acknowledges it (PROTOCOL.md 6.4)
                self._rx_acked = self._rx
            self._send_control(FrameType.CLOSE, 0, _reason_payload(code, reason))
        self._closed(code, reason, graceful=code == CLOSE_DONE and self.finished)

    # -- timers ------------------------------------------------------------------------------
    def get_timer(self) -> float | None:
        """The next time ``handle_timer`` must be called (None: no deadline)."""
        t = self._deadline()
        return None if t == _NEVER else t

    def _deadline(self) -> float:
        """``get_timer()`` as a float, ``inf`` for none (for the adapter: no object per call)."""
        if self.state is _CLOSED:
            return _NEVER
        t = _NEVER
        link = self._link
        if link is not None:
            if link.phase == _ESTABLISHED:
                t = max(link.last_heard, link.last_ping) + self._ping_after
                dead = link.last_rx + self._dead_timeout
                if dead < t and (link.acks_heard or not link.reading_paused):
                    t = dead
                if self._ack_due < t:
                    t = self._ack_due
            else:
                t = link.started + self._handshake_timeout
            return t
        t2 = self._extra_timer()
        if t2 is not None and t2 < t:
            t = t2
        return t

    def _extra_timer(self) -> float | None:
        """A subclass's own deadline, which applies only while no link is up (the client's
        next reconnect, the server's reliability timeout or hold): ``_deadline`` asks for it
        only then, which keeps the call off the per-message path."""
        return None

    def handle_timer(self, now: float) -> None:
        self._now = now
        if self.state is _CLOSED:
            return
        link = self._link
        if link is not None:
            if link.phase == _ESTABLISHED:
                if now >= link.last_rx + self._dead_timeout and (
                        link.acks_heard or not link.reading_paused):
                    self._link_failed(
                        f"dead: nothing received for {now - link.last_rx:.1f}s" if not
                        link.reading_paused else "dead: the link is not read (the sink is "
                        f"behind), and its TCP peer acknowledged nothing for "
                        f"{now - link.last_rx:.1f}s", now)
                else:
                    if now >= self._ack_due:
                        self._ack_due = _NEVER
                        self._ack_now = True  # the ACK goes out with data_to_send
                    if now >= max(link.last_heard, link.last_ping) + self._ping_after:
                        self._ping(link, now)
                        self._shrink_if_idle()
            elif now >= link.started + self._handshake_timeout:
                self._link_failed("handshake timed out", now)
        self._handle_extra_timer(now)

    def _shrink_if_idle(self) -> None:
        if not len(self.tx):
            self.tx.shrink()  # idle: give the replay buffer's memory back

    def _ping(self, link: _Link, now: float) -> None:
        link.last_ping = now
        link.ping_ts = _us(now)
        self._send_control(_TYPE_PING, link.ping_ts)

    def _handle_extra_timer(self, now: float) -> None:
        pass

    def _handshake_frames(self, link: _Link, frames: list[Any], now: float) -> None:
        raise ProtocolError("unexpected handshake state")

    # -- serialisation -----------------------------------------------------------------------
    def export_state(self) -> dict[str, Any]:
        """Plain, serialisable state of the session (offsets, unacked bytes, secrets, timers)."""
        d = self._state()
        d["tx_unacked"] = b"".join(bytes(v) for v in self.tx.views()).hex()
        return d

    def _state(self) -> dict[str, Any]:
        """``export_state()`` without the unacknowledged bytes (``tx.views()`` holds them)."""
        return {
            "role": self.role,
            "session_id": self.session_id.hex(),
            "state": self.state.value,
            "policy": asdict(self.policy),
            "tx_start": self.tx.start,
            # the furthest offset sent on any link (a peer's RESUME may acknowledge up to it)
            "tx_high": max(self._tx_sent, self._tx_high, self._peer_ack),
            "tx_fin": self._tx_fin,
            "tx_fin_acked": self._tx_fin_acked,
            "peer_ack": self._peer_ack,
            "rx": self._rx,
            "rx_fin": self._rx_fin,
            "rx_acked": self._rx_acked,
            "created": self.created,
            "disconnected_at": self._disconnected_at,
            "reconnects": self.reconnects,
            "bytes_received": self.bytes_received,
            "srtt": self.srtt,
        }

    def _restore(self, state: dict[str, Any], unacked: Any) -> None:
        """What ``from_state`` restores of ``_state()`` on either side: the session id, the
        stream offsets, the replay bytes (``unacked``, from ``tx_start`` on) and the
        statistics."""
        self.session_id = bytes.fromhex(state["session_id"])
        n = memoryview(unacked).nbytes
        start = state["tx_start"]
        self.tx = ReplayBuffer(max(self.config.replay_limit, n), start)
        if n:
            self.tx.append(unacked)
        self._peer_ack = start
        # (as after a link that broke: what it had sent, from which a resume replays)
        self._tx_sent = self._tx_high = state["tx_high"]
        self._tx_fin = state["tx_fin"]
        self._tx_fin_acked = state["tx_fin_acked"]
        self._rx = state["rx"]
        self._rx_fin = state["rx_fin"]
        self._rx_acked = min(state["rx_acked"], self._rx)
        self.created = state["created"]
        self.reconnects = state["reconnects"]
        self.bytes_received = state["bytes_received"]
        self.srtt = state["srtt"]

    def stats(self, now: float) -> dict[str, Any]:
        return {
            "id": self.session_id.hex(),
            "state": self.state.value,
            "age": round(now - self.created, 3),
            "idle": round(now - self.last_activity, 3),
            "bytes_in": self.bytes_received,
            "bytes_out": self.bytes_sent,
            "unacked": self.unacked,
            "replay_capacity": self.tx.capacity,
            "send_window": self._window,
            # the two windows and what each delivered when last measured (bytes/s; 0: not
            # yet), or None where the two are equal (PROTOCOL.md 4.7, window control)
            "window_control": None if self._window_lo >= self._window_hi else {
                "high": self._window_hi, "low": self._window_lo,
                "high_rate": round(self._wc_rate), "low_rate": round(self._wc_rate_lo)},
            "rtt_ms": None if self.srtt is None else round(self.srtt * 1000, 3),
            "reconnects": self.reconnects,
        }


# =============================================================================================
# Client


#: The reconnect jitter of client sessions that are given no generator of their own: one for
#: the process, seeded once (seeding a generator per session costs more than its use).
_JITTER = random.Random()


class ClientSession(SessionEngine):
    """A session seen from the client.

    Usage: open a connection to the server, call ``connect(now)``, shuttle bytes. On ``LinkLost``
    wait for ``ReconnectDue`` (via the timer), open a new connection and call ``connect`` again.
    """

    role = "client"

    def __init__(self, config: Config | None = None, now: float = 0.0, rng: Any = None) -> None:
        super().__init__(config or Config(), now)
        self._secret = b""
        self._rng = rng or _JITTER  # (reconnect jitter: a per-session generator buys nothing)
        self._attempt = 0
        self._reconnect_at: float | None = None
        self._ever_established = False
        self.server_policy: Policy | None = None
        self._close_pending: tuple[int, str] | None = None
        self._first_attempt_at: float | None = None
        #: sent with every NEW of this session (PROTOCOL.md 3.2)
        self._new_token = secrets.token_bytes(NEW_TOKEN_SIZE)

    @property
    def has_session(self) -> bool:
        return bool(self.session_id)

    def connect(self, now: float) -> None:
        """A new connection to the server is open: start the handshake on it."""
        if self.state is State.CLOSED:
            raise ProtocolError("session is closed")
        if self._link is not None:
            self._link_failed("replaced by a new connection", now)
        self._reconnect_at = None
        link = self._new_link(FrameDecoder(self.config.max_payload, SMALL_FRAME), _HELLO_SENT,
                              now)
        link.nonce = secrets.token_bytes(NONCE_SIZE)
        self._link = link
        hello = _HELLO.pack(MAGIC, PROTOCOL_VERSION, PROTOCOL_VERSION, self.config.max_payload,
                            self.config.replay_limit, link.nonce)
        self._out = [encode_frame(FrameType.HELLO, 0, 0, 0, hello)]
        if not self.session_id:
            # A new session needs nothing from the server's HELLO: NEW goes with ours, and
            # the session opens in one round trip instead of two (PROTOCOL.md 3.2). A RESUME
            # waits for the server's HELLO: its proof covers the server's nonce.
            # Every NEW of this session carries the same token: if an ACCEPT is lost, the
            # server answers the repeated NEW with the session it made, not a second one.
            self._out.append(encode_frame(FrameType.NEW, 0, 0, 0, self._new_token))

    def connect_failed(self, reason: str, now: float) -> None:
        """Opening the connection to the server failed (refused, unreachable, timeout)."""
        if self.state is State.CLOSED:
            return
        self._reconnect_at = None
        self._attempt_failed(reason, now)

    def _handshake_frames(self, link: _Link, frames: list[Any], now: float) -> None:
        for i, f in enumerate(frames):
            t = f.type
            if link.phase == _HELLO_SENT and t == FrameType.HELLO:
                self._on_server_hello(link, f)
                self._set_window(now - link.started)  # HELLO -> HELLO: one round trip
            elif link.phase == _AUTH_SENT and t == FrameType.ACCEPT:
                self._on_accept(link, f, now)
                if self._link is link and i + 1 < len(frames):
                    self._receive_frames(link, frames[i + 1 :], now)
                return
            elif t == FrameType.REJECT:
                code, reason = _parse_reason(f.payload)
                self._on_reject(code, reason, now)
                return
            else:
                raise ProtocolError(f"unexpected frame type 0x{t:02x} during the handshake")

    def _on_server_hello(self, link: _Link, f: Any) -> None:
        if len(f.payload) < _HELLO.size:
            raise ProtocolError("server HELLO too short")
        magic, vmin, vmax, max_payload, limit, nonce = _HELLO.unpack_from(bytes(f.payload))
        if magic != MAGIC:
            raise ProtocolError("server HELLO has the wrong magic")
        if not vmin <= PROTOCOL_VERSION <= vmax:
            raise ProtocolError(f"server speaks protocol versions {vmin}..{vmax}")
        if max_payload < 1024 or limit < 1024:
            raise ProtocolError("server HELLO announces limits below 1024 bytes")
        link.peer_nonce = nonce
        link.peer_max_payload = max_payload
        self._peer_limit(limit)
        if self.session_id:
            proof = make_proof(self._secret, self.session_id, link.nonce, nonce)
            payload = _RESUME.pack(self.session_id, proof)
            self._out.append(encode_frame(FrameType.RESUME, 0, 0, self._ack_value(), payload))
            self._sent_ack()  # what RESUME acks is sent: later frames repeat it (4.3)
        # (a new session's NEW went with our HELLO: see connect)
        link.phase = _AUTH_SENT
        link.last_ping = self._now  # when NEW/RESUME left: a resume's ACCEPT is its RTT sample

    def _on_accept(self, link: _Link, f: Any, now: float) -> None:
        p = bytes(f.payload)
        if len(p) < _ACCEPT.size:
            raise ProtocolError("ACCEPT too short")
        sid, resumed, on_timeout, reserved, ka, dead, rel, hold, _limit = _ACCEPT.unpack_from(p, 0)
        if ka == 0 or dead <= ka or on_timeout not in (0, 1) or reserved:
            raise ProtocolError("ACCEPT carries an invalid policy")
        if self.session_id:
            if not resumed or sid != self.session_id or len(p) != _ACCEPT.size:
                raise ProtocolError("ACCEPT does not match the resumed session")
        elif resumed or len(p) != _ACCEPT.size + SECRET_SIZE:
            raise ProtocolError("ACCEPT for a new session must carry a secret")
        # (all checked before anything of the ACCEPT is taken: after a NEW, the session id,
        # or the next try would be a RESUME of a session never accepted, PROTOCOL.md 6.3)
        self._check_received(f.ack)
        if self.session_id:
            self._secret = rotate_secret(self._secret, link.nonce, link.peer_nonce)
        else:
            self.session_id = sid
            self._secret = p[_ACCEPT.size :]
        self.server_policy = Policy(
            ka / 1000, dead / 1000, rel / 1000, ("reset", "disconnect")[on_timeout], hold / 1000
        )
        self.policy = self.server_policy
        replay = self._rewind(f.ack)
        link.phase = _ESTABLISHED
        link.last_rx = link.last_heard = now
        # An RTT sample for each link on this side too (idle links are kept alive by the
        # server's PINGs, which give only the server samples; PROTOCOL.md 5): RESUME -> ACCEPT
        # is one round trip; a new session's ACCEPT waits for the backend connection, so its
        # sample is the HELLO exchange's round trip (no PING, and no PONG to write and read
        # on every new session).
        if resumed:
            self._rtt_sample(now - link.last_ping)
        elif self.handshake_rtt is not None:
            self._rtt_sample(self.handshake_rtt)
        link.last_ping = now
        self.state = State.ACTIVE
        if self._ever_established:
            self.reconnects += 1
        self._ever_established = True
        self._attempt = 0
        self._disconnected_at = None
        self.replayed_total += replay
        self._events.append(LinkUp(bool(resumed), replay, link.id))
        if self._close_pending is not None:  # the application ended while we were away
            code, reason = self._close_pending
            self._close_pending = None
            SessionEngine.close(self, code, reason, now)

    def _on_reject(self, code: int, reason: str, now: float) -> None:
        self._events.append(HandshakeRejected(code, reason))
        self._link = None
        self._out = []
        if code == REJECT_CLOSED and self.finished:
            self._closed(CLOSE_DONE, "session complete", graceful=True)
        elif code == REJECT_VERSION and not self._ever_established:
            # no common protocol version: like talking to something that is not icafast
            self._closed(CLOSE_ABORTED, f"could not connect: {reason}", graceful=False)
        elif code in (REJECT_BUSY, REJECT_RATE_LIMITED) and self._ever_established:
            self._attempt_failed(f"rejected: {reason}", now, quiet=True)
        else:
            self._closed(CLOSE_REJECTED, f"server rejected the session: {reason}", graceful=False)

    def _after_link_failed(self, link: _Link, reason: str, now: float) -> None:
        if link.phase != _ESTABLISHED:
            self._events.append(HandshakeRejected(0, reason))
        self._attempt_failed(reason, now, quiet=True)

    def _attempt_failed(self, reason: str, now: float, quiet: bool = False) -> None:
        if not quiet:
            self._events.append(HandshakeRejected(0, reason))
        if not self._ever_established:
            # The first connection: keep trying for connect_retry seconds (a network blink
            # while the application connects must not reset it), then give up.
            if self._first_attempt_at is None:
                self._first_attempt_at = self.created
            self._attempt += 1
            deadline = self._first_attempt_at + self.config.connect_retry
            if now >= deadline:
                self._closed(CLOSE_ABORTED, f"could not connect: {reason}", graceful=False)
                return
            delay = self.config.reconnect_initial * 2 ** min(self._attempt - 1, 30)
            delay = min(self.config.reconnect_max, delay * (0.5 + self._rng.random()))
            self._reconnect_at = min(now + delay, deadline)
            return
        if self._disconnected_at is None:
            self._disconnected_at = now
        self._attempt += 1
        p = self.policy
        deadline = self._disconnected_at + p.reliability_timeout
        if p.on_timeout == "disconnect":
            deadline += p.hold
        cfg = self.config
        if self._attempt == 1:
            delay = 0.0
        else:
            in_hold = now > self._disconnected_at + p.reliability_timeout
            cap = cfg.reconnect_max * (6 if in_hold else 1)
            delay = cfg.reconnect_initial * 2 ** min(self._attempt - 2, 30)
            delay = min(cap, delay * (0.5 + self._rng.random()))  # jitter 0.5x..1.5x, capped
        at = min(now + delay, deadline)  # one last try at the deadline
        if now >= deadline and self._attempt > 1:
            lost = self._disconnected_at
            reason = f"reliability timeout: no reconnect within {deadline - lost:g}s"
            if now > deadline + 1.0:  # (an attempt under way at the deadline ran its course)
                reason += f" (the last attempt ended {now - lost:.1f}s after the link was lost)"
            self._closed(CLOSE_TIMEOUT, reason, graceful=False)
            return
        self._reconnect_at = at

    def _extra_timer(self) -> float | None:
        return self._reconnect_at if self._link is None else None

    def _handle_extra_timer(self, now: float) -> None:
        if self._link is None and self._reconnect_at is not None and now >= self._reconnect_at:
            self._reconnect_at = None
            self._events.append(ReconnectDue(self._attempt))

    def close(self, code: int, reason: str, now: float = 0.0) -> None:
        """As SessionEngine.close; but an abort while disconnected is delivered: the session
        keeps reconnecting (until the reliability timeout) just to tell the server with CLOSE,
        so the backend connection is not kept open for nothing."""
        if (self.state is State.DISCONNECTED and self.session_id and code != CLOSE_DONE
                and self._close_pending is None):
            self._close_pending = (code, reason)
            return
        super().close(code, reason, now)

    @property
    def closing(self) -> bool:
        """An abort waits for the next link to be delivered."""
        return self._close_pending is not None

    def _state(self) -> dict[str, Any]:
        d = super()._state()
        d["secret"] = self._secret.hex()
        d["new_token"] = self._new_token.hex()
        d["established"] = self._ever_established
        d["first_attempt_at"] = self._first_attempt_at
        d["server_policy"] = (None if self.server_policy is None
                              else asdict(self.server_policy))
        d["close_pending"] = (None if self._close_pending is None
                              else list(self._close_pending))
        return d

    @classmethod
    def from_state(cls, config: Config, state: dict[str, Any], unacked: Any,
                   now: float) -> ClientSession:
        """The session of ``export_state()`` (another process's, handed over: see
        ``RelayClient.hand_over``), without a link, ready for ``connect``: DISCONNECTED, as
        if its link had just broken (a session whose first handshake had not ended yet is
        CONNECTING, and its next NEW carries the same token: the server answers it with the
        session it may have made already, PROTOCOL.md 3.2). ``unacked`` holds the bytes from
        ``tx_start`` on, and ``state["rx"]`` is what the application has taken of the
        server's stream (the server sends the rest again). A reliability timeout that was
        running goes on from where it was (both processes read the same monotonic clock)."""
        s = cls(config, now)
        s._restore(state, unacked)
        s._secret = bytes.fromhex(state["secret"])
        s._new_token = bytes.fromhex(state["new_token"])
        s._ever_established = bool(state["established"])
        s._first_attempt_at = state["first_attempt_at"]
        policy = state["server_policy"]
        if policy is not None:
            s.server_policy = Policy(**policy)
            s.policy = s.server_policy
        pending = state["close_pending"]
        s._close_pending = None if pending is None else (int(pending[0]), str(pending[1]))
        if s.session_id:
            s.state = State.DISCONNECTED
            s._disconnected_at = state["disconnected_at"]
            if s._disconnected_at is None:  # (its link was up: it breaks now)
                s._disconnected_at = now
        return s


# =============================================================================================
# Server


class ServerHandshake:
    """The server side of a fresh connection, up to the client's NEW or RESUME request.

    Emits ``NewSessionRequested``/``ResumeRequested`` (then the server calls
    ``ServerSession.accept`` or ``reject``) or ``HandshakeFailed`` (close the connection).
    """

    def __init__(self, config: Config, now: float) -> None:
        self.config = config
        self.decoder = FrameDecoder(config.max_payload, SMALL_FRAME)
        self.nonce = secrets.token_bytes(NONCE_SIZE)
        self.client_nonce = b""
        self.client_max_payload = DEFAULT_MAX_PAYLOAD
        self.client_replay_limit = config.replay_limit
        self.started = now
        self._hello_at = now  # when our HELLO left
        #: our HELLO -> the client's NEW/RESUME: one round trip (it sizes the send window);
        #: None when NEW came with the client's HELLO (the adapter may set it before accept)
        self.rtt: float | None = None
        self.version = 0
        self.received = 0  # client's received offset, from RESUME
        self.new_token = b""  # from NEW: empty, or the client's token for this session
        self.resume = False
        self.done = False
        self._waiting_hello = True
        self._hello_read = False  # the read being processed holds the client's HELLO
        self._out: list[Any] = []
        self._events: deque[Event] = deque()

    def receive_data(self, data: Any, now: float) -> None:
        if self.done:
            return
        self._hello_read = self._waiting_hello  # (a HELLO, if any, is in this read)
        if self.decoder.offset == 0 and not self.decoder.buffered:
            first = memoryview(data)[:1].tobytes()
            if first and first[0] != FrameType.HELLO:
                self.fail(f"not an icafast client (first byte 0x{first[0]:02x})")
                return
        try:
            frames = self.decoder.feed(data)
            for i, f in enumerate(frames):
                self._on_frame(f, now)
                if self.done:
                    if i + 1 < len(frames):
                        self._events.clear()  # no NEW/RESUME to act on: the request is void
                        raise ProtocolError("client sent frames before the handshake completed")
                    break
        except FrameError as e:
            self.fail(str(e))
        except ProtocolError as e:
            self.fail(str(e), e.code or REJECT_PROTOCOL)

    def _on_frame(self, f: Any, now: float) -> None:
        t = f.type
        if self._waiting_hello:
            if t != FrameType.HELLO:
                raise ProtocolError(f"expected HELLO, got frame type 0x{t:02x}")
            if len(f.payload) < _HELLO.size:  # later versions may append fields
                raise ProtocolError("HELLO too short")
            magic, vmin, vmax, max_payload, limit, nonce = _HELLO.unpack_from(bytes(f.payload))
            if magic != MAGIC:
                raise ProtocolError("HELLO has the wrong magic")
            if max_payload < 1024 or limit < 1024:
                raise ProtocolError("HELLO announces limits below 1024 bytes")
            if not vmin <= PROTOCOL_VERSION <= vmax:  # REJECT 1 instead of a HELLO, and close
                raise ProtocolError(f"protocol version {PROTOCOL_VERSION} only", REJECT_VERSION)
            self.version = PROTOCOL_VERSION
            self.client_nonce = nonce
            self.client_max_payload = max_payload
            self.client_replay_limit = limit
            self._waiting_hello = False
            hello = _HELLO.pack(MAGIC, PROTOCOL_VERSION, PROTOCOL_VERSION,
                                self.config.max_payload, self.config.replay_limit, self.nonce)
            self._out.append(encode_frame(FrameType.HELLO, 0, 0, 0, hello))
            self._hello_at = now
        elif t == FrameType.NEW:
            if len(f.payload) not in (0, NEW_TOKEN_SIZE):
                raise ProtocolError(f"NEW payload must be empty or a {NEW_TOKEN_SIZE}-byte token")
            self.new_token = bytes(f.payload)
            self.done = True
            # A NEW read with the HELLO was sent with it, before our HELLO could arrive: no
            # round trip to measure (the adapter may supply one, e.g. the TCP connection's)
            self.rtt = None if self._hello_read else now - self._hello_at
            self._events.append(NewSessionRequested(self.version))
        elif t == FrameType.RESUME:
            if len(f.payload) != _RESUME.size:
                raise ProtocolError("RESUME has the wrong size")
            sid, proof = _RESUME.unpack(bytes(f.payload))
            self.received = f.ack
            self.resume = True
            self.done = True
            self.rtt = now - self._hello_at
            self._events.append(ResumeRequested(sid, proof, f.ack))
        else:
            raise ProtocolError(f"expected NEW or RESUME, got frame type 0x{t:02x}")

    def reject(self, code: int, reason: str) -> None:
        """Refuse the request; send the result of ``data_to_send`` and close."""
        self.done = True
        self._out.append(encode_frame(FrameType.REJECT, 0, 0, 0, _reason_payload(code, reason)))

    def fail(self, reason: str, code: int = REJECT_PROTOCOL) -> None:
        """Refuse with REJECT ``code`` and emit HandshakeFailed (the server closes the link)."""
        if not self._events or not isinstance(self._events[-1], HandshakeFailed):
            self.reject(code, reason)
            self._events.append(HandshakeFailed(reason))

    def get_timer(self) -> float | None:
        return None if self.done else self.started + self.config.handshake_timeout

    def handle_timer(self, now: float) -> None:
        if not self.done and now >= self.started + self.config.handshake_timeout:
            # No REJECT: REJECT 7 ends the client's session (PROTOCOL.md 3.6), and a slow
            # network is no reason for that; a closed link is a failed attempt, retried (3.5)
            self.done = True
            self._events.append(HandshakeFailed("handshake timed out"))

    def data_to_send(self) -> list[Any]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None


class ServerSession(SessionEngine):
    """A session seen from the server (one per client session; owns one backend connection)."""

    role = "server"
    leads_keepalive = True

    def __init__(self, config: Config, now: float) -> None:
        super().__init__(config, now)
        self.session_id = secrets.token_bytes(SESSION_ID_SIZE)
        self._secret = secrets.token_bytes(SECRET_SIZE)
        self._pending_secret: bytes | None = None
        self.held = False
        self._expiry: float | None = None
        self.client_address = ""
        self.attached_links = 0
        #: the token of the NEW that made the session, until the client is known to have its
        #: ACCEPT (it spoke on a link after it, or proved a RESUME); a NEW carrying it until
        #: then is a repeat, answered with this session (PROTOCOL.md 3.2)
        self.new_token = b""

    def check_proof(self, hs: ServerHandshake, proof: bytes) -> bool:
        """Does ``proof`` (from RESUME on ``hs``) show knowledge of this session's secret?"""
        for s in (self._secret, self._pending_secret):
            if s is not None and hmac.compare_digest(
                make_proof(s, self.session_id, hs.client_nonce, hs.nonce), proof
            ):
                if s is self._pending_secret:
                    self._secret, self._pending_secret = s, None
                return True
        return False

    def _confirm_secret(self) -> None:
        # The client has spoken on the link after our ACCEPT: it has the rotated secret, or,
        # for a new session, the ACCEPT itself (its NEW cannot be repeated any more).
        if self._pending_secret is not None:
            self._secret, self._pending_secret = self._pending_secret, None
        self.new_token = b""

    def accept(self, hs: ServerHandshake, now: float) -> int:
        """Attach the link of ``hs`` (after NEW, or RESUME with a checked proof); an older link,
        alive or not, is dropped (takeover). Returns the number of bytes to be replayed."""
        if self.state is State.CLOSED:
            raise ProtocolError("session is closed")
        self._now = now  # (window control times its measurement from here)
        resumed = hs.resume
        if resumed and not self.attached_links:
            raise ProtocolError("RESUME of a session that never had a link")
        repeat = not resumed and self.attached_links > 0
        if repeat and not (hs.new_token and hs.new_token == self.new_token):
            raise ProtocolError("NEW for a session that exists")
        received = hs.received if resumed else 0
        self._check_received(received)  # before disturbing the live link
        if self._link is not None:
            self._link_failed("taken over by a new connection", now)
        link = self._new_link(hs.decoder, _ESTABLISHED, now)
        link.nonce, link.peer_nonce = hs.nonce, hs.client_nonce
        link.peer_max_payload = hs.client_max_payload
        self._peer_limit(hs.client_replay_limit)
        if hs.rtt is not None:
            self._set_window(hs.rtt)
        replay = self._rewind(received)
        p = self.policy
        accept = _ACCEPT.pack(
            self.session_id,
            1 if resumed else 0,
            1 if p.on_timeout == "disconnect" else 0,
            0,
            _ms(p.keepalive_interval),
            _ms(p.dead_timeout),
            _ms(p.reliability_timeout),
            _ms(p.hold),
            self.config.replay_limit,
        )
        if not resumed:
            if repeat:
                # The client never saw the first ACCEPT: a fresh secret, and the stream
                # from 0 (the rewind above), as for a session just made
                self._secret = secrets.token_bytes(SECRET_SIZE)
                self._pending_secret = None
            else:
                self.new_token = hs.new_token
            link.confirm_secret = bool(self.new_token)
            accept += self._secret
        else:
            self.new_token = b""
            self._pending_secret = rotate_secret(self._secret, hs.client_nonce, hs.nonce)
            link.confirm_secret = True
            self.reconnects += 1
        hs.done = True
        # (what the handshake has not handed out yet goes first: our HELLO, when the client's
        # NEW came with its HELLO and the adapter accepts before writing the handshake's output)
        self._out = [*hs.data_to_send(),
                     encode_frame(FrameType.ACCEPT, 0, 0, self._ack_value(), accept)]
        self._rx_acked = self._ack_value()
        self._link = link
        self.attached_links += 1
        self.state = State.ACTIVE
        self.held = False
        self._expiry = None
        self._disconnected_at = None
        self.replayed_total += replay
        self._events.append(LinkUp(resumed, replay, link.id))
        self._check_done()  # the RESUME may have acknowledged the last FIN
        return replay

    def _after_link_failed(self, link: _Link, reason: str, now: float) -> None:
        p = self.policy
        self._expiry = now + p.reliability_timeout

    def _check_done(self) -> None:
        if self._rx_fin and self._tx_fin_acked and self.state is _ACTIVE:
            self.close(CLOSE_DONE, "both directions finished")

    def _extra_timer(self) -> float | None:
        return self._expiry if self._link is None else None

    def _handle_extra_timer(self, now: float) -> None:
        if self._link is not None or self._expiry is None or now < self._expiry:
            return
        p = self.policy
        if p.on_timeout == "disconnect" and not self.held:
            self.held = True
            self._expiry = now + p.hold
            self._events.append(SessionHeld(p.hold))
        else:
            what = "hold time" if self.held else "reliability timeout"
            self._expiry = None
            self._closed(CLOSE_TIMEOUT, f"{what} expired", graceful=False)

    def stats(self, now: float) -> dict[str, Any]:
        d = super().stats(now)
        d["client"] = self.client_address
        d["held"] = self.held
        return d

    def _state(self) -> dict[str, Any]:
        d = super()._state()
        d["secret"] = self._secret.hex()
        d["pending_secret"] = None if self._pending_secret is None else self._pending_secret.hex()
        d["held"] = self.held
        d["expiry"] = self._expiry
        d["new_token"] = self.new_token.hex()
        d["client_address"] = self.client_address
        return d

    @classmethod
    def from_state(cls, config: Config, state: dict[str, Any], unacked: Any,
                   now: float) -> ServerSession:
        """The session of ``export_state()`` (another process's, handed over: see
        ``RelayServer.hand_over``), without a link: DISCONNECTED, as if its link had just
        broken, until its client resumes it. ``unacked`` holds the bytes from ``tx_start`` on,
        and ``state["rx"]`` is what the backend has taken of the client's stream (the client
        sends the rest again). Timeouts are ``config``'s, and a reliability timeout that
        was running goes on from where it was (both processes read the same monotonic clock).
        """
        s = cls(config, now)
        s._restore(state, unacked)
        s._secret = bytes.fromhex(state["secret"])
        pending = state.get("pending_secret")
        s._pending_secret = None if pending is None else bytes.fromhex(pending)
        s.new_token = bytes.fromhex(state.get("new_token", ""))
        s.client_address = state.get("client_address", "")
        s.attached_links = 1  # (it had a link: a RESUME of it is valid)
        s.state = State.DISCONNECTED
        held = bool(state["held"])
        expiry = state["expiry"]
        s.held = held and expiry is not None
        s._disconnected_at = state["disconnected_at"]
        if s._disconnected_at is None or expiry is None:  # (its link was up: it breaks now)
            s._disconnected_at = now
            s._expiry = now + s.policy.reliability_timeout
        else:
            s._expiry = expiry
        return s

