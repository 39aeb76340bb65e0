"""Pure-Python twin of the compiled core (``icafast._core``).

It is the fallback when the extension is missing (or ``ICAFAST_PURE_PYTHON=1``) and the oracle the
differential tests compare the compiled core against: same API, same results, same exceptions with
the same messages. Keep it simple and obviously correct rather than fast.
"""

from __future__ import annotations

import operator
import struct
from typing import Any

from .errors import (
    FRAME_ERR_CHECKSUM,
    FRAME_ERR_FLAGS,
    FRAME_ERR_LENGTH,
    FRAME_ERR_RESERVED,
    FRAME_ERR_TRUNCATED,
    FRAME_ERR_TYPE,
    FrameError,
    ReplayFullError,
    ReplayRangeError,
    frame_error,
)
from .wire import (
    ALLOWED_FLAGS,
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    MAX_OFFSET,
    MAX_PAYLOAD_LIMIT,
    REPLAY_LIMIT_MAX,
)

__all__ = [
    "IMPLEMENTATION",
    "crc32c",
    "crc32c_backend",
    "Frame",
    "FrameDecoder",
    "encode_header",
    "encode_frame",
    "ReplayBuffer",
]

IMPLEMENTATION = "python"

# --------------------------------------------------------------------------------------------
# CRC32C (Castagnoli, reflected polynomial 0x82F63B78), table driven.


def _make_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def _as_bytes_view(data: Any) -> memoryview:
    if isinstance(data, str):
        raise TypeError("expected a bytes-like object, not str")
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def crc32c(data: Any, value: int = 0) -> int:
    """CRC32C of ``data`` (any buffer); pass a previous result as ``value`` to continue it."""
    mv = _as_bytes_view(data)
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError("crc value must be in 0..0xFFFFFFFF")
    crc = value ^ 0xFFFFFFFF
    table = _TABLE
    for b in mv.tobytes():
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32c_backend() -> str:
    """Which CRC32C code path is in use ("python" here)."""
    return "python"


# --------------------------------------------------------------------------------------------
# Frames.

_HDR = struct.Struct(">BBHIQQ")  # the 24 bytes the checksum covers before the payload
_CRC = struct.Struct(">I")


