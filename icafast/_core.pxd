# Declarations of the compiled core's types, for the compiled engine (icafast/protocol.pxd),
# which calls their per-message methods as C functions and reads the replay buffer's offsets as
# C fields. Final types: no subclass can override a method, so those calls skip Python's method
# lookup. Python code sees the same classes, methods and properties as the pure twin's.
cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "frame.h" nogil:
    enum:
        ICAFAST_HEADER_SIZE
        ICAFAST_FRAME_OK
    ctypedef struct icafast_frame_header:
        uint8_t type
        uint8_t flags
        uint16_t reserved
        uint32_t length
        uint64_t seq
        uint64_t ack
        uint32_t crc
    int icafast_frame_allowed_flags(unsigned int type)
    void icafast_frame_header_unpack(const unsigned char *buf, icafast_frame_header *h)
    int icafast_frame_header_check(const icafast_frame_header *h, uint64_t max_payload,
                                   uint64_t *a, uint64_t *b)
    int icafast_frame_header_parse(const unsigned char *buf, uint64_t max_payload,
                                   icafast_frame_header *h, uint64_t *a, uint64_t *b)
    int icafast_frame_verify(const unsigned char *hdr, const void *payload, size_t length,
                             uint64_t *a, uint64_t *b)
    int icafast_frame_check_args(uint64_t type, uint64_t flags, uint64_t length)
    uint32_t icafast_frame_header_encode(unsigned char *out, uint8_t type, uint8_t flags,
                                         uint64_t seq, uint64_t ack, const void *payload,
                                         uint32_t length)


@cython.final
cdef class Frame:
    # (C fields: the compiled engine reads them without an int object per field and frame)
    cdef public int type
    cdef public int flags
    cdef public uint64_t seq
    cdef public uint64_t ack
    cdef public object payload


@cython.final
cdef class FrameDecoder:
    cdef uint64_t _cmax              # payload limit for comparisons
    cdef object _max                 # payload limit as given (property, messages)
    cdef unsigned char _hdr[28]      # partial header; the whole header while _fields is set
    cdef Py_ssize_t _hdr_len         # bytes of the partial header
    cdef bint _fields                # a header is parsed and its payload is being assembled
    cdef icafast_frame_header _h     # that header
    cdef object _body                # bytearray of the payload being assembled (its size: room
                                     # so far, at most the payload length)
    cdef Py_ssize_t _have            # bytes of it received
    cdef uint64_t _offset            # stream offset of the frame being decoded
    cdef object _error               # the FrameError once poisoned
    cdef Py_ssize_t _copy_below      # whole payloads shorter than this: bytes copies
    cdef dict __dict__
    cdef object __weakref__

    cdef object _fail(self, int code, object a, object b)
    cpdef list feed(self, data)
    cpdef Frame feed_one(self, data)
    cdef Frame _one(self, object data, const unsigned char *p, Py_ssize_t n)


@cython.final
cdef class RecvWindow:
    cdef object _owner       # the storage it points into (kept alive while it does)
    cdef unsigned char *_p
    cdef Py_ssize_t _len
    cdef Py_ssize_t _exports  # buffers handed out and not yet released


@cython.final
cdef class ReplayBuffer:
    # _limit, _start and _end are the limit, start and end properties (the pure twin's
    # attributes of the same names: the compiled engine reads them directly)
    cdef uint64_t _limit
    cdef uint64_t _start
    cdef uint64_t _end
    cdef uint64_t _head      # storage index of offset ``start``
    cdef uint64_t _wv        # length of the last write_view (0: none outstanding)
    cdef uint64_t _cap       # len(_buf)
    cdef object _buf         # bytearray storage, replaced (never resized) on growth
    cdef object _mv          # memoryview(_buf)
    cdef object _rmv         # _mv.toreadonly()
    cdef unsigned char *_ptr  # _buf's bytes
    cdef RecvWindow _win     # recv_window's reusable window (None until the first call)
    cdef dict __dict__
    cdef object __weakref__

    cdef int _set_storage(self, object buf) except -1
    cdef int _reserve(self, uint64_t extra) except -1
    cdef int _relocate(self, uint64_t newcap) except -1
    cdef list _views(self, uint64_t offset, uint64_t n)
    cpdef write_view(self, max_bytes=*)
    cdef uint64_t _open_write(self, uint64_t want, uint64_t *tail) except? 0xFFFFFFFFFFFFFFFF
    cpdef recv_window(self, uint64_t max_bytes)
    cpdef commit(self, n)
    cpdef _commit(self, uint64_t n)
    cdef void _close_window(self) noexcept
    cpdef ack(self, offset)
    cpdef uint64_t _ack_at(self, uint64_t offset) except? 0xFFFFFFFFFFFFFFFF
    cdef uint64_t _drop_to(self, uint64_t o) noexcept
    cpdef bytes frame(self, object type, object flags, object offset, object n, object ack)
    cpdef bytes _frame_at(self, uint64_t type, uint64_t flags, uint64_t offset, uint64_t n,
                          uint64_t ack)
    cdef bytes _frame_from_ring(self, uint64_t t, uint64_t f, uint64_t o, uint64_t k, uint64_t a)
    cpdef list views(self, offset=*, max_bytes=*)
