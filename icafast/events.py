"""Events the sans-IO session engine emits (``engine.next_event()``).

Plain frozen dataclasses; adapters react to them (write to a socket, log, close) and embedders get
them through status callbacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "Event",
    "DataReceived",
    "StreamEnded",
    "LinkUp",
    "LinkLost",
    "ReconnectDue",
    "SessionHeld",
    "SessionClosed",
    "HandshakeRejected",
    "NewSessionRequested",
    "ResumeRequested",
    "HandshakeFailed",
]


class Event:
    """Base class of all engine events."""


@dataclass(frozen=True)
class DataReceived(Event):
    """In-order stream bytes from the peer, each delivered exactly once."""

    #: The bytes; may be a memoryview into the receive buffer: consume (write) it before the
    #: next call into the engine.
    data: Any


@dataclass(frozen=True)
class StreamEnded(Event):
    """The peer half-closed its direction: no more DataReceived will follow."""


@dataclass(frozen=True)
class LinkUp(Event):
    """The handshake completed and the session runs over the current link."""

    #: True when an existing session was resumed (False for a new session).
    resumed: bool
    #: Bytes this side re-sends because the peer had not received them.
    replayed: int
    #: The link number (increases with every attach).
    link_id: int


@dataclass(frozen=True)
class LinkLost(Event):
    """The current link broke; the session is DISCONNECTED (not closed)."""

    #: Why: "dead: nothing received for 10.0s", "connection reset", "taken over", ...
    reason: str
    #: The link that was lost.
    link_id: int


@dataclass(frozen=True)
class ReconnectDue(Event):
    """Client only: time to open a new connection to the server and call ``connect(now)``."""

    #: How many attempts have been made since the link was lost (1 for the first).
    attempt: int


@dataclass(frozen=True)
class SessionHeld(Event):
    """Server only: the reliability timeout passed with on-timeout=disconnect; the session is kept
    DISCONNECTED (backend still open) until the hold time ends or a client resumes it."""

    #: Seconds the session is held for.
    hold: float


@dataclass(frozen=True)
class SessionClosed(Event):
    """The session is over; adapters close the link and the application/backend connection."""

    #: One of the CLOSE_* codes in :mod:`icafast.protocol`.
    code: int
    #: Human-readable reason.
    reason: str
    #: True when every byte was delivered both ways (both half-closes done).
    graceful: bool


@dataclass(frozen=True)
class HandshakeRejected(Event):
    """Client only: the server refused the NEW/RESUME (REJECT frame) or the handshake failed."""

    #: One of the REJECT_* codes in :mod:`icafast.protocol` (0: not a REJECT, e.g. bad reply).
    code: int
    #: Human-readable reason.
    reason: str


@dataclass(frozen=True)
class NewSessionRequested(Event):
    """Server handshake: the client asks for a new session."""

    #: Negotiated protocol version.
    version: int


@dataclass(frozen=True)
class ResumeRequested(Event):
    """Server handshake: the client asks to resume a session (proof not yet checked)."""

    #: Session id (16 bytes).
    session_id: bytes
    #: HMAC proof of the session secret over both nonces.
    proof: bytes
    #: Stream offset up to which the client has received the server's bytes.
    received: int


@dataclass(frozen=True)
class HandshakeFailed(Event):
    """Server handshake: malformed or unexpected input; the connection must be closed."""

    #: Why, for the log.
    reason: str