class Frame:
    """One decoded frame. ``payload`` is a memoryview (see FrameDecoder.feed for its lifetime)."""

    __slots__ = ("type", "flags", "seq", "ack", "payload")

    def __init__(self, type: int, flags: int, seq: int, ack: int, payload: Any) -> None:
        self.type = type
        self.flags = flags
        self.seq = seq
        self.ack = ack
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        if not hasattr(other, "payload"):
            return NotImplemented
        o: Any = other
        return (self.type, self.flags, self.seq, self.ack) == (o.type, o.flags, o.seq, o.ack) and (
            bytes(self.payload) == bytes(o.payload)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Frame(type=0x{self.type:02x}, flags=0x{self.flags:02x}, seq={self.seq}, "
            f"ack={self.ack}, payload=<{len(self.payload)} bytes>)"
        )


def _check_header_args(type: int, flags: int, seq: int, ack: int, length: int) -> None:
    allowed = ALLOWED_FLAGS.get(type)
    if allowed is None:
        raise ValueError(f"unknown frame type {type!r}")
    if not 0 <= flags <= 0xFF or flags & ~allowed:
        raise ValueError(f"flags {flags!r} not allowed for frame type 0x{type:02x}")
    if not 0 <= seq <= MAX_OFFSET:
        raise ValueError("seq must be in 0..2**64-1")
    if not 0 <= ack <= MAX_OFFSET:
        raise ValueError("ack must be in 0..2**64-1")
    if length > MAX_PAYLOAD_LIMIT:
        raise ValueError("payload longer than 2**32-1 bytes")


def encode_header(type: int, flags: int, seq: int, ack: int, payload: Any = b"") -> bytes:
    """The 28-byte header for ``payload`` (checksum over header and payload included).

    Send the header and then the payload itself (vectored write): the payload is not copied.
    """
    mv = _as_bytes_view(payload)
    _check_header_args(type, flags, seq, ack, mv.nbytes)
    head = _HDR.pack(type, flags, 0, mv.nbytes, seq, ack)
    return head + _CRC.pack(crc32c(mv, crc32c(head)))


def encode_frame(type: int, flags: int = 0, seq: int = 0, ack: int = 0,
                 payload: Any = b"") -> bytes:
    """A whole frame (header + payload) as one bytes object."""
    return encode_header(type, flags, seq, ack, payload) + bytes(_as_bytes_view(payload))


class FrameDecoder:
    """Incremental frame decoder.

    ``feed(data)`` accepts bytes split at any boundary and returns the frames completed by them.
    A payload that lies wholly inside ``data`` is returned as a memoryview into ``data`` (no copy):
    it is valid as long as the caller does not overwrite ``data``; except that one of fewer than
    ``copy_below`` bytes is returned as a bytes object (a copy, which costs less than a view for
    small payloads). A payload that spans calls is assembled in a buffer of its exact size, owned
    by the frame; that buffer grows as the bytes arrive, so memory follows what was received,
    never what a length field claims.

    Any malformed input raises FrameError; the decoder is then unusable (every later call raises
    the same error), because a byte stream cannot be resynchronised after a bad frame.
    """

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD, copy_below: int = 0) -> None:
        copy_below = operator.index(copy_below)
        if not 0 <= copy_below <= MAX_PAYLOAD_LIMIT:
            raise ValueError("copy_below must be in 0..2**32-1")
        self._copy_below = copy_below
        if not 0 <= max_payload <= MAX_PAYLOAD_LIMIT:
            raise ValueError("max_payload must be in 0..2**32-1")
        self._max = max_payload
        self._hdr = bytearray()  # partial header
        self._fields: tuple[int, int, int, int, int, int] | None = None  # parsed header
        self._hdrbytes = b""  # ... and its bytes
        self._body: bytearray | None = None  # payload being assembled (the bytes so far)
        self._have = 0
        self._offset = 0  # stream offset of the frame being decoded
        self._error: FrameError | None = None

    @property
    def max_payload(self) -> int:
        return self._max

    @property
    def offset(self) -> int:
        """Stream offset where the next (or the incomplete) frame starts."""
        return self._offset

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        if self._fields is not None:
            return HEADER_SIZE + self._have
        return len(self._hdr)

    def _fail(self, err: FrameError) -> FrameError:
        self._error = err
        return err

    def _parse(self, hdr: Any) -> tuple[int, int, int, int, int, int]:
        type, flags, reserved, length, seq, ack = _HDR.unpack_from(hdr, 0)
        (crc,) = _CRC.unpack_from(hdr, 24)
        allowed = ALLOWED_FLAGS.get(type)
        if allowed is None:
            raise self._fail(frame_error(FRAME_ERR_TYPE, self._offset, type))
        if reserved:
            raise self._fail(frame_error(FRAME_ERR_RESERVED, self._offset, reserved))
        if flags & ~allowed:
            raise self._fail(frame_error(FRAME_ERR_FLAGS, self._offset, flags, type))
        if length > self._max:
            raise self._fail(frame_error(FRAME_ERR_LENGTH, self._offset, length, self._max))
        return type, flags, length, seq, ack, crc

    def _finish(self, hdr: Any, fields: tuple[int, int, int, int, int, int], payload: Any) -> Frame:
        type, flags, length, seq, ack, crc = fields
        got = crc32c(payload, crc32c(memoryview(hdr)[:24]))
        if got != crc:
            raise self._fail(frame_error(FRAME_ERR_CHECKSUM, self._offset, crc, got))
        self._offset += HEADER_SIZE + length
        return Frame(type, flags, seq, ack, payload)

    def feed(self, data: Any) -> list[Frame]:
        if self._error is not None:
            raise self._error
        mv = _as_bytes_view(data)
        n = mv.nbytes
        pos = 0
        out: list[Frame] = []
        while pos < n:
            if self._fields is not None:  # filling a payload that spans feeds
                assert self._body is not None
                length = self._fields[2]
                take = min(length - self._have, n - pos)
                self._body += mv[pos : pos + take]
                self._have += take
                pos += take
                if self._have < length:
                    break
                frame = self._finish(self._hdrbytes, self._fields, memoryview(self._body))
                self._fields = self._body = None
                self._have = 0
                out.append(frame)
                continue
            if self._hdr:  # completing a header that spans feeds
                take = min(HEADER_SIZE - len(self._hdr), n - pos)
                self._hdr += mv[pos : pos + take]
                pos += take
                if len(self._hdr) < HEADER_SIZE:
                    break
                hdr: Any = bytes(self._hdr)
                self._hdr.clear()
                start = pos
            elif n - pos >= HEADER_SIZE:
                hdr = mv[pos : pos + HEADER_SIZE]
                start = pos + HEADER_SIZE
            else:
                self._hdr += mv[pos:]
                break
            fields = self._parse(hdr)
            length = fields[2]
            if n - start >= length:  # whole payload in this buffer: zero copy (or a small copy)
                payload: Any = mv[start : start + length]
                if length < self._copy_below:
                    payload = bytes(payload)
                out.append(self._finish(hdr, fields, payload))
                pos = start + length
            else:
                self._hdrbytes = bytes(hdr)
                self._fields = fields
                self._body = bytearray(mv[start:])  # grows as the rest arrives
                self._have = n - start
                pos = n
        return out

    def feed_one(self, data: Any) -> Frame | None:
        """``feed(data)[0]`` when nothing is buffered and ``data`` is exactly one whole frame
        (a relay's usual receive of a small message: no list); otherwise None, and nothing is
        consumed. Raises what ``feed`` raises for the same frame."""
        if self._error is not None:
            raise self._error
        if self._fields is not None or self._hdr:
            return None
        try:
            mv = _as_bytes_view(data)
        except TypeError:  # (not a buffer, or a strided one: feed() handles or rejects it)
            return None
        if not mv.c_contiguous or mv.nbytes < HEADER_SIZE:
            return None
        if mv.nbytes - HEADER_SIZE != int.from_bytes(mv[4:8], "big"):
            return None
        hdr = mv[:HEADER_SIZE]
        fields = self._parse(hdr)
        payload: Any = mv[HEADER_SIZE:]
        if fields[2] < self._copy_below:
            payload = bytes(payload)
        return self._finish(hdr, fields, payload)

    def feed_eof(self) -> None:
        """The stream ended: raise FrameError if it ended inside a frame."""
        if self._error is not None:
            raise self._error
        if self._fields is not None:
            raise self._fail(
                frame_error(
                    FRAME_ERR_TRUNCATED,
                    self._offset,
                    HEADER_SIZE + self._have,
                    HEADER_SIZE + self._fields[2],
                )
            )
        if self._hdr:
            raise self._fail(
                frame_error(FRAME_ERR_TRUNCATED, self._offset, len(self._hdr), HEADER_SIZE)
            )


