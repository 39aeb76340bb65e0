"""An independent client of the icafast wire protocol, written only from docs/PROTOCOL.md.

The client below (frame codec, CRC32C, handshake, acknowledgements, resume proof, secret
rotation and replay) deliberately imports nothing from ``icafast``: it exists to check that the
document is precise enough for a second implementation. The tests drive it over loopback TCP
(plain frames, no TLS) against the project's real server; only the test setup uses
``icafast.aio`` to start that server. Section numbers in comments refer to docs/PROTOCOL.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import random
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from relay_helpers import run_async, wait_for

# --------------------------------------------------------------------------------------------
# The client: nothing here comes from icafast.
# --------------------------------------------------------------------------------------------

# 2.4 frame types
HELLO, NEW, RESUME, ACCEPT, REJECT = 0x01, 0x02, 0x03, 0x04, 0x05
DATA, ACK, PING, PONG, CLOSE = 0x10, 0x11, 0x12, 0x13, 0x14
FIN = 0x01
TYPES = {HELLO, NEW, RESUME, ACCEPT, REJECT, DATA, ACK, PING, PONG, CLOSE}
HANDSHAKE_TYPES = {HELLO, NEW, RESUME, ACCEPT, REJECT}

HEADER = struct.Struct(">BBHIQQI")  # 2.1: type, flags, reserved, length, seq, ack, crc32c
HEADER_SIZE = HEADER.size
MAGIC = b"ICAFAST\x00"  # 3.1
HELLO_FIELDS = struct.Struct(">8sHHIQ")  # magic, min version, max version, max payload, limit
ACCEPT_FIELDS = struct.Struct(">16sBBHIIIIQ")  # 3.1, 44 bytes
U64_MAX = 2**64 - 1

# 2.6 frame error codes
ERR_TYPE, ERR_RESERVED, ERR_FLAGS, ERR_LENGTH, ERR_CHECKSUM, ERR_TRUNCATED = 1, 2, 3, 4, 5, 6


def _crc32c_table() -> list[int]:
    """2.2: reflected polynomial 0x82F63B78, one table entry per byte value."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def encode(ftype: int, payload: bytes = b"", seq: int = 0, ack: int = 0, flags: int = 0,
           reserved: int = 0) -> bytes:
    """One frame (2.1): the checksum covers header bytes 0..23, then the payload."""
    head = HEADER.pack(ftype, flags, reserved, len(payload), seq, ack, 0)[:24]
    return head + struct.pack(">I", crc32c(head + payload)) + payload


@dataclass
class Frame:
    type: int
    flags: int
    seq: int
    ack: int
    payload: bytes


class FrameError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"frame error {code}")
        self.code = code


class ProtocolError(Exception):
    pass


class LinkClosed(Exception):
    """The peer closed or reset the TCP connection (at a frame boundary or inside one)."""


class Rejected(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"REJECT {code}: {reason}")
        self.code = code
        self.reason = reason


def decode_code_reason(payload: bytes) -> tuple[int, str]:
    """REJECT/CLOSE payload (3.1): u16 code, then at most 256 reason bytes, lenient UTF-8."""
    if len(payload) < 2:
        raise ProtocolError("REJECT/CLOSE payload shorter than 2 bytes")
    (code,) = struct.unpack_from(">H", payload)
    return code, payload[2:258].decode("utf-8", "replace")


def hello_payload(nonce: bytes, max_payload: int, replay_limit: int,
                  versions: tuple[int, int] = (1, 1)) -> bytes:
    return HELLO_FIELDS.pack(MAGIC, versions[0], versions[1], max_payload, replay_limit) + nonce


@dataclass
class PeerHello:
    max_payload: int
    replay_limit: int
    nonce: bytes


def parse_hello(payload: bytes) -> PeerHello:
    """3.1 and 3.5 (client's check of the server's HELLO)."""
    if len(payload) < 56:
        raise ProtocolError("short HELLO")
    magic, vmin, vmax, max_payload, limit = HELLO_FIELDS.unpack_from(payload)
    if magic != MAGIC or max_payload < 1024 or limit < 1024 or not vmin <= 1 <= vmax:
        raise ProtocolError("bad HELLO")
    return PeerHello(max_payload, limit, payload[24:56])


@dataclass
class Policy:
    on_timeout: int
    keepalive_ms: int
    dead_ms: int
    reliability_ms: int
    hold_ms: int
    server_replay_limit: int


