"""An independent server of the icafast wire protocol, written only from docs/PROTOCOL.md.

The server below (frame decoding and validation, the handshake with HELLO, NEW, RESUME, ACCEPT
and REJECT, the resume proof and secret rotation with the pending-secret rule, acknowledgements,
the replay buffer and its rewind, keepalive PINGs, CLOSE) deliberately imports nothing from
``icafast``: it exists to check that the document is precise enough for a second implementation
of the server side, and that the project's client conforms to it. The frame codec, CRC32C and
proof helpers are those of the independent client in test_protocol_spec.py, itself written only
from the document. Each session is relayed to an in-process echo backend (the session's
received stream, as its sink takes it, is its send stream; its end of stream is echoed as FIN).

The server checks every frame the client sends against the document (header checks 2.6, the
handshake rules 3.5, ack validity 4.5, the seq/gap rules 4.3, PONG seq 5, CLOSE codes 6.4) and
records each violation; every test fails on any. The tests drive the project's real client
(``icafast.aio.open_session``) over loopback TCP (plain frames, no TLS); only the test setup uses
``icafast``. Section numbers in comments refer to docs/PROTOCOL.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import random
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from relay_helpers import run_async, wait_for
from test_protocol_spec import (
    ACCEPT,
    ACCEPT_FIELDS,
    ACK,
    CLOSE,
    DATA,
    FIN,
    HEADER,
    HEADER_SIZE,
    HELLO,
    HELLO_FIELDS,
    MAGIC,
    NEW,
    PING,
    PONG,
    REJECT,
    RESUME,
    TYPES,
    U64_MAX,
    Frame,
    crc32c,
    encode,
    proof_of,
    rotated,
)

# --------------------------------------------------------------------------------------------
# The server: nothing here comes from icafast.
# --------------------------------------------------------------------------------------------

MAX_PAYLOAD = 16384  # our decoder limit, announced in HELLO (2.5): the client must cut to it
REPLAY_LIMIT = 256 * 1024  # our replay limit, announced in HELLO and ACCEPT (4.7)
FRAME_SIZE = 8192  # the DATA frames we send
ACK_DELAY = 0.2  # 4.4
HANDSHAKE_TIMEOUT = 2.0  # 3.5, local
RESUME_SETTLE = 0.01  # a pause before ACCEPT, so that bytes a client sends too early arrive


class Violation(Exception):
    """The client broke a rule of the document (a frame or protocol error on our side)."""


class LinkGone(Exception):
    """The link is closed, reset or broken by us; its task ends."""


@dataclass
class Policy:
    """Section 5: the server's values, sent in every ACCEPT (3.1), in milliseconds."""

    keepalive_ms: int = 500
    dead_ms: int = 2000
    reliability_ms: int = 20_000
    hold_ms: int = 3_600_000
    on_timeout: int = 0  # 0 = reset, 1 = disconnect

    def accept_payload(self, sid: bytes, resumed: int) -> bytes:
        return ACCEPT_FIELDS.pack(sid, resumed, self.on_timeout, 0, self.keepalive_ms,
                                  self.dead_ms, self.reliability_ms, self.hold_ms, REPLAY_LIMIT)


def code_reason(code: int, reason: str) -> bytes:
    """REJECT/CLOSE payload (3.1)."""
    return struct.pack(">H", code) + reason.encode()[:256]


def split_frames(data: bytes) -> list[Frame]:
    """Whole frames in ``data`` (unchecked; for looking at what a silent link buffered)."""
    frames = []
    pos = 0
    for _ in range(100_000):
        if len(data) - pos < HEADER_SIZE:
            break
        ftype, flags, _res, length, seq, ack, _crc = HEADER.unpack_from(data, pos)
        end = pos + HEADER_SIZE + length
        if end > len(data):
            break
        frames.append(Frame(ftype, flags, seq, ack, bytes(data[pos + HEADER_SIZE:end])))
        pos = end
    return frames


