# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""Compiled core of icafast: CRC32C, frame codec and replay buffer.

A drop-in twin of ``icafast._pure`` (which is the specification): same API, same results, same
exceptions with the same messages. The byte work is done by plain C in ``csrc/`` (crc32c.c,
frame.c); this module only moves buffers around and maps C status codes to the exceptions that
``icafast.errors.frame_error`` builds, exactly as the pure twin does.

Deliberate (documented) differences, none reachable with well-typed arguments:

* ``ReplayBuffer`` needs real integers: a non-int ``limit``/``start``/offset/count that the pure
  twin would accept for a while (e.g. ``5.0``) raises ``TypeError`` at once here (the pure twin
  raises ``TypeError`` later or misbehaves), and bool arguments are stored as ``0``/``1``.
* ``FrameDecoder.feed`` given a non-contiguous (strided) byte view fails where the pure twin
  fails (it parses headers with ``struct`` and collects partial ones with ``bytearray +=``,
  which need contiguous memory), with the same exception, and decodes what it decodes.
* The compiled ``Frame``, ``FrameDecoder`` and ``ReplayBuffer`` are extension types: the decoder
  and the replay buffer cannot be pickled.
"""

cimport cython
from cpython.buffer cimport (
    PyBUF_FORMAT,
    PyBUF_ND,
    PyBUF_SIMPLE,
    PyBUF_STRIDES,
    PyBuffer_Release,
)
from cpython.bytearray cimport (
    PyByteArray_AS_STRING,
    PyByteArray_FromStringAndSize,
    PyByteArray_GET_SIZE,
    PyByteArray_Resize,
)
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.exc cimport PyErr_Clear, PyErr_Occurred
from cpython.long cimport PyLong_Check, PyLong_CheckExact
from cpython.memoryview cimport PyMemoryView_FromObject, PyMemoryView_GET_BUFFER
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

import math
import operator
import struct

from icafast.errors import (
    FRAME_ERR_CHECKSUM,
    FRAME_ERR_TRUNCATED,
    ReplayFullError,
    ReplayRangeError,
    frame_error,
)
from icafast.wire import (
    ALLOWED_FLAGS,
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    MAX_OFFSET,
    MAX_PAYLOAD_LIMIT,
)


cdef extern from "Python.h":
    # Variants that leave the error to us instead of raising (we fall back to the slow path).
    int _get_buffer "PyObject_GetBuffer" (object obj, Py_buffer *view, int flags)
    unsigned long long _as_ull "PyLong_AsUnsignedLongLong" (object obj)


cdef extern from "mem.h" nogil:
    void icafast_hint_huge_pages(void *p, size_t n)


cdef extern from "crc32c.h" nogil:
    uint32_t icafast_crc32c(uint32_t crc, const void *buf, size_t len)
    const char *icafast_crc32c_backend()


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

IMPLEMENTATION = "cython"

# Inputs at least this long are checksummed with the GIL released.
cdef Py_ssize_t NOGIL_MIN = 64 * 1024
cdef uint64_t U64_MAX = 0xFFFFFFFFFFFFFFFFULL
cdef uint64_t U32_MAX = 0xFFFFFFFFULL
cdef uint64_t REPLAY_LIMIT_MAX = 0xFFFFFFFFULL * 256
cdef uint64_t INITIAL_CAPACITY = 16 * 1024
# A payload spanning feeds starts in at most this much storage (or what arrived, if more), which
# then grows with the bytes that arrive: a length field alone never allocates its claim.
cdef Py_ssize_t BODY_INITIAL = 64 * 1024

assert HEADER_SIZE == ICAFAST_HEADER_SIZE


# --------------------------------------------------------------------------------------------
# Helpers.


cdef object _as_bytes_view(object data):
    """The pure twin's ``_as_bytes_view``: same result, same exceptions."""
    cdef Py_buffer *b
    if isinstance(data, str):
        raise TypeError("expected a bytes-like object, not str")
    mv = PyMemoryView_FromObject(data)
    b = PyMemoryView_GET_BUFFER(mv)
    # memoryview.format is "B" when the exporter gives no format
    if b.ndim == 1 and (b.format == NULL or (b.format[0] == b'B' and b.format[1] == 0)):
        return mv
    return mv.cast("B")