# --------------------------------------------------------------------------------------------
# Replay buffer.

_INITIAL_CAPACITY = 16 * 1024


class ReplayBuffer:
    """Bounded ring of outbound bytes addressed by absolute stream offset.

    Holds the bytes ``[start, end)``: sent (or about to be) and not yet acknowledged by the peer.
    ``limit`` bounds ``end - start``; storage grows on demand up to it and ``shrink()`` gives it
    back. Unacknowledged bytes are never dropped: ``append`` refuses (ReplayFullError) instead.

    Memoryviews returned by ``views``/``write_view`` stay valid until the bytes they show are
    acknowledged (storage is replaced, never resized, so old views keep their old storage alive).
    """

    def __init__(self, limit: int, start: int = 0) -> None:
        if not 0 < limit <= REPLAY_LIMIT_MAX:
            raise ValueError("limit must be positive and at most 2**40")
        if not 0 <= start <= MAX_OFFSET:
            raise ValueError("start must be in 0..2**64-1")
        self._limit = limit
        self._buf = bytearray()
        self._head = 0  # storage index of offset ``start``
        self._start = start
        self._end = start
        self._wv = 0  # length of the last write_view (0: none outstanding)

    # -- state -----------------------------------------------------------------------------
    @property
    def limit(self) -> int:
        return self._limit

    @property
    def start(self) -> int:
        """Offset of the oldest unacknowledged byte."""
        return self._start

    @property
    def end(self) -> int:
        """Offset one past the newest byte."""
        return self._end

    @property
    def free(self) -> int:
        """Bytes that may still be appended before the limit is reached."""
        return self._limit - (self._end - self._start)

    @property
    def capacity(self) -> int:
        """Bytes of storage currently allocated (grows on demand, at most ``limit``)."""
        return len(self._buf)

    def __len__(self) -> int:
        return self._end - self._start

    # -- storage ---------------------------------------------------------------------------
    def _reserve(self, extra: int) -> None:
        size = self._end - self._start
        cap = len(self._buf)
        if size + extra <= cap:
            return
        newcap = max(cap, _INITIAL_CAPACITY)
        while newcap < size + extra:
            newcap *= 2
        self._relocate(min(newcap, self._limit))

    def _relocate(self, newcap: int) -> None:
        size = self._end - self._start
        new = bytearray(newcap)
        dst = memoryview(new)
        pos = 0
        for v in self._views(self._start, size):
            dst[pos : pos + len(v)] = v
            pos += len(v)
        self._buf = new
        self._head = 0

    def shrink(self) -> None:
        """Give back storage not needed for the unacknowledged bytes (call when idle)."""
        size = self._end - self._start
        self._wv = 0
        if size == 0:
            if self._buf:  # (already empty: nothing to allocate)
                self._buf = bytearray()
            self._head = 0
            return
        want = _INITIAL_CAPACITY
        while want < size:
            want *= 2
        want = min(want, self._limit)
        if want < len(self._buf):
            self._relocate(want)

    # -- writing ---------------------------------------------------------------------------
    def append(self, data: Any) -> None:
        """Append all of ``data`` or, if it does not fit under the limit, nothing."""
        mv = _as_bytes_view(data)
        n = mv.nbytes
        self._wv = 0
        if n > self.free:
            raise ReplayFullError(
                f"append of {n} bytes exceeds the {self.free} bytes free (limit {self._limit})"
            )
        if self._end + n > MAX_OFFSET:
            raise ValueError("stream offset would pass 2**64-1")
        if n == 0:
            return
        self._reserve(n)
        cap = len(self._buf)
        tail = (self._head + self._end - self._start) % cap
        first = min(n, cap - tail)
        buf = memoryview(self._buf)
        buf[tail : tail + first] = mv[:first]
        if first < n:
            buf[: n - first] = mv[first:]
        self._end += n

    def write_view(self, max_bytes: int | None = None) -> memoryview:
        """A writable view of contiguous free space at the end (for ``recv_into``).

        Its length is at most ``max_bytes`` and at most ``free``; it is empty only when the buffer
        is full (or ``max_bytes`` is 0). Fill a prefix, then call ``commit(n)`` before any other
        call that changes the buffer.
        """
        want = self.free if max_bytes is None else min(max_bytes, self.free)
        if want < 0:
            raise ValueError("max_bytes must not be negative")
        self._wv = 0
        if want == 0:
            return memoryview(bytearray())
        size = self._end - self._start
        if size == 0:
            self._head = 0
        self._reserve(want)
        cap = len(self._buf)
        tail = (self._head + size) % cap
        if size == cap:
            contiguous = 0  # cannot happen: want > 0 and reserve made room
        elif tail >= self._head:
            contiguous = cap - tail
        else:
            contiguous = self._head - tail
        n = min(want, contiguous)
        self._wv = n
        return memoryview(self._buf)[tail : tail + n]

    def recv_window(self, max_bytes: int) -> memoryview:
        """``write_view(max_bytes)`` for a receive that fills it at once and commits before
        anything else touches the buffer (the compiled core reuses one window object)."""
        return self.write_view(max_bytes)

    def commit(self, n: int) -> None:
        """Add the first ``n`` bytes written into the last ``write_view`` to the buffer."""
        if not 0 <= n <= self._wv:
            raise ValueError(f"commit of {n} bytes, but the last write_view offered {self._wv}")
        if self._end + n > MAX_OFFSET:
            raise ValueError("stream offset would pass 2**64-1")
        self._wv = 0
        self._end += n

    def _commit(self, n: int) -> None:
        """``commit(n)`` (the compiled core's takes a C integer)."""
        self.commit(n)

    # -- acknowledging and replaying -------------------------------------------------------
    def ack(self, offset: int) -> int:
        """Drop the bytes before ``offset`` (the peer has them); return how many were dropped."""
        if offset < self._start or offset > self._end:
            raise ReplayRangeError(
                f"ack {offset} outside the unacknowledged range [{self._start}, {self._end}]"
            )
        k = offset - self._start
        if k:
            self._wv = 0
            self._start = offset
            if self._start == self._end:
                self._head = 0
            else:
                self._head = (self._head + k) % len(self._buf)
        return k

    def _ack_at(self, offset: int) -> int:
        """``ack`` for a caller whose offset is an int in 0..2**64-1 (the session engine): the
        compiled core takes it as a C integer, without an int object per call."""
        return self.ack(offset)

    def _views(self, offset: int, n: int) -> list[memoryview]:
        if n == 0:
            return []
        cap = len(self._buf)
        pos = (self._head + offset - self._start) % cap
        buf = memoryview(self._buf)
        first = min(n, cap - pos)
        out = [buf[pos : pos + first]]
        if first < n:
            out.append(buf[: n - first])
        return out

    def frame(self, type: int, flags: int, offset: int, n: int, ack: int) -> bytes:
        """A whole frame as one bytes object, as ``encode_frame(type, flags, offset, ack,
        payload)`` gives it, whose payload is the ``n`` buffered bytes from ``offset``: copied
        straight from the ring (across its wrap too), with no view in between. For small frames,
        where one buffer to write costs less than a header and a view."""
        offset = operator.index(offset)
        n = operator.index(n)
        if n < 0 or offset < self._start or offset > self._end or n > self._end - offset:
            raise ReplayRangeError(
                f"frame of {n} bytes from {offset} outside the buffered range "
                f"[{self._start}, {self._end}]"
            )
        return encode_frame(type, flags, offset, ack, b"".join(self.views(offset, n)))

    def _frame_at(self, type: int, flags: int, offset: int, n: int, ack: int) -> bytes:
        """``frame`` for a caller whose arguments are ints in 0..2**64-1 (the session engine):
        the compiled core takes them as C integers, without an int object per argument."""
        return self.frame(type, flags, offset, n, ack)

    def views(self, offset: int | None = None, max_bytes: int | None = None) -> list[memoryview]:
        """The bytes from ``offset`` (default: start) to the end, at most ``max_bytes`` of them,
        as one or two read-only memoryviews in stream order (two when the ring wraps)."""
        if offset is None:
            offset = self._start
        if offset < self._start or offset > self._end:
            raise ReplayRangeError(
                f"replay from {offset} outside the buffered range [{self._start}, {self._end}]"
            )
        n = self._end - offset
        if max_bytes is not None:
            if max_bytes < 0:
                raise ValueError("max_bytes must not be negative")
            n = min(n, max_bytes)
        return [v.toreadonly() for v in self._views(offset, n)]

    def __repr__(self) -> str:
        return (
            f"ReplayBuffer(start={self._start}, end={self._end}, limit={self._limit}, "
            f"capacity={len(self._buf)})"
        )