class Session:
    """One session (section 1): the client->server stream, taken by the echo, and the
    server->client stream with its replay buffer; at most one link."""

    def __init__(self, server: SpecServer, sid: bytes, secret: bytes) -> None:
        self.server = server
        self.sid = sid
        self.first_secret = secret
        self.secret = secret  # 3.4: current
        self.pending: bytes | None = None  # 3.4: pending, until the client speaks on the link
        self.verified: list[tuple[str, bytes]] = []  # per resume: which secret proved it
        self.link: ServerLink | None = None
        self.links: list[ServerLink] = []
        # server->client (4.2, 4.5): tx holds offsets [peer_ack, tx_end)
        self.tx = bytearray()
        self.peer_ack = 0
        self.tx_end = 0
        self.tx_sent = 0  # furthest offset ever sent, the FIN counts
        self.fin_queued = False
        self.fin_sent_at: float | None = None
        self.fin_acked_at: float | None = None
        # client->server (4.3)
        self.rx = 0
        self.rx_fin = False
        self.received = bytearray()  # everything delivered, in order
        self.backlog = bytearray()  # delivered, not yet taken by the echo
        self.sunk = 0  # offset the echo (our sink) has taken, +1 for the FIN: our ack (4.4)
        self.last_ack_sent = 0
        self.ack_deadline: float | None = None
        self.duplicates = 0  # bytes trimmed (4.3)
        self.close_code: int | None = None
        self.client_close: tuple[int, str] | None = None
        self.ended = asyncio.Event()
        self._expiry: asyncio.TimerHandle | None = None

    # ---- frames from the client on an established link -------------------------------------

    def on_frame(self, link: ServerLink, f: Frame) -> None:
        if not link.spoke:  # 3.4: the first frame on the new link makes the pending secret
            link.spoke = True  # the only one
            if self.pending is not None:
                self.secret, self.pending = self.pending, None
        if f.ack != self.peer_ack:  # 4.5, before acting on the type
            fin = 1 if self.fin_queued else 0
            high = min(self.tx_end + fin, max(self.tx_sent, self.peer_ack))
            if not self.peer_ack <= f.ack <= high:
                raise Violation(f"4.5: ack {f.ack} outside [{self.peer_ack}, {high}] "
                                f"(frame type {f.type:#x})")
            self.acked(link, f.ack)
        if f.type == DATA:
            self._data(f)
        elif f.type == ACK:
            if f.seq or f.payload:
                raise Violation("2.4: ACK with seq != 0 or a payload")
        elif f.type == PING:
            if f.payload:
                raise Violation("2.4: PING with a payload")
            link.client_pings += 1
            link.send_frame(PONG, seq=f.seq)  # 5: at once, seq copied
        elif f.type == PONG:
            if f.payload:
                raise Violation("2.4: PONG with a payload")
            if f.seq not in link.ping_seqs:
                raise Violation(f"5: PONG seq {f.seq:#x} copied from no PING of ours")
            if f.seq == link.last_ping_seq:
                link.pongs += 1
        elif f.type == CLOSE:
            if f.seq:
                raise Violation("2.4: CLOSE with seq != 0")
            if len(f.payload) < 2:
                raise Violation("3.1: CLOSE payload shorter than 2 bytes")
            (code,) = struct.unpack_from(">H", f.payload)
            if code in (0, 3, 6):
                raise Violation(f"6.4: the client sent CLOSE {code}")
            self.client_close = (code, f.payload[2:258].decode("utf-8", "replace"))
            self.end(code)  # 6.4: the receiver ends the session at once, closes the link
        else:
            raise Violation(f"3.5: handshake frame {f.type:#x} on an established link")

    def acked(self, link: ServerLink, ack: int) -> None:
        """Free acknowledged bytes; an ack past the send position moves it up (4.5)."""
        freed = min(ack, self.tx_end) - self.peer_ack
        if freed > 0:
            del self.tx[:freed]
        self.peer_ack = ack
        link.tx_pos = max(link.tx_pos, ack)
        if self.fin_queued and ack == self.tx_end + 1 and self.fin_acked_at is None:
            self.fin_acked_at = link.loop.time()

    def _data(self, f: Frame) -> None:
        """4.3"""
        s, n, fin = f.seq, len(f.payload), 1 if f.flags & FIN else 0
        if s > self.rx:
            raise Violation(f"4.3: gap, seq {s} > rx {self.rx}")
        if s + n + fin > U64_MAX:
            raise Violation("4.3: past the last offset")
        if self.rx_fin:
            if s + n + fin > self.rx:
                raise Violation("4.3: data after end of stream")
            self.duplicates += n
            return
        if fin and s + n < self.rx:
            # not covered by 4.3: a FIN below bytes already received
            raise Violation(f"4.1: FIN at {s + n} below received offset {self.rx}")
        if s + n > self.rx:
            new = f.payload[self.rx - s:]
            self.received += new
            self.backlog += new
            self.duplicates += self.rx - s
            self.rx = s + n
        else:
            self.duplicates += n
        if fin and s + n == self.rx:
            self.rx_fin = True
            self.rx += 1

    # ---- the echo backend and sending -------------------------------------------------------

    def pump_echo(self) -> None:
        """The echo takes received bytes while our replay buffer has room (4.7); once it has
        taken the client's FIN it half-closes back (our FIN)."""
        n = min(REPLAY_LIMIT - len(self.tx), len(self.backlog))
        if n > 0:
            self.tx += self.backlog[:n]
            del self.backlog[:n]
            self.tx_end += n
            self.sunk += n
        if self.rx_fin and not self.backlog and not self.fin_queued:
            self.fin_queued = True
            self.sunk += 1

    def flush(self) -> None:
        """Send everything from the link's send position (4.2): DATA in offset order, FIN."""
        link = self.link
        if link is None or not link.up or link.silent:
            return
        size = min(FRAME_SIZE, link.peer_max_payload)
        for _ in range(1_000_000):
            if link.tx_pos >= self.tx_end:
                break
            n = min(size, self.tx_end - link.tx_pos)
            start = link.tx_pos - self.peer_ack
            fin = 1 if self.fin_queued and link.tx_pos + n == self.tx_end else 0
            link.send_frame(DATA, bytes(self.tx[start:start + n]), seq=link.tx_pos,
                            flags=FIN if fin else 0)
            link.tx_pos += n + fin
        if self.fin_queued and link.tx_pos == self.tx_end:
            link.send_frame(DATA, seq=self.tx_end, flags=FIN)
            link.tx_pos += 1
        if self.fin_queued and link.tx_pos > self.tx_end and self.fin_sent_at is None:
            self.fin_sent_at = link.loop.time()
        self.tx_sent = max(self.tx_sent, link.tx_pos)

    def after_read(self, link: ServerLink, now: float) -> None:
        """After the frames of one read: echo, send, end gracefully, acknowledge (4.4, 6.4)."""
        self.pump_echo()
        self.flush()
        if self.close_code is not None:
            return
        if self.rx_fin and self.fin_queued and self.peer_ack == self.tx_end + 1:
            # 6.4: the client's FIN received, ours acknowledged: CLOSE 0
            if self.server.lose_close0:  # as if the link broke just before it
                link.out.clear()
                self.end(0)
                link.abort()
                return
            link.send_frame(CLOSE, code_reason(0, "done"))
            self.end(0)
            return
        threshold = min(256 * 1024, link.peer_replay_limit // 4)
        if self.sunk - self.last_ack_sent >= threshold or (
                self.ack_deadline is not None and now >= self.ack_deadline
                and self.sunk != self.last_ack_sent):
            link.send_frame(ACK)
        elif self.sunk != self.last_ack_sent and self.ack_deadline is None:
            self.ack_deadline = now + ACK_DELAY

    # ---- lifecycle (6) ----------------------------------------------------------------------

    def end(self, code: int) -> None:
        """CLOSED: forget the session, keep a tombstone (6.5)."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.server.sessions.pop(self.sid, None)
        self.server.tombstones.add(self.sid)
        if self._expiry is not None:
            self._expiry.cancel()
        self.ended.set()

    def link_lost(self, link: ServerLink) -> None:
        """6.2: the reliability timeout starts."""
        if self.link is not link:
            return
        self.link = None
        if self.close_code is None:
            delay = self.server.policy.reliability_ms / 1000
            self._expiry = link.loop.call_later(delay, self._expired)

    def _expired(self) -> None:
        if self.link is None:
            if self.server.policy.on_timeout == 0:
                self.end(3)
            else:
                self._expiry = asyncio.get_running_loop().call_later(
                    self.server.policy.hold_ms / 1000, self._expired_hold)

    def _expired_hold(self) -> None:
        if self.link is None:
            self.end(3)

    def attached(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None


class ServerLink(asyncio.Protocol):
    """One accepted TCP connection carrying frames; its task runs the handshake, then the
    established link."""

    def __init__(self, server: SpecServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.index = len(server.links)
        self.transport: Any = None
        self.buf = bytearray()
        self.wake = asyncio.Event()
        self.gone = False
        self.gone_at: float | None = None
        self.up = False  # established
        self.silent = False  # neither reads frames nor writes (test control)
        self.silent_reads: list[tuple[float, int]] = []
        self.spoke = False  # the client sent a frame on the established link
        self.session: Session | None = None
        self.out: list[bytes] = []  # frames written at the end of a read
        now = self.loop.time()
        self.last_rx = self.last_heard = self.last_ping = self.last_write = now
        self.last_ping_seq: int | None = None
        self.ping_seqs: set[int] = set()
        self.pings_sent = 0
        self.pongs = 0
        self.client_pings = 0
        self.client_nonce = b""
        self.server_nonce = b""
        self.peer_max_payload = 0
        self.peer_replay_limit = 0
        self.tx_pos = 0
        self.frames: list[Frame] = []  # every frame received once established (payload kept)
        self.handshake: list[Frame] = []
        self.resume_ack: int | None = None
        self.accept_ack: int | None = None
        self.replayed = 0  # bytes we sent again after the rewind (4.6)
        self.lost_in = 0  # at a break by us: bytes received and dropped unprocessed
        self.lost_out = 0  # at a break by us: frames dropped unsent
        self.held_hello = False  # our HELLO went with the ACCEPT/REJECT (NEW came with HELLO)
        self.task: asyncio.Task[None] | None = None

    # ---- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # uvloop's is no asyncio.Transport
        self.transport = transport
        self.server.links.append(self)
        self.task = self.loop.create_task(self.run())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.last_rx = self.loop.time()
        if self.silent:
            self.silent_reads.append((self.last_rx, len(data)))
        self.wake.set()

    def eof_received(self) -> bool | None:
        self._gone()
        return None  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()

    def _gone(self) -> None:
        if not self.gone:
            self.gone = True
            self.gone_at = self.loop.time()
        self.wake.set()

    # ---- output -----------------------------------------------------------------------------

    def send_frame(self, ftype: int, payload: bytes = b"", seq: int = 0, flags: int = 0) -> None:
        """Queue a frame of the established link; every one carries our ack (4.2)."""
        s = self.session
        assert s is not None
        self.out.append(encode(ftype, payload, seq=seq, ack=s.sunk, flags=flags))
        s.last_ack_sent = s.sunk
        s.ack_deadline = None

    def write_out(self) -> None:
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.out))
            self.last_write = self.loop.time()
        self.out.clear()

    def abort(self) -> None:
        """Break the link with RST (SO_LINGER 0): what was not yet sent is lost."""
        self.up = False
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
        self._gone()

    def close(self) -> None:
        """Close after what is written (FIN)."""
        self.up = False
        if self.transport is not None:
            self.transport.close()
        self._gone()

    def reject(self, code: int, reason: str, before: bytes = b"") -> None:
        """3.5: REJECT, then close."""
        self.server.rejects.append(code)
        assert self.transport is not None
        self.transport.write(before + encode(REJECT, code_reason(code, reason)))
        self.close()

    # ---- input ------------------------------------------------------------------------------

    async def _wait(self, timeout: float) -> None:
        if self.gone or self.wake.is_set():
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.wake.wait(), max(timeout, 0.001))

    def take_frame(self) -> Frame | None:
        """The next whole frame in the buffer, checked in the order of 2.6 (header checks as
        soon as the header is there), or None."""
        buf = self.buf
        if len(buf) < HEADER_SIZE:
            return None
        ftype, flags, reserved, length, seq, ack, crc = HEADER.unpack_from(buf)
        if ftype not in TYPES:
            raise Violation(f"2.6: frame error 1, type {ftype:#x}")
        if reserved != 0:
            raise Violation("2.6: frame error 2, reserved != 0")
        if flags & ~(FIN if ftype == DATA else 0):
            raise Violation(f"2.6: frame error 3, flags {flags:#x} on type {ftype:#x}")
        if length > MAX_PAYLOAD:
            raise Violation(f"2.5/2.6: frame error 4, length {length} > {MAX_PAYLOAD}")
        end = HEADER_SIZE + length
        if len(buf) < end:
            return None
        payload = bytes(buf[HEADER_SIZE:end])
        if crc32c(bytes(buf[:24]) + payload) != crc:
            raise Violation("2.6: frame error 5, checksum")
        del buf[:end]
        return Frame(ftype, flags, seq, ack, payload)

    async def _next_frame(self, deadline: float) -> Frame:
        for _ in range(100_000):
            f = self.take_frame()
            if f is not None:
                self.handshake.append(f)
                return f
            if self.gone:
                raise LinkGone
            left = deadline - self.loop.time()
            if left <= 0:
                raise Violation("3.5: handshake timeout")
            self.wake.clear()
            await self._wait(left)
        raise Violation("handshake: too many wake-ups")

    # ---- the link's task --------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._handshake()
            if self.up:
                await self._established()
        except LinkGone:
            pass
        except Violation as exc:
            self.server.violations.append(f"link {self.index}: {exc}")
            if self.up or self.session is not None:
                self.abort()  # 2.6: the link, never the session
            elif not self.gone:
                self.reject(7, str(exc)[:200])  # 3.5
        finally:
            self.up = False
            if self.session is not None:
                self.session.link_lost(self)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    async def _handshake(self) -> None:
        """3.1, 3.2, 3.3, 3.5 (server)."""
        srv = self.server
        deadline = self.loop.time() + HANDSHAKE_TIMEOUT
        for _ in range(1000):
            if self.buf or self.gone:
                break
            self.wake.clear()
            await self._wait(deadline - self.loop.time())
            if self.loop.time() >= deadline:
                raise Violation("3.5: handshake timeout before the first byte")
        if not self.buf:
            raise LinkGone
        if self.buf[0] != HELLO:  # early check
            raise Violation(f"3.5: first byte {self.buf[0]:#x}")
        hello = await self._next_frame(deadline)
        if hello.seq or hello.ack:
            raise Violation("2.4: HELLO with seq/ack != 0")
        if len(hello.payload) < 56:
            raise Violation("3.1: HELLO shorter than 56 bytes")
        magic, vmin, vmax, max_payload, limit = HELLO_FIELDS.unpack_from(hello.payload)
        if magic != MAGIC or max_payload < 1024 or limit < 1024:
            raise Violation("3.1: HELLO magic or limits")
        self.client_nonce = hello.payload[24:56]
        if self.client_nonce in srv.nonces:
            raise Violation("3.1: client nonce used before")
        srv.nonces.add(self.client_nonce)
        if not vmin <= 1 <= vmax:
            srv.violations.append(f"link {self.index}: 3.1: client versions {vmin}..{vmax}")
            self.reject(1, "no common version")
            raise LinkGone
        if srv.reject_version:  # instead of our HELLO (3.2)
            self.reject(1, "version 1 is not spoken here")
            raise LinkGone
        self.peer_max_payload, self.peer_replay_limit = max_payload, limit
        self.server_nonce = os.urandom(32)
        our_hello = encode(HELLO, HELLO_FIELDS.pack(MAGIC, 1, 1, MAX_PAYLOAD, REPLAY_LIMIT)
                           + self.server_nonce)
        held = b""
        if srv.hold_hello and len(self.buf) >= 1 and self.buf[0] == NEW:
            held = our_hello  # 3.5: MAY hold it and send it with the answer to the NEW
            self.held_hello = True
        else:
            assert self.transport is not None
            self.transport.write(our_hello)  # goes at once
        req = await self._next_frame(deadline)
        if req.type == NEW:
            await self._new(req, held)
        elif req.type == RESUME:
            await self._resume(req)
        else:
            raise Violation(f"3.5: second frame type {req.type:#x}, not NEW or RESUME")

    async def _settled(self) -> None:
        """3.5: NEW/RESUME MUST be the last frame before ACCEPT."""
        await asyncio.sleep(RESUME_SETTLE)
        if self.gone:
            raise LinkGone
        if self.buf:
            raise Violation(f"3.5: {len(self.buf)} bytes sent after NEW/RESUME before ACCEPT")

    async def _new(self, req: Frame, held: bytes) -> None:
        srv = self.server
        if len(req.payload) not in (0, 16) or req.seq or req.ack:
            raise Violation("3.1/2.4: NEW payload neither empty nor 16 bytes, or seq/ack != 0")
        srv.new_tokens.append(req.payload)
        await self._settled()
        if srv.lose_accepts:  # as if the link broke with our ACCEPT on the way (3.2)
            srv.lose_accepts -= 1
            self.abort()
            raise LinkGone
        if srv.reject_new is not None:
            self.reject(srv.reject_new, "refused by the test", before=held)
            raise LinkGone
        # the backend (the echo) is "connected" before ACCEPT
        sid, secret = os.urandom(16), os.urandom(32)
        session = Session(srv, sid, secret)
        srv.sessions[sid] = session
        srv.all_sessions.append(session)
        self.session = session
        session.link = self
        session.links.append(self)
        self.up = True
        self.accept_ack = 0
        assert self.transport is not None
        self.transport.write(held + encode(ACCEPT, srv.policy.accept_payload(sid, 0) + secret))
        self.last_write = self.loop.time()

    async def _resume(self, req: Frame) -> None:
        """3.3, 3.4, 3.5 (RESUME, checked in the order given there), 4.6."""
        srv = self.server
        if len(req.payload) != 48 or req.seq:
            raise Violation("3.1: RESUME payload not 48 bytes, or seq != 0")
        sid, proof, ack = req.payload[:16], req.payload[16:48], req.ack
        self.resume_ack = ack
        await self._settled()
        if srv.reject_resume:
            self.reject(srv.reject_resume.pop(0), "refused by the test")
            raise LinkGone
        if sid in srv.tombstones:
            self.reject(4, "session closed")
            raise LinkGone
        session = srv.sessions.get(sid)
        if session is None:
            srv.violations.append(f"link {self.index}: RESUME of a session never opened")
            self.reject(2, "unknown session")
            raise LinkGone
        verified = None
        for name, key in (("current", session.secret), ("pending", session.pending)):
            if key is not None and hmac.compare_digest(
                    proof, proof_of(key, sid, self.client_nonce, self.server_nonce)):
                verified = (name, key)
                break
        if verified is None:
            srv.violations.append(f"link {self.index}: 3.4: proof verifies with no secret")
            self.reject(3, "bad proof")
            raise LinkGone
        fin = 1 if session.fin_queued else 0
        high = min(session.tx_end + fin, max(session.tx_sent, session.peer_ack))
        if not session.peer_ack <= ack <= high:  # 3.1, 4.5
            srv.violations.append(f"link {self.index}: 4.5: RESUME ack {ack} outside "
                                  f"[{session.peer_ack}, {high}]")
            self.reject(7, "invalid offset")
            raise LinkGone
        old = session.link
        if old is not None:  # takeover
            session.link = None
            old.abort()
        session.verified.append(verified)
        session.secret = verified[1]  # 3.4: current = the one that verified, pending = secret'
        session.pending = rotated(verified[1], self.client_nonce, self.server_nonce)
        session.attached()
        self.session = session
        session.link = self
        session.links.append(self)
        self.replayed = max(0, session.tx_sent - ack)
        self.tx_pos = ack  # 4.6: rewind to the client's received offset
        session.acked(self, ack)
        self.accept_ack = session.sunk
        self.send_frame(ACCEPT, srv.policy.accept_payload(sid, 1))
        mode = srv.after_resume_accept.pop(0) if srv.after_resume_accept else None
        if mode == "lose":  # the ACCEPT is lost with the link
            self.out.clear()
            self.abort()
            raise LinkGone
        if mode is not None:  # "rst" / "fin": the ACCEPT goes, then the link breaks
            self.write_out()
            if mode == "rst":
                self.abort()
            else:
                self.close()
            raise LinkGone
        self.up = True
        session.flush()  # 4.6: the replay goes right after ACCEPT (here in the same write)
        self.write_out()

    async def _established(self) -> None:
        """4 and 5: frames in, echo, data and acks out, keepalive, dead link."""
        s = self.session
        assert s is not None
        policy = self.server.policy
        keepalive, dead = policy.keepalive_ms / 1000, policy.dead_ms / 1000
        self.last_heard = self.last_ping = self.loop.time()
        for _ in range(1_000_000):
            if self.silent:  # read (and keep) nothing, write nothing, keep the connection
                if self.gone:
                    raise LinkGone
                self.wake.clear()
                await self._wait(1.0)
                continue
            self.wake.clear()
            breaking = False
            heard = False
            for _ in range(100_000):
                f = self.take_frame()
                if f is None:
                    break
                self.frames.append(f)
                if not (f.type == PONG and f.seq == self.last_ping_seq):
                    heard = True  # 5: a lone PONG to our PING is not activity
                s.on_frame(self, f)
                if s.close_code is not None:
                    break
                # (only with part of a frame still unread, so that the break loses something
                # in flight; else the break waits for a later read)
                if len(self.buf) >= HEADER_SIZE and self.server.break_due(s):
                    breaking = True  # leave the rest of the read unprocessed
                    break
            if heard:
                self.last_heard = self.last_rx
            now = self.loop.time()
            if s.close_code is None:
                s.after_read(self, now)
            if breaking:  # as if the link broke here: both directions lose what is in flight
                self.server.breaks_done += 1
                self.lost_in, self.lost_out = len(self.buf), len(self.out)
                self.buf.clear()
                self.out.clear()
                self.abort()
                raise LinkGone
            self.write_out()
            if s.close_code is not None:
                self.close()  # 6.4: after CLOSE (sent or received) the link is closed
                raise LinkGone
            if self.gone or not self.up:
                raise LinkGone
            if now >= self.last_rx + dead:  # 5: dead link, RST, no frame
                self.server.dead_links += 1
                self.abort()
                raise LinkGone
            if now >= max(self.last_heard, self.last_ping) + keepalive:  # 5: server leads
                seq = int(now * 1_000_000) & U64_MAX
                self.send_frame(PING, seq=seq)
                self.ping_seqs.add(seq)
                self.last_ping_seq, self.last_ping = seq, now
                self.pings_sent += 1
                self.write_out()
            due = [self.last_rx + dead, max(self.last_heard, self.last_ping) + keepalive]
            if s.ack_deadline is not None:
                due.append(s.ack_deadline)
            await self._wait(min(due) - self.loop.time())
        raise Violation("too many wake-ups")


class SpecServer:
    """Listens on 127.0.0.1; the attributes below are the tests' controls and records."""

    def __init__(self, policy: Policy | None = None, *, reject_new: int | None = None,
                 reject_resume: list[int] | None = None, reject_version: bool = False,
                 hold_hello: bool = False, lose_close0: bool = False,
                 break_at: list[int] | None = None,
                 after_resume_accept: list[str] | None = None,
                 lose_accepts: int = 0) -> None:
        self.policy = policy or Policy()
        self.reject_new = reject_new
        self.reject_resume = list(reject_resume or [])
        self.reject_version = reject_version
        self.hold_hello = hold_hello
        self.lose_close0 = lose_close0
        self.break_at = list(break_at or [])  # break the link once rx reaches each offset
        self.after_resume_accept = list(after_resume_accept or [])
        self.lose_accepts = lose_accepts  # this many NEWs: ACCEPT written, then the link cut
        self.new_tokens: list[bytes] = []  # the payload of every NEW, in order
        self.sessions: dict[bytes, Session] = {}
        self.all_sessions: list[Session] = []
        self.tombstones: set[bytes] = set()
        self.links: list[ServerLink] = []
        self.violations: list[str] = []
        self.rejects: list[int] = []
        self.nonces: set[bytes] = set()
        self.breaks_done = 0
        self.dead_links = 0
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    def break_due(self, s: Session) -> bool:
        """Whether to break the link now (each offset of ``break_at`` is used once)."""
        if self.break_at and s.rx >= self.break_at[0]:
            self.break_at.pop(0)
            return True
        return False

    async def start(self) -> SpecServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: ServerLink(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def only_session(self) -> Session:
        assert len(self.all_sessions) == 1, self.all_sessions
        return self.all_sessions[0]

    def admin_close(self, s: Session, code: int, reason: str) -> None:
        """6.4: an abortive end from the server: CLOSE, then the link is closed."""
        link = s.link
        assert link is not None and link.up
        link.send_frame(CLOSE, code_reason(code, reason))
        link.write_out()
        s.end(code)
        link.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self.links:
            if not link.gone:
                link.abort()
        for s in self.all_sessions:
            if s._expiry is not None:
                s._expiry.cancel()
        tasks = [link.task for link in self.links if link.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)


# --------------------------------------------------------------------------------------------
# Test setup: the project's real client (public API only).
# --------------------------------------------------------------------------------------------


def client_config(**kw: float) -> Any:
    """The client's local settings. Its keepalive/dead values are far from the server's: the
    client must adopt those from ACCEPT (5)."""
    from icafast.protocol import Config

    base: dict[str, float] = {"keepalive_interval": 20.0, "dead_timeout": 40.0,
                              "handshake_timeout": 2.0, "reconnect_initial": 0.02,
                              "reconnect_max": 0.2, "connect_retry": 1.0}
    base.update(kw)
    return Config(**base)


@contextlib.asynccontextmanager
async def spec_server(policy: Policy | None = None, **kw: Any) -> AsyncIterator[SpecServer]:
    server = await SpecServer(policy, **kw).start()
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def real_client(server: SpecServer, events: list[Any], **kw: float) -> AsyncIterator[
        tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    from icafast.aio import open_session

    reader, writer = await open_session("127.0.0.1", server.port, config=client_config(**kw),
                                        on_status=lambda event, _engine: events.append(event))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 2.0)


@contextlib.asynccontextmanager
async def tcp_client(server: SpecServer, events: list[Any], **kw: float) -> AsyncIterator[
        tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """The client as ``icafast connect`` runs it: it listens on loopback, and the application
    connection (ours) is a TCP connection to it, which it can reset."""
    from icafast.aio import RelayClient

    client = RelayClient(("127.0.0.1", 0), ("127.0.0.1", server.port), client_config(**kw),
                         on_status=lambda event, _engine: events.append(event))
    await client.start()
    try:
        reader, writer = await asyncio.open_connection(*client.addresses[0])
        try:
            assert await wait_for(lambda: bool(server.all_sessions), 3.0)
            yield reader, writer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 2.0)
    finally:
        await client.close()


def app_connection(kind: str, server: SpecServer, events: list[Any], **kw: float) -> Any:
    return (real_client if kind == "stream" else tcp_client)(server, events, **kw)


def rst(writer: asyncio.StreamWriter) -> None:
    """Reset a TCP connection (SO_LINGER 0)."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
    writer.transport.abort()


def kinds(events: list[Any], name: str) -> list[Any]:
    return [e for e in events if type(e).__name__ == name]


def blob(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def read_exactly(reader: asyncio.StreamReader, n: int, timeout: float = 10.0) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), timeout)


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes,
                   chunk: int = 20_000, timeout: float = 10.0) -> bytes:
    """Write ``data`` in chunks while reading its echo; the echo."""
    echo = asyncio.ensure_future(read_exactly(reader, len(data), timeout))
    try:
        for i in range(0, len(data), chunk):
            writer.write(data[i:i + chunk])
            await writer.drain()
        return await echo
    finally:
        echo.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await echo


async def read_to_end(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[bytes, str]:
    """Everything up to the end of the stream, and how it ended: "eof" or "reset"."""
    got = bytearray()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for _ in range(100_000):
        try:
            b = await asyncio.wait_for(reader.read(65536), max(deadline - loop.time(), 0.001))
        except ConnectionError:
            return bytes(got), "reset"
        if not b:
            return bytes(got), "eof"
        got += b
    raise AssertionError("stream did not end")


def run(coro: Any, loop: str = "asyncio") -> None:
    run_async(loop, coro, timeout=30.0)


LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


# --------------------------------------------------------------------------------------------
# 1. A new session: data both ways, every client frame checked.
# --------------------------------------------------------------------------------------------


@LOOPS
@pytest.mark.parametrize("hold_hello", [False, True], ids=["hello-at-once", "hello-with-accept"])
def test_new_session_echo(loop: str, hold_hello: bool) -> None:
    async def main() -> None:
        events: list[Any] = []
        async with spec_server(hold_hello=hold_hello) as server, \
                real_client(server, events) as (reader, writer):
            s = server.only_session()
            assert len(server.links) == 1 and s.link is server.links[0] and s.link.up
            hs = server.links[0].handshake
            assert [f.type for f in hs] == [HELLO, NEW]  # 3.2
            # 3.5: the reference client sends NEW with its HELLO; then we may hold our HELLO,
            # and the client takes HELLO and ACCEPT from one read
            assert server.links[0].held_hello == hold_hello
            data = blob(1, 300_000)
            assert await exchange(reader, writer, data) == data
            assert bytes(s.received) == data and s.duplicates == 0
            # 4.4: the client acknowledges all the echo (our limit's threshold, or its delay)
            assert await wait_for(lambda: s.peer_ack == len(data), 2.0), (s.peer_ack, len(data))
            link = server.links[0]
            sizes = [len(f.payload) for f in link.frames if f.type == DATA]
            assert sum(sizes) == len(data) and max(sizes) <= MAX_PAYLOAD  # 2.5
            assert [type(e).__name__ for e in events][:1] == ["LinkUp"]
            assert not events[0].resumed
            assert server.violations == []
            assert len(server.links) == 1 and not kinds(events, "LinkLost")
    run(main(), loop)


# --------------------------------------------------------------------------------------------
# 2. Breaks by the server, resume, replay both ways, secret rotation.
# --------------------------------------------------------------------------------------------


@LOOPS
def test_server_breaks_and_client_resumes(loop: str) -> None:
    async def main() -> None:
        events: list[Any] = []
        async with spec_server(break_at=[60_000, 250_000]) as server, \
                real_client(server, events) as (reader, writer):
            s = server.only_session()
            data = blob(2, 400_000)
            assert await exchange(reader, writer, data, timeout=10.0) == data
            assert bytes(s.received) == data, "client stream lost, duplicated or reordered"
            assert server.breaks_done == 2
            links = server.links
            assert len(links) == 3 and s.link is links[2] and links[2].up
            for broken, new in ((links[0], links[1]), (links[1], links[2])):
                # both directions had something in flight, lost with the link
                assert broken.lost_in > 0 and broken.lost_out > 0
                assert [f.type for f in new.handshake] == [HELLO, RESUME]
                assert new.replayed > 0  # we sent again what the client had not received
                # 4.6: the client rewinds to our received offset and sends from there
                first = next(f for f in new.frames if f.type == DATA)
                assert first.seq == new.accept_ack
            # 3.4: the first resume is proven with the session's secret, the second with the
            # secret rotated on the first resume's link (the client spoke there, so the
            # pending secret had become the only one)
            s0 = s.first_secret
            s1 = rotated(s0, links[1].client_nonce, links[1].server_nonce)
            assert s.verified == [("current", s0), ("current", s1)]
            # the client has spoken on link 2: the secret rotated there is the only one
            assert s.pending is None
            assert s.secret == rotated(s1, links[2].client_nonce, links[2].server_nonce)
            ups = kinds(events, "LinkUp")
            assert [e.resumed for e in ups] == [False, True, True]
            assert all(e.replayed > 0 for e in ups[1:])  # the client re-sent what we lost
            assert len(kinds(events, "LinkLost")) == 2
            assert server.violations == []
    run(main(), loop)


@pytest.mark.parametrize("mode", ["lose", "fin", "rst"])
def test_break_right_after_resume_accept(mode: str) -> None:
    """3.4: the link breaks right after the ACCEPT of a resume, before the client sent
    anything on it. "lose": the ACCEPT never reaches the client, which must prove with the
    old (current) secret; "fin": it does, the client must prove with the rotated (pending)
    one; "rst": either (an RST may discard it)."""
    async def main() -> None:
        events: list[Any] = []
        async with spec_server(break_at=[40_000, 200_000], after_resume_accept=[mode]) \
                as server, real_client(server, events) as (reader, writer):
            s = server.only_session()
            data = blob(3, 300_000)
            assert await exchange(reader, writer, data, timeout=10.0) == data
            assert bytes(s.received) == data
            links = server.links
            # link 0 broken mid-stream; link 1 broken right after ACCEPT; link 2 resumed;
            # link 2 broken mid-stream; link 3 resumed
            assert len(links) == 4 and s.link is links[3]
            assert not links[1].spoke and links[1].accept_ack is not None
            s0 = s.first_secret
            s1 = rotated(s0, links[1].client_nonce, links[1].server_nonce)
            assert s.verified[0] == ("current", s0)
            if mode == "lose":
                assert s.verified[1] == ("current", s0)
            elif mode == "fin":
                assert s.verified[1] == ("pending", s1)
            else:
                assert s.verified[1] in (("current", s0), ("pending", s1))
            # the client rotated exactly when it took the ACCEPT (and reported the link up)
            saw_accept = s.verified[1][0] == "pending"
            ups = [e.resumed for e in kinds(events, "LinkUp")]
            assert ups == [False, True, True, True] if saw_accept else [False, True, True]
            # rotation starts again from the secret that verified the proof
            s2 = rotated(s.verified[1][1], links[2].client_nonce, links[2].server_nonce)
            assert s.verified[2] == ("current", s2)
            assert server.violations == []
    run(main())


# --------------------------------------------------------------------------------------------
# 3. Keepalive and liveness.
# --------------------------------------------------------------------------------------------


def test_keepalive_pings_answered() -> None:
    """5: the server PINGs every keepalive interval of receive-idle time; the client answers
    each with a PONG whose seq is copied, and (hearing our PINGs) sends no PING itself."""
    async def main() -> None:
        events: list[Any] = []
        async with spec_server(Policy(keepalive_ms=100, dead_ms=600)) as server, \
                real_client(server, events) as (reader, writer):
            assert await exchange(reader, writer, b"abc") == b"abc"
            link = server.links[0]
            await asyncio.sleep(0.7)  # past the dead timeout
            assert link.pings_sent >= 5
            assert link.pongs >= link.pings_sent - 1  # the last PONG may still be on its way
            assert link.client_pings == 0
            pongs = [f for f in link.frames if f.type == PONG]
            assert all(f.seq in link.ping_seqs for f in pongs)
            assert link.up and len(server.links) == 1 and not kinds(events, "LinkLost")
            assert server.dead_links == 0  # the PONGs kept our side of the link alive
            assert server.violations == []
    run(main())


def test_silent_server_declared_dead() -> None:
    """5: a server that goes silent (the TCP connection stays) is declared dead by the client
    at the dead timeout from ACCEPT (not its local one); before that it PINGs halfway between
    keepalive and dead timeout; then it resumes on a new link."""
    async def main() -> None:
        events: list[Any] = []
        policy = Policy(keepalive_ms=100, dead_ms=500)
        async with spec_server(policy) as server, \
                real_client(server, events) as (reader, writer):
            s = server.only_session()
            assert await exchange(reader, writer, b"x" * 1000) == b"x" * 1000
            await asyncio.sleep(0.25)  # a PING or two crossed
            link = server.links[0]
            link.silent = True
            t0 = link.last_write
            assert await wait_for(lambda: link.gone, 3.0)
            assert link.gone_at is not None
            took = link.gone_at - t0
            assert 0.45 <= took <= 0.5 + 0.4, took
            frames = split_frames(bytes(link.buf))
            pings = [f for f in frames if f.type == PING]
            assert len(pings) >= 1, [f.type for f in frames]
            first = link.silent_reads[0][0] - t0  # (100 + 500) / 2 ms after our last frame
            assert 0.25 <= first <= 0.5, first
            assert await wait_for(lambda: s.link is not None and s.link.up, 3.0)
            more = blob(4, 20_000)
            assert await exchange(reader, writer, more) == more
            assert bytes(s.received) == b"x" * 1000 + more
            assert len(kinds(events, "LinkLost")) == 1
            assert server.violations == []
    run(main())


# --------------------------------------------------------------------------------------------
# 4. REJECT.
# --------------------------------------------------------------------------------------------


def test_new_repeated_with_its_token_after_a_lost_accept() -> None:
    """3.1/3.2/6.3: a NEW whose link broke before its ACCEPT arrived is tried again on a new
    link with the same 16-byte token, and the session then opens."""
    async def main() -> None:
        events: list[Any] = []
        async with spec_server(lose_accepts=2) as server, \
                real_client(server, events, connect_retry=5.0) as (reader, writer):
            assert await exchange(reader, writer, b"after two lost ACCEPTs") == \
                b"after two lost ACCEPTs"
            tokens = server.new_tokens
            assert len(tokens) == 3 and len(tokens[0]) == 16 and len(set(tokens)) == 1, tokens
            assert len(server.all_sessions) == 1 and server.violations == []
        # a second session asks with a token of its own
        async with spec_server() as server, real_client(server, []) as _:
            assert len(server.new_tokens) == 1 and server.new_tokens[0] not in tokens
    run(main())


@pytest.mark.parametrize("code", [1, 5, 6, 7, 8])
def test_reject_new_ends_session(code: int) -> None:
    """3.6/6.3: a REJECT on the first link ends the session at once (no retry); 1 goes
    instead of the server's HELLO, the others after it."""
    async def main() -> None:
        from icafast.aio import open_session

        events: list[Any] = []
        kw: dict[str, Any] = {"reject_version": True} if code == 1 else {"reject_new": code}
        async with spec_server(**kw) as server:
            with pytest.raises(ConnectionError):
                await open_session("127.0.0.1", server.port, config=client_config(),
                                   on_status=lambda event, _engine: events.append(event))
            rejected = kinds(events, "HandshakeRejected")
            assert [e.code for e in rejected] == [code]
            await asyncio.sleep(0.15)  # reconnect_initial is 20 ms: a retry would come
            assert len(server.links) == 1 and server.rejects == [code]
            assert server.violations == []
    run(main())


@pytest.mark.parametrize(("code", "kind"), [
    (2, "tcp"), (3, "tcp"), (4, "tcp"), (7, "tcp"), (2, "stream")])
def test_reject_resume_ends_session(code: int, kind: str) -> None:
    """3.6: REJECT 2, 3, 7 and 4 (both FINs not exchanged) to a RESUME end the session;
    6.1: the application connection is closed, with RST (not a graceful end)."""
    async def main() -> None:
        events: list[Any] = []
        async with spec_server(break_at=[50_000], reject_resume=[code]) as server, \
                app_connection(kind, server, events) as (reader, writer):
            data = blob(5, 100_000)
            for i in range(0, len(data), 20_000):
                writer.write(data[i:i + 20_000])
            got, how = await read_to_end(reader)
            assert data.startswith(got)
            closed = kinds(events, "SessionClosed")
            assert len(closed) == 1 and not closed[0].graceful
            assert [e.code for e in kinds(events, "HandshakeRejected")] == [code]
            await asyncio.sleep(0.15)  # no further attempt
            assert len(server.links) == 2 and server.rejects == [code]
            assert server.violations == []
            assert how == "reset", how
            assert server.violations == []
    run(main())


def test_reject_busy_on_resume_is_retried() -> None:
    """3.6/6.3: REJECT 5 (and 8, "as 5") to a RESUME is a failed attempt: the client tries
    again, and resumes."""
    async def main() -> None:
        events: list[Any] = []
        async with spec_server(break_at=[50_000], reject_resume=[5, 8]) as server, \
                real_client(server, events) as (reader, writer):
            s = server.only_session()
            data = blob(6, 150_000)
            assert await exchange(reader, writer, data) == data
            assert bytes(s.received) == data
            assert server.rejects == [5, 8] and len(server.links) == 4
            assert [e.resumed for e in kinds(events, "LinkUp")] == [False, True]
            assert not kinds(events, "SessionClosed")
            assert server.violations == []
    run(main())


# --------------------------------------------------------------------------------------------
# 5. Ending a session.
# --------------------------------------------------------------------------------------------


@LOOPS
def test_graceful_end(loop: str) -> None:
    """6.4: the client half-closes; the echo half-closes back; the client acknowledges our FIN
    at once (its own FIN is out, 4.4); we send CLOSE 0; its session ends gracefully and the
    application reads every byte, then EOF."""
    async def main() -> None:
        events: list[Any] = []
        async with spec_server(Policy(keepalive_ms=3000, dead_ms=6000)) as server, \
                real_client(server, events) as (reader, writer):
            s = server.only_session()
            data = blob(7, 80_000)
            writer.write(data)
            await writer.drain()
            writer.write_eof()
            got, how = await read_to_end(reader)
            assert got == data and how == "eof"
            assert await wait_for(lambda: bool(kinds(events, "SessionClosed")), 2.0)
            closed = kinds(events, "SessionClosed")
            assert len(closed) == 1 and closed[0].graceful and closed[0].code == 0
            assert s.close_code == 0 and s.rx_fin and bytes(s.received) == data
            assert s.fin_sent_at is not None and s.fin_acked_at is not None
            assert s.fin_acked_at - s.fin_sent_at < ACK_DELAY / 2  # not the ack delay
            link = server.links[0]
            assert await wait_for(lambda: link.gone, 2.0)
            assert len(server.links) == 1 and s.client_close is None
            assert server.violations == []
    run(main(), loop)


def test_graceful_end_close_lost_then_reject_closed() -> None:
    """6.4/6.5/3.6: both FINs exchanged, but the link breaks before CLOSE 0 reaches the
    client; it resumes, gets REJECT 4 (tombstone) and ends gracefully."""
    async def main() -> None:
        events: list[Any] = []
        async with spec_server(Policy(keepalive_ms=3000, dead_ms=6000), lose_close0=True) \
                as server, real_client(server, events) as (reader, writer):
            s = server.only_session()
            data = blob(8, 30_000)
            writer.write(data)
            writer.write_eof()
            got, how = await read_to_end(reader)
            assert got == data and how == "eof"
            assert await wait_for(lambda: bool(kinds(events, "SessionClosed")), 3.0)
            closed = kinds(events, "SessionClosed")
            assert len(closed) == 1 and closed[0].graceful
            assert server.rejects == [4] and len(server.links) == 2
            assert s.close_code == 0
            assert server.violations == []
    run(main())


@pytest.mark.parametrize(("code", "kind"), [
    (2, "tcp"), (5, "tcp"), (2, "stream"), (0, "tcp"), (0, "stream")])
def test_abortive_close_from_server(code: int, kind: str) -> None:
    """6.4: CLOSE 2 (ADMIN) or 5 (SHUTDOWN): the client ends the session at once, resets the
    application connection, closes the link and does not reconnect. So does a CLOSE 0 (DONE)
    that comes while neither stream has ended (a server that breaks its promise that every byte
    was delivered): the application connection is reset, never ended as if the stream were
    complete (which would hide that bytes are missing)."""
    async def main() -> None:
        events: list[Any] = []
        async with spec_server() as server, \
                app_connection(kind, server, events) as (reader, writer):
            s = server.only_session()
            assert await exchange(reader, writer, b"hello") == b"hello"
            link = s.link
            assert link is not None
            server.admin_close(s, code, "operator")
            got, how = await read_to_end(reader)
            assert got == b""
            assert await wait_for(lambda: bool(kinds(events, "SessionClosed")), 2.0)
            closed = kinds(events, "SessionClosed")
            assert len(closed) == 1 and closed[0].code == code and not closed[0].graceful
            await asyncio.sleep(0.15)  # no reconnection
            assert len(server.links) == 1 and link.gone
            assert server.violations == []
            assert how == "reset", how
    run(main())


def test_application_reset_sends_close() -> None:
    """6.4: the application connection is reset: the client sends CLOSE 1 (ABORTED), we end
    the session and close the link."""
    async def main() -> None:
        events: list[Any] = []
        async with spec_server() as server, tcp_client(server, events) as (reader, writer):
            s = server.only_session()
            assert await exchange(reader, writer, b"hello") == b"hello"
            rst(writer)
            assert await wait_for(lambda: s.close_code is not None, 2.0)
            assert s.client_close is not None and s.client_close[0] == 1
            closed = kinds(events, "SessionClosed")
            assert len(closed) == 1 and closed[0].code == 1 and not closed[0].graceful
            assert await wait_for(lambda: server.links[0].gone, 2.0)
            assert server.violations == []
    run(main())