cdef int _acquire(object data, Py_buffer *view) except -1:
    """Fill ``view`` with the bytes of ``data`` (release with PyBuffer_Release).

    Returns 0 for the fast path, one contiguous PyBUF_SIMPLE export. Anything else goes through
    the pure twin's conversion, so a bad argument raises exactly what the pure twin raises; a
    non-contiguous (strided) byte view is read from a contiguous copy, and 1 is returned.
    """
    if _get_buffer(data, view, PyBUF_SIMPLE) == 0:
        return 0
    PyErr_Clear()
    mv = _as_bytes_view(data)
    if _get_buffer(mv, view, PyBUF_SIMPLE) == 0:
        return 0
    PyErr_Clear()
    copy = mv.tobytes()
    if _get_buffer(copy, view, PyBUF_SIMPLE) != 0:  # pragma: no cover - bytes always export
        raise BufferError("cannot export a bytes object")
    return 1


cdef inline bint _u64(object x, uint64_t *out):
    """True (and ``*out`` set) when ``x`` is an int in 0..2**64-1; never raises."""
    cdef unsigned long long v
    if not PyLong_Check(x):
        return False
    v = _as_ull(x)
    if v == <unsigned long long>-1 and PyErr_Occurred():
        PyErr_Clear()
        return False
    out[0] = v
    return True


cdef inline uint32_t _crc(uint32_t crc, const void *buf, Py_ssize_t n) noexcept:
    if n >= NOGIL_MIN:
        with nogil:
            crc = icafast_crc32c(crc, buf, <size_t>n)
        return crc
    return icafast_crc32c(crc, buf, <size_t>n)


# --------------------------------------------------------------------------------------------
# CRC32C.


cdef uint32_t _crc_value_slow(object value) except? 0xFFFFFFFF:
    # The pure twin's checks and first operation on ``value``, for anything but a small int.
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError("crc value must be in 0..0xFFFFFFFF")
    x = value ^ 0xFFFFFFFF
    return <uint32_t>(operator.index(x) ^ 0xFFFFFFFF)