def proof_of(secret: bytes, sid: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """3.4"""
    msg = b"icafast resume v1" + sid + client_nonce + server_nonce
    return hmac.new(secret, msg, hashlib.sha256).digest()


def rotated(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """3.4"""
    msg = b"icafast rotate v1" + client_nonce + server_nonce
    return hmac.new(secret, msg, hashlib.sha256).digest()


class Link:
    """One TCP connection carrying frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_payload: int) -> None:
        self.reader = reader
        self.writer = writer
        self.max_payload = max_payload
        self.first = True

    @classmethod
    async def connect(cls, host: str, port: int, max_payload: int) -> Link:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
        return cls(reader, writer, max_payload)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def _read(self, n: int, timeout: float) -> bytes:
        try:
            return await asyncio.wait_for(self.reader.readexactly(n), timeout)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise FrameError(ERR_TRUNCATED) from exc
            raise LinkClosed("EOF") from exc
        except ConnectionError as exc:
            raise LinkClosed(repr(exc)) from exc

    async def read_frame(self, timeout: float) -> Frame:
        """The next frame, validated in the order of 2.6."""
        if self.first:
            # 3.5 early check: the very first byte must be HELLO or REJECT
            first = await self._read(1, timeout)
            if first[0] not in (HELLO, REJECT):
                raise ProtocolError(f"first byte {first[0]:#x}: not an icafast server")
            self.first = False
            head = first + await self._read(HEADER_SIZE - 1, timeout)
        else:
            head = await self._read(HEADER_SIZE, timeout)
        ftype, flags, reserved, length, seq, ack, crc = HEADER.unpack(head)
        if ftype not in TYPES:
            raise FrameError(ERR_TYPE)
        if reserved != 0:
            raise FrameError(ERR_RESERVED)
        if flags & ~(FIN if ftype == DATA else 0):
            raise FrameError(ERR_FLAGS)
        if length > self.max_payload:
            raise FrameError(ERR_LENGTH)
        payload = await self._read(length, timeout) if length else b""
        if crc32c(head[:24] + payload) != crc:
            raise FrameError(ERR_CHECKSUM)
        return Frame(ftype, flags, seq, ack, payload)

    def abort(self) -> None:
        """Break the link abruptly: no CLOSE frame, the kernel sends RST."""
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)


class SpecClient:
    """One client session (section 1 terms): a send stream with its replay buffer, a receive
    stream, and at most one link."""

    MAX_PAYLOAD = 65536  # our decoder limit, announced in HELLO (2.5)
    REPLAY_LIMIT = 1 << 20  # our replay limit, announced in HELLO (4.7)
    FRAME_SIZE = 16384

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sid: bytes | None = None
        self.secret: bytes | None = None
        self.policy: Policy | None = None
        self.link: Link | None = None
        self.links: list[Link] = []  # every link ever opened, closed at the end
        self.peer: PeerHello | None = None
        # client->server stream (4.2, 4.5): tx holds offsets [peer_ack, tx_end)
        self.tx = bytearray()
        self.peer_ack = 0
        self.tx_end = 0
        self.tx_pos = 0  # next offset to send on the current link (tx_end + 1 once FIN sent)
        self.tx_sent = 0  # furthest offset ever sent, the FIN counts
        self.fin_queued = False
        # server->client stream (4.3)
        self.rx = 0
        self.received = bytearray()
        self.rx_fin = False
        self.last_ack_sent = 0
        self.trimmed = 0  # duplicate bytes dropped (replay overlap)
        self.close_code: int | None = None
        self.pongs: list[Frame] = []
        self.pings = 0
        self.acks_received = 0
        self.largest_data = 0

    # ---- handshake (3) ----------------------------------------------------------------------

    async def _open(self) -> tuple[Link, bytes]:
        link = await Link.connect(self.host, self.port, self.MAX_PAYLOAD)
        self.links.append(link)
        return link, os.urandom(32)

    def _hello(self, nonce: bytes) -> bytes:
        return encode(HELLO, hello_payload(nonce, self.MAX_PAYLOAD, self.REPLAY_LIMIT))

    async def _handshake_frame(self, link: Link, expect: int, timeout: float = 5.0) -> Frame:
        f = await link.read_frame(timeout)
        if f.type == REJECT:
            raise Rejected(*decode_code_reason(f.payload))
        if f.type != expect:
            raise ProtocolError(f"handshake: got type {f.type:#x}, expected {expect:#x}")
        return f

    def _policy(self, accept: Frame, resumed: int) -> tuple[bytes, Policy]:
        """3.5 ACCEPT validation."""
        p = accept.payload
        if len(p) < 44:
            raise ProtocolError("short ACCEPT")
        sid, flag, on_timeout, _res, keep, dead, rel, hold, limit = ACCEPT_FIELDS.unpack_from(p)
        want_len = 76 if resumed == 0 else 44
        if flag != resumed or len(p) != want_len:
            raise ProtocolError(f"ACCEPT resumed={flag} length={len(p)}")
        if not (keep > 0 and dead > keep and on_timeout in (0, 1)):
            raise ProtocolError("ACCEPT policy")
        fin = 1 if self.fin_queued else 0
        high = min(self.tx_end + fin, max(self.tx_sent, self.peer_ack))  # 4.5, last paragraph
        if not self.peer_ack <= accept.ack <= high:
            raise ProtocolError("ACCEPT ack out of range")
        return sid, Policy(on_timeout, keep, dead, rel, hold, limit)

    async def open_new(self, versions: tuple[int, int] = (1, 1)) -> None:
        """3.2: HELLO and NEW in one write (allowed by 3.5)."""
        link, nonce = await self._open()
        hello = encode(HELLO, hello_payload(nonce, self.MAX_PAYLOAD, self.REPLAY_LIMIT,
                                            versions))
        link.write(hello + encode(NEW))
        self.peer = parse_hello((await self._handshake_frame(link, HELLO)).payload)
        accept = await self._handshake_frame(link, ACCEPT)
        sid, self.policy = self._policy(accept, 0)
        if accept.ack != 0:
            raise ProtocolError("ACCEPT of a new session with ack != 0")
        self.sid, self.secret = sid, accept.payload[44:76]
        self.link = link

    async def resume(self, ack: int | None = None, secret: bytes | None = None,
                     sid: bytes | None = None) -> None:
        """3.3: HELLO, wait for the server's HELLO, RESUME with the proof, ACCEPT, replay.
        ``ack`` defaults to our received offset; ``secret``/``sid`` override for tests."""
        assert self.sid is not None and self.secret is not None
        sid = self.sid if sid is None else sid
        use_secret = self.secret if secret is None else secret
        link, nonce = await self._open()
        link.write(self._hello(nonce))
        self.peer = parse_hello((await self._handshake_frame(link, HELLO)).payload)
        ack = self.rx if ack is None else ack
        proof = proof_of(use_secret, sid, nonce, self.peer.nonce)
        link.write(encode(RESUME, sid + proof, ack=ack))
        accept = await self._handshake_frame(link, ACCEPT)
        got_sid, self.policy = self._policy(accept, 1)
        if got_sid != sid:
            raise ProtocolError("ACCEPT for another session")
        self.secret = rotated(use_secret, nonce, self.peer.nonce)  # 3.4
        self.last_ack_sent = ack
        # 4.6: the server's received offset is acknowledged; rewind to it and replay
        self._apply_ack(accept.ack)
        self.tx_pos = accept.ack
        self.link = link
        self.flush()

    # ---- data transfer (4) ------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue application bytes; sent at once when a link is up."""
        assert not self.fin_queued
        self.tx += data
        self.tx_end += len(data)
        assert len(self.tx) <= self.REPLAY_LIMIT  # 4.7: never more than our limit unacked
        self.flush()

    def send_fin(self) -> None:
        self.fin_queued = True
        self.flush()

    def flush(self) -> None:
        """Send everything from the send position (4.2): DATA in offset order, then FIN."""
        if self.link is None:
            return
        assert self.peer is not None
        size = min(self.FRAME_SIZE, self.peer.max_payload)
        out = []
        while self.tx_pos < self.tx_end:
            n = min(size, self.tx_end - self.tx_pos)
            start = self.tx_pos - self.peer_ack
            fin = self.fin_queued and self.tx_pos + n == self.tx_end
            out.append(encode(DATA, bytes(self.tx[start:start + n]), seq=self.tx_pos,
                              ack=self.rx, flags=FIN if fin else 0))
            self.tx_pos += n + (1 if fin else 0)
        if self.fin_queued and self.tx_pos == self.tx_end:
            out.append(encode(DATA, seq=self.tx_end, ack=self.rx, flags=FIN))
            self.tx_pos += 1
        if out:
            self.tx_sent = max(self.tx_sent, self.tx_pos)
            self.last_ack_sent = self.rx
            self.link.write(b"".join(out))

    def send_ack(self) -> None:
        assert self.link is not None
        self.link.write(encode(ACK, ack=self.rx))
        self.last_ack_sent = self.rx

    def send_ping(self, seq: int) -> None:
        assert self.link is not None
        self.link.write(encode(PING, seq=seq, ack=self.rx))
        self.last_ack_sent = self.rx

    def send_close(self, code: int, reason: str = "") -> None:
        assert self.link is not None
        payload = struct.pack(">H", code) + reason.encode()[:256]
        self.link.write(encode(CLOSE, payload, ack=self.rx))

    def _apply_ack(self, ack: int) -> None:
        """Free acknowledged bytes; an ack past the send position moves it up (4.5)."""
        freed = min(ack, self.tx_end) - self.peer_ack
        if freed > 0:
            del self.tx[:freed]
        self.peer_ack = ack
        self.tx_pos = max(self.tx_pos, ack)

    def handle(self, f: Frame) -> None:
        """One frame on an established link."""
        if f.ack != self.peer_ack:  # 4.5
            fin = 1 if self.fin_queued else 0
            high = min(self.tx_end + fin, max(self.tx_sent, self.peer_ack))
            if not self.peer_ack <= f.ack <= high:
                raise ProtocolError(f"ack {f.ack} outside [{self.peer_ack}, {high}]")
            self._apply_ack(f.ack)
        if f.type == DATA:
            self._data(f)
        elif f.type == ACK:
            self.acks_received += 1
        elif f.type == PING:  # 5: answer at once, seq copied
            self.pings += 1
            assert self.link is not None
            self.link.write(encode(PONG, seq=f.seq, ack=self.rx))
            self.last_ack_sent = self.rx
        elif f.type == PONG:
            self.pongs.append(f)
        elif f.type == CLOSE:
            self.close_code, _ = decode_code_reason(f.payload)
        else:
            raise ProtocolError(f"handshake frame {f.type:#x} on an established link")

    def _data(self, f: Frame) -> None:
        """4.3"""
        s, n, fin = f.seq, len(f.payload), 1 if f.flags & FIN else 0
        self.largest_data = max(self.largest_data, n)
        if s > self.rx or s + n + fin > U64_MAX:
            raise ProtocolError(f"gap: seq {s} > rx {self.rx}")
        if self.rx_fin:
            if s + n + fin > self.rx:
                raise ProtocolError("data after end of stream")
            self.trimmed += n
            return
        if s + n > self.rx:
            self.received += f.payload[self.rx - s:]
            self.trimmed += self.rx - s
            self.rx = s + n
        else:
            self.trimmed += n
        if fin and s + n == self.rx:
            self.rx_fin = True
            self.rx += 1
            if self.fin_queued:  # 4.4: the FIN's ack is due at once when ours is out
                self.send_ack()
        assert self.peer is not None
        threshold = min(256 * 1024, self.peer.replay_limit // 4)  # 4.4
        if self.rx - self.last_ack_sent >= threshold:
            self.send_ack()

    async def pump(self, until: Callable[[], bool], timeout: float = 5.0,
                   max_frames: int = 100_000) -> None:
        """Read and handle frames until ``until()`` holds; bounded in time and frame count."""
        assert self.link is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(max_frames):
            if until():
                return
            left = deadline - loop.time()
            if left <= 0:
                break
            self.handle(await self.link.read_frame(left))
        if not until():
            raise TimeoutError("condition not reached")

    async def until_closed(self, timeout: float = 5.0) -> list[Frame]:
        """Read (and handle what is valid) until the server closes the link; the frames seen."""
        assert self.link is not None
        seen: list[Frame] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(10_000):
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                f = await self.link.read_frame(left)
            except LinkClosed:
                self.link = None
                return seen
            seen.append(f)
            self.handle(f)
        raise TimeoutError("the server did not close the link")

    def drop_link(self) -> None:
        """Abrupt break: no CLOSE, RST (the session must survive, 6.1)."""
        assert self.link is not None
        self.link.abort()
        self.link = None
        self.tx_pos = self.peer_ack  # rewound on the next ACCEPT anyway (4.6)

    async def aclose(self) -> None:
        for link in self.links:
            await link.close()
        self.link = None


# --------------------------------------------------------------------------------------------
# Test setup: an echo backend, the real server.
# --------------------------------------------------------------------------------------------


class EchoBackend:
    """Echoes; on EOF half-closes back (so the session can end gracefully)."""

    def __init__(self) -> None:
        self.conns = 0
        self.eofs = 0  # the server forwarded a half-close
        self.resets = 0  # the server reset the connection
        self.ended = 0  # handler finished, socket closed
        self.writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> EchoBackend:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns += 1
        self.writers.append(writer)
        try:
            for _ in range(100_000):
                data = await reader.read(65536)
                if not data:
                    self.eofs += 1
                    writer.write_eof()
                    await writer.drain()
                    break
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            self.resets += 1
        finally:
            writer.close()
            self.ended += 1

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self.writers:
            w.close()
        await asyncio.sleep(0)


def server_config(**kw: float):
    from icafast.protocol import Config

    base = {"keepalive_interval": 0.5, "dead_timeout": 2.0, "reliability_timeout": 20.0,
            "handshake_timeout": 2.0}
    base.update(kw)
    return Config(**base)


@contextlib.asynccontextmanager
async def relay(**config: float) -> AsyncIterator[tuple[object, EchoBackend]]:
    from icafast.aio import Mapping, RelayServer

    backend = await EchoBackend().start()
    server = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", backend.port)],
                         server_config(**config))
    await server.start()
    try:
        yield server, backend
    finally:
        await server.close()
        await backend.close()


@contextlib.asynccontextmanager
async def spec_client(server: object) -> AsyncIterator[SpecClient]:
    host, port = server.addresses[0]  # type: ignore[attr-defined]
    client = SpecClient(host, port)
    try:
        yield client
    finally:
        await client.aclose()


def only_session(server: object) -> dict:
    rows = server.sessions()  # type: ignore[attr-defined]
    assert len(rows) == 1, rows
    return rows[0]


def same_id(row: dict, sid: bytes) -> bool:
    value = row["id"]
    return value == sid or value == sid.hex() or value == sid.hex().upper()


def run(coro, loop: str = "asyncio") -> None:
    run_async(loop, coro, timeout=30.0)


LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


def blob(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------------------------
# The document's own examples, reproduced by this client.
# --------------------------------------------------------------------------------------------


def test_spec_examples() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # 2.2
    frame = encode(DATA, b"hello", seq=1000, ack=42, flags=FIN)  # 2.3
    assert frame.hex() == ("1001000000000005" "00000000000003e8" "000000000000002a"
                           "1a925b2a" "68656c6c6f")
    assert len(frame) == 33
    assert encode(ACK, ack=1006).hex() == ("11000000000000000000000000000000"
                                           "00000000000003eec0b095bf")
    secret, sid = bytes(range(32)), bytes(range(0xA0, 0xB0))  # 3.4
    assert proof_of(secret, sid, b"\x11" * 32, b"\x22" * 32).hex() == (
        "f37fcf8bc27bbc17b8ebdf41c1d711d331a1f3e50a83aea4bdeb1bce40a2235a")
    assert rotated(secret, b"\x11" * 32, b"\x22" * 32).hex() == (
        "0c74a527ac71759097588597d899d84cc275eab3a0bf86f59cf34c2aea6551dc")


# --------------------------------------------------------------------------------------------
# 1. New session, data both ways, acknowledgements.
# --------------------------------------------------------------------------------------------


@LOOPS
def test_new_session_echo(loop: str) -> None:
    async def main() -> None:
        async with relay() as (server, backend), spec_client(server) as c:
            await c.open_new()
            assert c.sid is not None and len(c.sid) == 16 and len(c.secret or b"") == 32
            assert c.policy == Policy(0, 500, 2000, 20000, 3_600_000, c.policy.server_replay_limit)
            row = only_session(server)
            assert same_id(row, c.sid) and row["state"] == "ACTIVE"
            payload = blob(1, 100_000)
            for i in range(0, len(payload), 7000):  # several sends, several frames each
                c.send(payload[i:i + 7000])
            await c.pump(lambda: c.rx >= len(payload))
            assert bytes(c.received) == payload and c.trimmed == 0
            c.send_ack()
            # the server acknowledges everything (within its ack delay, 4.4)
            await c.pump(lambda: c.peer_ack == len(payload), timeout=3.0)
            assert len(c.tx) == 0 and backend.conns == 1
    run(main(), loop)


# --------------------------------------------------------------------------------------------
# 2. Resume after an abrupt break, replay both ways, secret rotation.
# --------------------------------------------------------------------------------------------


@LOOPS
def test_resume_replays_both_ways(loop: str) -> None:
    async def main() -> None:
        async with relay() as (server, backend), spec_client(server) as c:
            await c.open_new()
            first = blob(2, 200_000)
            c.send(first)
            # read only part of the echo: the rest is lost with the link, the server replays
            await c.pump(lambda: c.rx >= 20_000)
            partial = c.rx
            c.drop_link()
            assert await wait_for(lambda: only_session(server)["state"] == "DISCONNECTED", 3.0)
            second = blob(3, 50_000)  # written while disconnected: replay buffer only
            c.send(second)
            assert c.tx_pos == c.peer_ack  # nothing sent without a link
            await c.resume()
            row = only_session(server)
            assert same_id(row, c.sid) and row["state"] == "ACTIVE"
            total = first + second
            await c.pump(lambda: c.rx >= len(total))
            assert bytes(c.received) == total, "echoed stream lost, duplicated or reordered"
            assert c.rx > partial
            # a second break and resume: the proof now needs the rotated secret (3.4)
            c.send_ack()
            c.drop_link()
            assert await wait_for(lambda: only_session(server)["state"] == "DISCONNECTED", 3.0)
            third = blob(4, 30_000)
            c.send(third)
            await c.resume()
            total += third
            await c.pump(lambda: c.rx >= len(total))
            assert bytes(c.received) == total
            rows = server.sessions()
            assert len(rows) == 1 and same_id(rows[0], c.sid) and rows[0]["state"] == "ACTIVE"
            assert backend.conns == 1
    run(main(), loop)


def test_resume_with_ack_below_received_offset() -> None:
    """4.5: the received offset in RESUME may be below what was received (down to the last
    ack sent); the server replays from there and this side trims the overlap (4.3), here
    inside a frame that is partly old, partly new."""
    async def main() -> None:
        # no PING may come (and be answered with an ack) before the break
        async with relay(keepalive_interval=3.0, dead_timeout=6.0) as (server, _backend), \
                spec_client(server) as c:
            await c.open_new()
            data = blob(5, 200_000)
            c.send(data)
            await c.pump(lambda: c.rx >= 20_000)
            assert c.last_ack_sent == 0  # no frame sent since the echo began to arrive
            received = c.rx
            c.drop_link()
            assert await wait_for(lambda: only_session(server)["state"] == "DISCONNECTED", 3.0)
            more = blob(6, 10_000)
            c.send(more)
            await c.resume(ack=received // 2 + 1)
            await c.pump(lambda: c.rx >= len(data) + len(more))
            assert bytes(c.received) == data + more
            assert c.trimmed >= received - (received // 2 + 1)  # the overlap was replayed
    run(main())


# --------------------------------------------------------------------------------------------
# 3. Frame errors close the link, never the session.
# --------------------------------------------------------------------------------------------


def test_resume_offset_past_what_was_sent_is_rejected() -> None:
    """4.5: a received offset can no more cover what was never sent than an ack can. Bytes the
    backend sent while the session had no link are queued, not sent; a RESUME whose offset
    covers them gets REJECT 7 and leaves the session as it was (they were freed unseen, lost
    without a trace); the right offset then resumes and they arrive."""
    async def main() -> None:
        async with relay() as (server, backend), spec_client(server) as c:
            await c.open_new()
            c.send(b"x" * 10)
            await c.pump(lambda: c.rx >= 10)
            c.send_ack()
            await c.pump(lambda: c.acks_received > 0 or c.peer_ack == 10, timeout=2.0)
            c.drop_link()
            assert await wait_for(lambda: only_session(server)["state"] == "DISCONNECTED", 3.0)
            backend.writers[0].write(b"sent while disconnected")  # 23 bytes, queued
            assert await wait_for(lambda: only_session(server)["unacked"] == 23, 3.0)
            with pytest.raises(Rejected) as exc:
                await c.resume(ack=10 + 23)
            assert exc.value.code == 7
            row = only_session(server)
            assert row["unacked"] == 23 and row["state"] == "DISCONNECTED"
            await c.resume()
            await c.pump(lambda: c.rx >= 33)
            assert bytes(c.received) == b"x" * 10 + b"sent while disconnected"
    run(main())


def test_bad_checksum_closes_link_not_session() -> None:
    async def main() -> None:
        async with relay() as (server, _backend), spec_client(server) as c:
            await c.open_new()
            good = blob(7, 5000)
            c.send(good)
            await c.pump(lambda: c.rx >= len(good))
            c.send_ack()
            # a DATA frame whose checksum is wrong: its bytes count as sent, never delivered
            bad = blob(8, 3000)
            c.tx += bad
            c.tx_end += len(bad)
            frame = bytearray(encode(DATA, bad, seq=c.tx_pos, ack=c.rx))
            frame[24] ^= 0xFF
            assert c.link is not None
            c.link.write(bytes(frame))
            c.tx_pos = c.tx_sent = c.tx_end
            seen = await c.until_closed(3.0)
            assert all(f.type in (PING, ACK, DATA) for f in seen), seen
            assert await wait_for(lambda: only_session(server)["state"] == "DISCONNECTED", 3.0)
            await c.resume()
            await c.pump(lambda: c.rx >= len(good) + len(bad))
            assert bytes(c.received) == good + bad
            assert same_id(only_session(server), c.sid)
    run(main())


@pytest.mark.parametrize("mutation", ["reserved", "flags", "type", "length"])
def test_header_errors_close_link_not_session(mutation: str) -> None:
    """2.6: every header check closes the connection; the session resumes."""
    async def main() -> None:
        async with relay() as (server, _backend), spec_client(server) as c:
            await c.open_new()
            assert c.link is not None
            if mutation == "reserved":
                frame = encode(ACK, ack=c.rx, reserved=1)
            elif mutation == "flags":
                frame = encode(ACK, ack=c.rx, flags=FIN)
            elif mutation == "type":
                frame = encode(0x7F, ack=c.rx)
            else:  # longer than the server announced: the header alone must trigger it
                assert c.peer is not None
                frame = HEADER.pack(DATA, 0, 0, c.peer.max_payload + 1, 0, 0, 0)
            c.link.write(frame)
            await c.until_closed(3.0)
            assert await wait_for(lambda: only_session(server)["state"] == "DISCONNECTED", 3.0)
            await c.resume()
            c.send(b"still here")
            await c.pump(lambda: c.rx >= 10)
            assert bytes(c.received) == b"still here"
    run(main())


def test_ack_beyond_sent_closes_link() -> None:
    """4.5 (MUST): an ack covering bytes never sent is a protocol error; link closed."""
    async def main() -> None:
        async with relay() as (server, _backend), spec_client(server) as c:
            await c.open_new()
            assert c.link is not None
            c.link.write(encode(ACK, ack=5))  # the server has sent nothing yet
            await c.until_closed(3.0)
            assert await wait_for(lambda: only_session(server)["state"] == "DISCONNECTED", 3.0)
            await c.resume()
            assert only_session(server)["state"] == "ACTIVE"
    run(main())


# --------------------------------------------------------------------------------------------
# 4. Keepalive and handshake MUSTs.
# --------------------------------------------------------------------------------------------


def test_ping_pong_and_server_keepalive() -> None:
    async def main() -> None:
        async with relay(keepalive_interval=0.1, dead_timeout=0.5) as (server, _b), \
                spec_client(server) as c:
            await c.open_new()
            c.send(b"abc")
            await c.pump(lambda: c.rx == 3)
            c.send_ping(0x1234_5678_9ABC_DEF0)
            await c.pump(lambda: len(c.pongs) >= 1, timeout=2.0)
            assert c.pongs[0].seq == 0x1234_5678_9ABC_DEF0  # 5: seq copied
            assert c.pongs[0].ack <= 4  # our 3 bytes (acked value <= what was sent, 4.5)
            # 5: the server leads the keepalive on an idle link; our PONGs keep the link up
            # past the dead timeout (0.5 s), though we send nothing else
            await c.pump(lambda: c.pings >= 9, timeout=3.0)
            assert only_session(server)["state"] == "ACTIVE"
    run(main())


def test_server_honours_announced_max_payload() -> None:
    """2.5 (MUST): no frame larger than the limit the peer announced in its HELLO."""
    class SmallClient(SpecClient):
        MAX_PAYLOAD = 1024  # the smallest allowed; the reader fails on anything larger

    async def main() -> None:
        async with relay() as (server, _backend):
            host, port = server.addresses[0]
            c = SmallClient(host, port)
            try:
                await c.open_new()
                data = blob(10, 50_000)
                c.send(data)
                await c.pump(lambda: c.rx >= len(data))
                assert bytes(c.received) == data and 0 < c.largest_data <= 1024
            finally:
                await c.aclose()
    run(main())


def test_dead_timeout_closes_link_only() -> None:
    """5/6.1: a client that stays silent is declared dead; the session stays resumable."""
    async def main() -> None:
        async with relay(keepalive_interval=0.1, dead_timeout=0.4) as (server, _b), \
                spec_client(server) as c:
            await c.open_new()
            c.send(b"ping me")
            await asyncio.sleep(0.8)  # read nothing, answer no PING
            assert await wait_for(lambda: only_session(server)["state"] == "DISCONNECTED", 2.0)
            await c.until_closed(2.0)
            await c.resume()
            await c.pump(lambda: c.rx >= 7)
            assert bytes(c.received) == b"ping me"
    run(main())


def test_handshake_rejects() -> None:
    """3.5/3.6: REJECT 1 for no common version, 2 for an unknown id, 3 for a wrong proof
    (leaving the live link alone)."""
    async def main() -> None:
        async with relay() as (server, _backend), spec_client(server) as c:
            with pytest.raises(Rejected) as exc:
                await c.open_new(versions=(2, 3))
            assert exc.value.code == 1
            await c.open_new()
            live = c.link
            c.send(b"x" * 100)
            await c.pump(lambda: c.rx >= 100)
            c.send_ack()
            with pytest.raises(Rejected) as exc:
                await c.resume(secret=b"\x00" * 32)
            assert exc.value.code == 3
            with pytest.raises(Rejected) as exc:
                await c.resume(sid=os.urandom(16))
            assert exc.value.code == 2
            c.link = live  # the live link still works
            c.send(b"y" * 100)
            await c.pump(lambda: c.rx >= 200)
            assert bytes(c.received) == b"x" * 100 + b"y" * 100
            assert only_session(server)["state"] == "ACTIVE"
    run(main())


@pytest.mark.parametrize("kind", ["hello", "new", "resume", "accept", "reject"])
def test_handshake_frame_on_established_link_closes_link_not_session(kind: str) -> None:
    """2.4: a payload on ACK, PING or PONG is ignored; a handshake frame on an established link
    is a protocol error: the server closes the link, and the session resumes (2.6)."""
    async def main() -> None:
        async with relay() as (server, _backend), spec_client(server) as c:
            await c.open_new()
            assert c.link is not None
            c.link.write(encode(ACK, b"ignored", ack=c.rx) + encode(PONG, b"x", ack=c.rx)
                         + encode(PING, b"ignored", seq=77, ack=c.rx))
            await c.pump(lambda: any(f.seq == 77 for f in c.pongs))
            c.send(b"before")
            await c.pump(lambda: c.rx >= 6)
            payload = {"hello": hello_payload(os.urandom(32), 65536, 1 << 20), "new": b"",
                       "resume": bytes(48), "accept": bytes(76), "reject": b"\x00\x07"}[kind]
            ftype = {"hello": HELLO, "new": NEW, "resume": RESUME, "accept": ACCEPT,
                     "reject": REJECT}[kind]
            c.link.write(encode(ftype, payload, ack=c.rx))
            await c.until_closed(3.0)
            await c.resume()
            c.send(b"after")
            await c.pump(lambda: c.rx >= 11)
            assert bytes(c.received) == b"beforeafter"
            assert only_session(server)["state"] == "ACTIVE"
    run(main())


def test_resume_of_the_wrong_size_is_rejected() -> None:
    """3.1: RESUME is exactly 48 bytes; any other length is a protocol error (REJECT 7)."""
    async def main() -> None:
        async with relay() as (server, _backend):
            for size in (47, 49):
                host, port = server.addresses[0]  # type: ignore[attr-defined]
                link = await Link.connect(host, port, 65536)
                link.write(encode(HELLO, hello_payload(os.urandom(32), 65536, 1 << 20)))
                assert (await link.read_frame(2.0)).type == HELLO
                link.write(encode(RESUME, bytes(size)))
                f = await link.read_frame(2.0)
                assert f.type == REJECT and decode_code_reason(f.payload)[0] == 7
                await link.close()
    run(main())


def test_resume_takes_over_live_link() -> None:
    """3.5: a proven RESUME closes the session's current link, even a live one."""
    async def main() -> None:
        async with relay() as (server, _backend), spec_client(server) as c:
            await c.open_new()
            old = c.link
            assert old is not None
            c.send(b"before")
            await c.pump(lambda: c.rx >= 6)
            c.link = None
            await c.resume()
            new = c.link
            c.link = old
            await c.until_closed(3.0)  # the server closed the old link
            c.link = new
            c.send(b"after")
            await c.pump(lambda: c.rx >= 11)
            assert bytes(c.received) == b"beforeafter"
            assert len(server.sessions()) == 1
    run(main())


# --------------------------------------------------------------------------------------------
# 5. Ending a session.
# --------------------------------------------------------------------------------------------


def test_graceful_end() -> None:
    async def main() -> None:
        # keepalive long enough that no PING/PONG can carry the FIN's ack for us
        async with relay(keepalive_interval=3.0, dead_timeout=6.0) as (server, backend), \
                spec_client(server) as c:
            await c.open_new()
            data = blob(9, 30_000)
            c.send(data)
            c.send_fin()
            # the backend sees EOF, half-closes back: the server's FIN arrives, we ack it at
            # once (our FIN is out, 4.4), the server ends with CLOSE 0 (6.4)
            await c.pump(lambda: c.close_code is not None, timeout=2.0)
            assert c.close_code == 0
            assert c.rx_fin and bytes(c.received) == data and c.rx == len(data) + 1
            assert c.peer_ack == len(data) + 1  # our FIN acknowledged
            await c.until_closed(2.0)
            assert await wait_for(lambda: not server.sessions(), 3.0)
            assert await wait_for(lambda: backend.ended == 1, 3.0)
            assert backend.eofs == 1 and backend.resets == 0
            # 6.5: the id is tombstoned
            with pytest.raises(Rejected) as exc:
                await c.resume()
            assert exc.value.code == 4
    run(main())


def test_graceful_end_backend_first_close_acks_our_fin() -> None:
    """6.4: the backend ends first; our FIN (carrying the ack of the server's) completes the
    session and the server ends it with CLOSE 0. Nothing but that CLOSE follows our FIN, so its
    `ack` (4.2: the sender's received offset) must cover our FIN: it did not (it repeated the
    last ack sent, before our FIN), and a client holding to "graceful once my FIN is
    acknowledged" (3.6) could not tell this end from a lost FIN."""
    async def main() -> None:
        async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"bye")
            writer.write_eof()
            with contextlib.suppress(ConnectionError):
                await reader.read()
            writer.close()

        from icafast.aio import Mapping, RelayServer

        bsrv = await asyncio.start_server(backend, "127.0.0.1", 0)
        bport = bsrv.sockets[0].getsockname()[1]
        server = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", bport)],
                             server_config(keepalive_interval=3.0, dead_timeout=6.0))
        await server.start()
        try:
            async with spec_client(server) as c:
                await c.open_new()
                await c.pump(lambda: c.rx_fin, timeout=2.0)
                assert bytes(c.received) == b"bye" and c.rx == 4
                c.send(b"last words")
                c.send_fin()  # its frame carries ack 4: the server's FIN is acknowledged
                await c.pump(lambda: c.close_code is not None, timeout=2.0)
                assert c.close_code == 0
                assert c.peer_ack == len(b"last words") + 1  # our FIN acknowledged
                await c.until_closed(2.0)
        finally:
            await server.close()
            bsrv.close()
    run(main())


def test_abortive_close() -> None:
    """6.4: CLOSE with a non-zero code ends the session at once; the backend is reset."""
    async def main() -> None:
        async with relay() as (server, backend), spec_client(server) as c:
            await c.open_new()
            c.send(b"hello")
            await c.pump(lambda: c.rx >= 5)
            c.send_close(1, "application aborted")
            await c.until_closed(2.0)
            assert await wait_for(lambda: not server.sessions(), 3.0)
            assert await wait_for(lambda: backend.ended == 1, 3.0)
            assert backend.eofs == 0  # reset, not half-closed
    run(main())


def test_close_done_from_the_client_before_the_streams_ended_is_an_abort() -> None:
    """6.4: only the server sends CLOSE 0 (DONE: both directions finished, every byte
    delivered). One from a client whose stream has not ended must not end the backend
    connection as if the application had finished (a clean end of stream after half a
    request): the server resets it."""
    async def main() -> None:
        async with relay() as (server, backend), spec_client(server) as c:
            await c.open_new()
            c.send(b"half a request")
            await c.pump(lambda: bytes(c.received) == b"half a request")
            c.send_close(0, "done?")
            await c.until_closed()
            assert await wait_for(lambda: backend.ended == 1, 5.0)
            assert backend.resets == 1 and backend.eofs == 0
            assert server.sessions() == []  # type: ignore[attr-defined]
    run(main())