def crc32c(data, value=0):
    """CRC32C of ``data`` (any buffer); pass a previous result as ``value`` to continue it."""
    cdef Py_buffer view
    cdef uint64_t v
    cdef uint32_t crc
    if PyBytes_CheckExact(data) and PyLong_CheckExact(value):  # the common case, no export
        if _u64(value, &v) and v <= U32_MAX:
            return _crc(<uint32_t>v, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
    _acquire(data, &view)
    try:
        if _u64(value, &v) and v <= U32_MAX:
            crc = <uint32_t>v
        else:
            crc = _crc_value_slow(value)
        crc = _crc(crc, view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return crc


def crc32c_backend():
    """Which CRC32C code path is in use: "avx512-vpclmulqdq", "sse4.2", "armv8" or a portable
    software one."""
    return (<bytes>icafast_crc32c_backend()).decode("ascii")


# --------------------------------------------------------------------------------------------
# Frames.

_HDR = struct.Struct(">BBHIQQ")
_CRC = struct.Struct(">I")


@cython.freelist(64)
cdef class Frame:
    """One decoded frame. ``payload`` is a memoryview (see FrameDecoder.feed for its lifetime)."""

    # (its fields are declared in icafast/_core.pxd)

    def __init__(self, type, flags, seq, ack, payload):
        self.type = type
        self.flags = flags
        self.seq = seq
        self.ack = ack
        self.payload = payload

    def __eq__(self, other):
        if not hasattr(other, "payload"):
            return NotImplemented
        o = other
        return (self.type, self.flags, self.seq, self.ack) == (o.type, o.flags, o.seq, o.ack) and (
            bytes(self.payload) == bytes(o.payload)
        )

    def __ne__(self, other):
        r = self.__eq__(other)
        if r is NotImplemented:
            return r
        return not r

    __hash__ = None

    def __repr__(self):
        return (
            f"Frame(type=0x{self.type:02x}, flags=0x{self.flags:02x}, seq={self.seq}, "
            f"ack={self.ack}, payload=<{len(self.payload)} bytes>)"
        )


cdef inline Frame _new_frame(const icafast_frame_header *h, object payload):
    cdef Frame f = Frame.__new__(Frame)
    f.type = h.type
    f.flags = h.flags
    f.seq = h.seq
    f.ack = h.ack
    f.payload = payload
    return f


def _check_header_args(type, flags, seq, ack, length):
    """The pure twin's argument checks, verbatim (used when the fast checks fail)."""
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


cdef bytes _encode_header_slow(object type, object flags, object seq, object ack, Py_buffer *view):
    # Arguments the fast path did not take (bad values, or int-like non-ints such as numpy
    # integers): the pure twin's code path, so errors and results are the same.
    cdef uint32_t crc
    _check_header_args(type, flags, seq, ack, view.len)
    head = _HDR.pack(type, flags, 0, view.len, seq, ack)
    crc = icafast_crc32c(0, PyBytes_AS_STRING(head), 24)
    crc = _crc(crc, view.buf, view.len)
    return head + _CRC.pack(crc)


cdef inline bint _fast_args(object type, object flags, object seq, object ack, Py_ssize_t length,
                            uint64_t *t, uint64_t *f, uint64_t *s, uint64_t *a):
    return (
        _u64(type, t) and _u64(flags, f) and _u64(seq, s) and _u64(ack, a)
        and icafast_frame_check_args(t[0], f[0], <uint64_t>length) == ICAFAST_FRAME_OK
    )


def encode_header(type, flags, seq, ack, payload=b""):
    """The 28-byte header for ``payload`` (checksum over header and payload included).

    Send the header and then the payload itself (vectored write): the payload is not copied.
    """
    cdef Py_buffer view
    cdef uint64_t t, f, s, a
    cdef bytes out
    cdef unsigned char *o
    _acquire(payload, &view)
    try:
        if not _fast_args(type, flags, seq, ack, view.len, &t, &f, &s, &a):
            return _encode_header_slow(type, flags, seq, ack, &view)
        out = PyBytes_FromStringAndSize(NULL, ICAFAST_HEADER_SIZE)
        o = <unsigned char *>PyBytes_AS_STRING(out)
        if view.len >= NOGIL_MIN:
            with nogil:
                icafast_frame_header_encode(o, <uint8_t>t, <uint8_t>f, s, a, view.buf,
                                            <uint32_t>view.len)
        else:
            icafast_frame_header_encode(o, <uint8_t>t, <uint8_t>f, s, a, view.buf,
                                        <uint32_t>view.len)
        return out
    finally:
        PyBuffer_Release(&view)


def encode_frame(type, flags=0, seq=0, ack=0, payload=b""):
    """A whole frame (header + payload) as one bytes object."""
    cdef Py_buffer view
    cdef uint64_t t, f, s, a
    cdef bytes out
    cdef unsigned char *o
    _acquire(payload, &view)
    try:
        if not _fast_args(type, flags, seq, ack, view.len, &t, &f, &s, &a):
            return _encode_header_slow(type, flags, seq, ack, &view) + bytes(_as_bytes_view(payload))
        out = PyBytes_FromStringAndSize(NULL, ICAFAST_HEADER_SIZE + view.len)
        o = <unsigned char *>PyBytes_AS_STRING(out)
        if view.len >= NOGIL_MIN:
            with nogil:
                memcpy(o + ICAFAST_HEADER_SIZE, view.buf, <size_t>view.len)
                icafast_frame_header_encode(o, <uint8_t>t, <uint8_t>f, s, a,
                                            o + ICAFAST_HEADER_SIZE, <uint32_t>view.len)
        else:
            memcpy(o + ICAFAST_HEADER_SIZE, view.buf, <size_t>view.len)
            icafast_frame_header_encode(o, <uint8_t>t, <uint8_t>f, s, a,
                                        o + ICAFAST_HEADER_SIZE, <uint32_t>view.len)
        return out
    finally:
        PyBuffer_Release(&view)


cdef int _strided_concat() except -1:
    # What the pure twin's ``bytearray += memoryview`` raises for a non-contiguous view.
    raise TypeError("can't concat memoryview to bytearray")


@cython.auto_pickle(False)
cdef class FrameDecoder:
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

    # (its fields are declared in icafast/_core.pxd)

    def __cinit__(self):
        self._cmax = DEFAULT_MAX_PAYLOAD
        self._max = DEFAULT_MAX_PAYLOAD

    def __init__(self, max_payload=DEFAULT_MAX_PAYLOAD, copy_below=0):
        cdef uint64_t m
        copy_below = operator.index(copy_below)
        if not 0 <= copy_below <= MAX_PAYLOAD_LIMIT:
            raise ValueError("copy_below must be in 0..2**32-1")
        self._copy_below = copy_below
        if _u64(max_payload, &m) and m <= U32_MAX:
            self._cmax = m
        else:
            if not 0 <= max_payload <= MAX_PAYLOAD_LIMIT:
                raise ValueError("max_payload must be in 0..2**32-1")
            # e.g. a float: ``length > max_payload`` <=> ``length > floor(max_payload)``
            self._cmax = math.floor(max_payload)
        self._max = max_payload
        self._hdr_len = 0
        self._fields = False
        self._body = None
        self._have = 0
        self._offset = 0
        self._error = None

    @property
    def max_payload(self):
        return self._max

    @property
    def offset(self):
        """Stream offset where the next (or the incomplete) frame starts."""
        return self._offset

    @property
    def buffered(self):
        """Bytes held for an incomplete frame."""
        if self._fields:
            return ICAFAST_HEADER_SIZE + self._have
        return self._hdr_len

    cdef object _fail(self, int code, object a, object b):
        err = frame_error(code, self._offset, a, b)
        self._error = err
        return err

    cpdef list feed(self, data):
        """Decode the frames completed by ``data``; see the class docstring."""
        cdef Py_buffer view
        cdef const unsigned char *p
        cdef const unsigned char *hdrp
        cdef unsigned char *bp
        cdef Py_ssize_t n, pos, start, take, length, cap
        cdef uint64_t a, b
        cdef int rc
        cdef icafast_frame_header h
        cdef Frame frame
        cdef int strided
        if self._error is not None:
            raise self._error
        strided = _acquire(data, &view)
        mv = None
        out = []
        try:
            p = <const unsigned char *>view.buf
            n = view.len
            pos = 0
            while pos < n:
                if self._fields:  # filling a payload that spans feeds
                    body = self._body
                    length = self._h.length
                    take = length - self._have
                    if take > n - pos:
                        take = n - pos
                    cap = PyByteArray_GET_SIZE(body)
                    if self._have + take > cap:  # grow: at least double, never past the length
                        cap = 2 * cap if 2 * cap > self._have + take else self._have + take
                        if cap > length:
                            cap = length
                        PyByteArray_Resize(body, cap)
                    bp = <unsigned char *>PyByteArray_AS_STRING(body)
                    memcpy(bp + self._have, p + pos, <size_t>take)
                    self._have += take
                    pos += take
                    if self._have < length:
                        break
                    rc = icafast_frame_verify(self._hdr, bp, <size_t>length, &a, &b)
                    if rc != ICAFAST_FRAME_OK:
                        raise self._fail(rc, a, b)
                    self._offset += ICAFAST_HEADER_SIZE + <uint64_t>length
                    frame = _new_frame(&self._h, memoryview(body))
                    self._fields = False
                    self._body = None
                    self._have = 0
                    out.append(frame)
                    continue
                if self._hdr_len:  # completing a header that spans feeds
                    take = ICAFAST_HEADER_SIZE - self._hdr_len
                    if take > n - pos:
                        take = n - pos
                    if strided and take > 1:
                        _strided_concat()
                    memcpy(self._hdr + self._hdr_len, p + pos, <size_t>take)
                    self._hdr_len += take
                    pos += take
                    if self._hdr_len < ICAFAST_HEADER_SIZE:
                        break
                    hdrp = self._hdr
                    self._hdr_len = 0
                    start = pos
                elif n - pos >= ICAFAST_HEADER_SIZE:
                    if strided:
                        raise BufferError("memoryview: underlying buffer is not C-contiguous")
                    hdrp = p + pos
                    start = pos + ICAFAST_HEADER_SIZE
                else:
                    if strided and n - pos > 1:
                        _strided_concat()
                    memcpy(self._hdr, p + pos, <size_t>(n - pos))
                    self._hdr_len = n - pos
                    break
                rc = icafast_frame_header_parse(hdrp, self._cmax, &h, &a, &b)
                if rc != ICAFAST_FRAME_OK:
                    raise self._fail(rc, a, self._max if rc == 4 else b)
                length = h.length
                if n - start >= length:  # whole payload in this buffer: zero copy
                    rc = icafast_frame_verify(hdrp, p + start, <size_t>length, &a, &b)
                    if rc != ICAFAST_FRAME_OK:
                        raise self._fail(rc, a, b)
                    self._offset += ICAFAST_HEADER_SIZE + <uint64_t>length
                    if length < self._copy_below:
                        out.append(_new_frame(&h, PyBytes_FromStringAndSize(
                            <const char *>p + start, length)))
                    else:
                        if mv is None:
                            mv = _as_bytes_view(data)
                        out.append(_new_frame(&h, mv[start:start + length]))
                    pos = start + length
                else:
                    if hdrp != self._hdr:
                        memcpy(self._hdr, hdrp, ICAFAST_HEADER_SIZE)
                    cap = n - start if n - start > BODY_INITIAL else BODY_INITIAL
                    if cap > length:
                        cap = length
                    body = PyByteArray_FromStringAndSize(NULL, cap)
                    self._h = h
                    self._fields = True
                    self._body = body
                    self._have = n - start
                    memcpy(PyByteArray_AS_STRING(body), p + start, <size_t>self._have)
                    pos = n
        finally:
            PyBuffer_Release(&view)
        return out

    cpdef Frame feed_one(self, data):
        """``feed(data)[0]`` when nothing is buffered and ``data`` is exactly one whole frame
        (a relay's usual receive of a small message: no list); otherwise None, and nothing is
        consumed. Raises what ``feed`` raises for the same frame."""
        cdef Py_buffer view
        if self._error is not None:
            raise self._error
        if self._fields or self._hdr_len:
            return None
        if PyBytes_CheckExact(data):  # (what the event loop hands over: no buffer export)
            return self._one(data, <const unsigned char *>PyBytes_AS_STRING(data),
                             PyBytes_GET_SIZE(data))
        if _get_buffer(data, &view, PyBUF_SIMPLE) != 0:
            PyErr_Clear()
            return None  # (not a simple contiguous buffer: feed() handles or rejects it)
        try:
            return self._one(data, <const unsigned char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef Frame _one(self, object data, const unsigned char *p, Py_ssize_t n):
        # feed_one's work on the n bytes of data at p
        cdef uint64_t length, a, b
        cdef int rc
        cdef icafast_frame_header h
        if n < ICAFAST_HEADER_SIZE:
            return None
        icafast_frame_header_unpack(p, &h)
        length = h.length
        if <uint64_t>(n - ICAFAST_HEADER_SIZE) != length:
            return None
        rc = icafast_frame_header_check(&h, self._cmax, &a, &b)
        if rc != ICAFAST_FRAME_OK:
            raise self._fail(rc, a, self._max if rc == 4 else b)
        rc = icafast_frame_verify(p, p + ICAFAST_HEADER_SIZE, <size_t>length, &a, &b)
        if rc != ICAFAST_FRAME_OK:
            raise self._fail(rc, a, b)
        self._offset += <uint64_t>n
        if <Py_ssize_t>length < self._copy_below:
            return _new_frame(&h, PyBytes_FromStringAndSize(
                <const char *>p + ICAFAST_HEADER_SIZE, <Py_ssize_t>length))
        return _new_frame(&h, _as_bytes_view(data)[ICAFAST_HEADER_SIZE:])

    def feed_eof(self):
        """The stream ended: raise FrameError if it ended inside a frame."""
        if self._error is not None:
            raise self._error
        if self._fields:
            raise self._fail(
                FRAME_ERR_TRUNCATED,
                ICAFAST_HEADER_SIZE + self._have,
                ICAFAST_HEADER_SIZE + <Py_ssize_t>self._h.length,
            )
        if self._hdr_len:
            raise self._fail(FRAME_ERR_TRUNCATED, self._hdr_len, ICAFAST_HEADER_SIZE)


# --------------------------------------------------------------------------------------------
# Replay buffer.


cdef inline uint64_t _index(object x) except? 0:
    # A non-int that passed the pure twin's range checks: insist on a real integer.
    return operator.index(x)


cdef char *_FORMAT_B = "B"  # (a C string constant: the buffer format of unsigned bytes)


@cython.auto_pickle(False)
cdef class RecvWindow:
    """A writable window on a :class:`ReplayBuffer`'s free space, for one receive.

    Returned by ``ReplayBuffer.recv_window``: a one-dimensional, writable, contiguous buffer of
    unsigned bytes (the buffer protocol only), reused for each receive so that filling the ring
    from a socket allocates nothing. Empty once its bytes are committed.
    """

    def __cinit__(self):
        self._owner = None
        self._p = NULL
        self._len = 0
        self._exports = 0

    def __len__(self):
        return self._len

    def __getbuffer__(self, Py_buffer *view, int flags):
        # (a writable request on a read-only window cannot happen: windows are always writable)
        view.buf = <void *>self._p
        view.obj = self
        view.len = self._len
        view.readonly = 0
        view.itemsize = 1
        view.format = _FORMAT_B if flags & PyBUF_FORMAT else NULL
        view.ndim = 1
        view.shape = &self._len if flags & PyBUF_ND else NULL
        view.strides = &view.itemsize if (flags & PyBUF_STRIDES) == PyBUF_STRIDES else NULL
        view.suboffsets = NULL
        view.internal = NULL
        self._exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        self._exports -= 1

    def __repr__(self):
        return f"<RecvWindow of {self._len} bytes>"


@cython.auto_pickle(False)
cdef class ReplayBuffer:
    """Bounded ring of outbound bytes addressed by absolute stream offset.

    Holds the bytes ``[start, end)``: sent (or about to be) and not yet acknowledged by the peer.
    ``limit`` bounds ``end - start``; storage grows on demand up to it and ``shrink()`` gives it
    back. Unacknowledged bytes are never dropped: ``append`` refuses (ReplayFullError) instead.

    Memoryviews returned by ``views``/``write_view`` stay valid until the bytes they show are
    acknowledged (storage is replaced, never resized, so old views keep their old storage alive).
    """

    # (its fields are declared in icafast/_core.pxd)

    def __cinit__(self):
        self._set_storage(bytearray())

    def __init__(self, limit, start=0):
        cdef uint64_t l, s
        if not (_u64(limit, &l) and 0 < l <= REPLAY_LIMIT_MAX):
            if not 0 < limit <= MAX_PAYLOAD_LIMIT * 256:
                raise ValueError("limit must be positive and at most 2**40")
            l = _index(limit)
        if not _u64(start, &s):
            if not 0 <= start <= MAX_OFFSET:
                raise ValueError("start must be in 0..2**64-1")
            s = _index(start)
        self._limit = l
        self._set_storage(bytearray())
        self._head = 0
        self._start = s
        self._end = s
        self._wv = 0

    cdef int _set_storage(self, object buf) except -1:
        cdef RecvWindow w = self._win
        if w is not None:  # it points into the storage being replaced
            if w._exports:
                self._win = None  # its holder keeps the old storage alive, then drops it
            else:
                w._owner = None
                w._p = NULL
                w._len = 0
        self._buf = buf
        self._mv = memoryview(buf)
        self._rmv = self._mv.toreadonly()
        self._ptr = <unsigned char *>PyByteArray_AS_STRING(buf)
        self._cap = len(buf)
        return 0

    # -- state -----------------------------------------------------------------------------
    @property
    def limit(self):
        return self._limit

    @property
    def start(self):
        """Offset of the oldest unacknowledged byte."""
        return self._start

    @property
    def end(self):
        """Offset one past the newest byte."""
        return self._end

    @property
    def free(self):
        """Bytes that may still be appended before the limit is reached."""
        return self._limit - (self._end - self._start)

    @property
    def capacity(self):
        """Bytes of storage currently allocated (grows on demand, at most ``limit``)."""
        return self._cap

    def __len__(self):
        return <Py_ssize_t>(self._end - self._start)

    # -- storage ---------------------------------------------------------------------------
    cdef int _reserve(self, uint64_t extra) except -1:
        cdef uint64_t size = self._end - self._start
        cdef uint64_t newcap
        if size + extra <= self._cap:
            return 0
        newcap = self._cap if self._cap > INITIAL_CAPACITY else INITIAL_CAPACITY
        while newcap < size + extra:
            newcap *= 2
        self._relocate(newcap if newcap < self._limit else self._limit)
        return 0

    cdef int _relocate(self, uint64_t newcap) except -1:
        cdef uint64_t size = self._end - self._start
        cdef uint64_t first
        new = PyByteArray_FromStringAndSize(NULL, <Py_ssize_t>newcap)
        cdef unsigned char *dst = <unsigned char *>PyByteArray_AS_STRING(new)
        icafast_hint_huge_pages(dst, <size_t>newcap)  # (before the first touch, below)
        if size:
            first = self._cap - self._head
            if first > size:
                first = size
            memcpy(dst, self._ptr + self._head, <size_t>first)
            if first < size:
                memcpy(dst + first, self._ptr, <size_t>(size - first))
        memset(dst + size, 0, <size_t>(newcap - size))  # as bytearray(newcap) would be
        self._set_storage(new)
        self._head = 0
        return 0

    def shrink(self):
        """Give back storage not needed for the unacknowledged bytes (call when idle)."""
        cdef uint64_t size = self._end - self._start
        cdef uint64_t want
        self._wv = 0
        if size == 0:
            if self._cap:  # (already empty: nothing to allocate)
                self._set_storage(bytearray())
            self._head = 0
            return
        want = INITIAL_CAPACITY
        while want < size:
            want *= 2
        if want > self._limit:
            want = self._limit
        if want < self._cap:
            self._relocate(want)

    # -- writing ---------------------------------------------------------------------------
    def append(self, data):
        """Append all of ``data`` or, if it does not fit under the limit, nothing."""
        cdef Py_buffer view
        cdef uint64_t n, free, tail, first
        _acquire(data, &view)
        try:
            n = <uint64_t>view.len
            self._wv = 0
            free = self._limit - (self._end - self._start)
            if n > free:
                raise ReplayFullError(
                    f"append of {n} bytes exceeds the {free} bytes free (limit {self._limit})"
                )
            if n > U64_MAX - self._end:
                raise ValueError("stream offset would pass 2**64-1")
            if n == 0:
                return
            self._reserve(n)
            tail = (self._head + self._end - self._start) % self._cap
            first = self._cap - tail
            if first > n:
                first = n
            memcpy(self._ptr + tail, view.buf, <size_t>first)
            if first < n:
                memcpy(self._ptr, <const char *>view.buf + first, <size_t>(n - first))
            self._end += n
        finally:
            PyBuffer_Release(&view)

    cpdef write_view(self, max_bytes=None):
        """A writable view of contiguous free space at the end (for ``recv_into``).

        Its length is at most ``max_bytes`` and at most ``free``; it is empty only when the buffer
        is full (or ``max_bytes`` is 0). Fill a prefix, then call ``commit(n)`` before any other
        call that changes the buffer.
        """
        cdef uint64_t size = self._end - self._start
        cdef uint64_t free = self._limit - size
        cdef uint64_t want, m, tail, n
        if max_bytes is None:
            want = free
        elif _u64(max_bytes, &m):
            want = m if m < free else free
        else:
            w = min(max_bytes, free)
            if w < 0:
                raise ValueError("max_bytes must not be negative")
            want = _index(w)
            # (user code ran above: re-read the state so the ring arithmetic stays in bounds)
            size = self._end - self._start
            free = self._limit - size
            if want > free:
                want = free
        n = self._open_write(want, &tail)
        if n == 0:
            return memoryview(bytearray())
        return self._mv[tail:tail + n]

    cdef uint64_t _open_write(self, uint64_t want, uint64_t *tail) except? 0xFFFFFFFFFFFFFFFF:
        """Reserve room for ``want`` (at most ``free``) bytes; the contiguous free bytes at the
        end from storage index ``tail`` on, at most ``want`` (what commit accepts now)."""
        cdef uint64_t size = self._end - self._start
        cdef uint64_t contiguous, n
        self._wv = 0
        if want == 0:
            return 0
        if size == 0:
            self._head = 0
        self._reserve(want)
        tail[0] = (self._head + size) % self._cap
        if size == self._cap:
            contiguous = 0
        elif tail[0] >= self._head:
            contiguous = self._cap - tail[0]
        else:
            contiguous = self._head - tail[0]
        n = want if want < contiguous else contiguous
        self._wv = n
        return n

    cpdef recv_window(self, uint64_t max_bytes):
        """``write_view(max_bytes)`` for a receive that fills it at once and commits before
        anything else touches the buffer (``BufferedProtocol.get_buffer``, ``recv_into``).

        It returns the same :class:`RecvWindow` each time, pointed at the new free space, instead
        of a new memoryview per receive (the pure twin returns ``write_view``'s memoryview). A
        window still exported when the next call comes is left to its holder and replaced.
        """
        cdef uint64_t free = self._limit - (self._end - self._start)
        cdef uint64_t tail = 0
        cdef uint64_t n = self._open_write(max_bytes if max_bytes < free else free, &tail)
        cdef RecvWindow w = self._win
        if w is None or w._exports:
            w = self._win = RecvWindow.__new__(RecvWindow)
        if n:
            w._owner = self._buf
            w._p = self._ptr + tail
            w._len = <Py_ssize_t>n
        else:
            w._owner = None
            w._p = NULL
            w._len = 0
        return w

    cpdef commit(self, n):
        """Add the first ``n`` bytes written into the last ``write_view`` to the buffer."""
        cdef uint64_t k
        if not (_u64(n, &k) and k <= self._wv):
            if not 0 <= n <= self._wv:
                raise ValueError(f"commit of {n} bytes, but the last write_view offered {self._wv}")
            k = _index(n)  # (may run user code that changes _wv: _commit checks k again)
        self._commit(k)

    cpdef _commit(self, uint64_t n):
        """``commit(n)`` with a C integer (the relay's per-receive call)."""
        if n > self._wv:
            raise ValueError(f"commit of {n} bytes, but the last write_view offered {self._wv}")
        if n > U64_MAX - self._end:
            # The pure twin lets ``end`` pass 2**64-1 here; 64-bit offsets cannot.
            raise ValueError("stream offset would pass 2**64-1")
        self._wv = 0
        self._end += n
        self._close_window()

    cdef void _close_window(self) noexcept:
        # The committed bytes are the replay buffer's now: the window no longer shows them
        # (unless it is exported: its holder broke the fill-then-commit contract).
        cdef RecvWindow w = self._win
        if w is not None and not w._exports:
            w._owner = None
            w._p = NULL
            w._len = 0

    # -- acknowledging and replaying -------------------------------------------------------
    cpdef ack(self, offset):
        """Drop the bytes before ``offset`` (the peer has them); return how many were dropped."""
        cdef uint64_t o
        if not (_u64(offset, &o) and self._start <= o <= self._end):
            if offset < self._start or offset > self._end:
                raise ReplayRangeError(
                    f"ack {offset} outside the unacknowledged range [{self._start}, {self._end}]"
                )
            o = _index(offset)
            if not self._start <= o <= self._end:  # changed by user code above
                raise ReplayRangeError(
                    f"ack {offset} outside the unacknowledged range [{self._start}, {self._end}]"
                )
        return self._drop_to(o)

    cpdef uint64_t _ack_at(self, uint64_t offset) except? 0xFFFFFFFFFFFFFFFF:
        """``ack`` for a caller whose offset is already a C integer (the compiled engine)."""
        if not self._start <= offset <= self._end:
            return self.ack(offset)  # (raises, with ack's message)
        return self._drop_to(offset)

    cdef uint64_t _drop_to(self, uint64_t o) noexcept:
        cdef uint64_t k = o - self._start
        if k:
            self._wv = 0
            self._start = o
            if self._start == self._end:
                self._head = 0
            else:
                self._head = (self._head + k) % self._cap
        return k

    cdef list _views(self, uint64_t offset, uint64_t n):
        cdef uint64_t pos, first
        if n == 0:
            return []
        pos = (self._head + offset - self._start) % self._cap
        first = self._cap - pos
        if first >= n:
            return [self._rmv[pos:pos + n]]
        return [self._rmv[pos:pos + first], self._rmv[0:n - first]]

    cpdef bytes frame(self, object type, object flags, object offset, object n, object ack):
        """A whole frame as one bytes object, as ``encode_frame(type, flags, offset, ack,
        payload)`` gives it, whose payload is the ``n`` buffered bytes from ``offset``: copied
        straight from the ring (across its wrap too), with no view in between. For small frames,
        where one buffer to write costs less than a header and a view."""
        cdef uint64_t o, k, t, f, s, a
        if (_u64(offset, &o) and _u64(n, &k) and self._start <= o <= self._end
                and k <= self._end - o and _fast_args(type, flags, offset, ack, <Py_ssize_t>k,
                                                      &t, &f, &s, &a)):
            return self._frame_from_ring(t, f, o, k, a)
        # anything else: the pure twin's code, for its exact checks and errors
        offset = operator.index(offset)
        n = operator.index(n)
        if n < 0 or offset < self._start or offset > self._end or n > self._end - offset:
            raise ReplayRangeError(
                f"frame of {n} bytes from {offset} outside the buffered range "
                f"[{self._start}, {self._end}]"
            )
        return encode_frame(type, flags, offset, ack, b"".join(self.views(offset, n)))

    cpdef bytes _frame_at(self, uint64_t type, uint64_t flags, uint64_t offset, uint64_t n,
                          uint64_t ack):
        """``frame`` for a caller whose arguments are already C integers (the compiled
        engine): the same checks and errors, no int objects."""
        if (self._start <= offset <= self._end and n <= self._end - offset
                and icafast_frame_check_args(type, flags, n) == ICAFAST_FRAME_OK):
            return self._frame_from_ring(type, flags, offset, n, ack)
        return self.frame(type, flags, offset, n, ack)  # (raises, with frame's message)

    cdef bytes _frame_from_ring(self, uint64_t t, uint64_t f, uint64_t o, uint64_t k,
                                uint64_t a):
        # (arguments checked: o..o+k within the buffered range, a valid type, flags, length)
        cdef uint64_t pos, first
        cdef bytes out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(ICAFAST_HEADER_SIZE + k))
        cdef unsigned char *dst = <unsigned char *>PyBytes_AS_STRING(out)
        if k:
            pos = (self._head + o - self._start) % self._cap
            first = self._cap - pos
            if first > k:
                first = k
            memcpy(dst + ICAFAST_HEADER_SIZE, self._ptr + pos, <size_t>first)
            if first < k:
                memcpy(dst + ICAFAST_HEADER_SIZE + first, self._ptr, <size_t>(k - first))
        icafast_frame_header_encode(dst, <uint8_t>t, <uint8_t>f, o, a,
                                    dst + ICAFAST_HEADER_SIZE, <uint32_t>k)
        return out

    cpdef list views(self, offset=None, max_bytes=None):
        """The bytes from ``offset`` (default: start) to the end, at most ``max_bytes`` of them,
        as one or two read-only memoryviews in stream order (two when the ring wraps)."""
        cdef uint64_t o, n, m
        if offset is None:
            o = self._start
        elif not (_u64(offset, &o) and self._start <= o <= self._end):
            if offset < self._start or offset > self._end:
                raise ReplayRangeError(
                    f"replay from {offset} outside the buffered range [{self._start}, {self._end}]"
                )
            o = _index(offset)
        n = self._end - o
        if max_bytes is not None:
            if _u64(max_bytes, &m):
                if m < n:
                    n = m
            else:
                if max_bytes < 0:
                    raise ValueError("max_bytes must not be negative")
                n = _index(min(n, max_bytes))
        if not (self._start <= o <= self._end and n <= self._end - o):
            # only if user code run above (a non-int argument's comparisons) changed the buffer
            raise ReplayRangeError(
                f"replay from {offset} outside the buffered range [{self._start}, {self._end}]"
            )
        return self._views(o, n)

    def __repr__(self):
        return (
            f"ReplayBuffer(start={self._start}, end={self._end}, limit={self._limit}, "
            f"capacity={self._cap})"
        )
