# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""TLS records in and out of a link without Python's ``ssl`` wrappers on the per-record path.

A drop-in twin of :class:`icafast.tlspipe.TLSPipe` (which is the specification). Python's
``ssl`` module still makes the context, runs the handshake and checks the certificate: the pipe
is built from the ``ssl.SSLObject`` and the two ``ssl.MemoryBIO`` objects of a finished
handshake. After that, each record is read and written with OpenSSL's own calls on that same
connection object (``SSL_read_ex``/``SSL_write_ex``), holding the GIL (memory BIOs never
block), without the Python-level wrappers, their exceptions per empty read, and the release and
re-take of the GIL around every call (benchmarks/README.md, "TLS records driven from C").

OpenSSL is not linked at build time. The functions are looked up at run time in the OpenSSL
that Python's own ``_ssl`` module uses (``bind()``), so the pipe always works on the very
objects Python created, and a build needs no OpenSSL headers. ``bind()`` refuses, and icafast
falls back to the event loop's TLS transport, when the library's version is not Python's or
when the connection object is not laid out as CPython 3.8-3.14 lays it out (checked on each
pipe: the ``SSL``'s read and write BIOs must be the two ``MemoryBIO`` objects' own).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.object cimport PyObject
from libc.stdint cimport uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from posix.dlfcn cimport RTLD_NOW, dlerror, dlopen, dlsym

import ssl
import sys

cdef extern from "Python.h":
    # (raw references: the plaintext buffer is grown and shrunk in place)
    PyObject *_new_bytes "PyBytes_FromStringAndSize"(const char *, Py_ssize_t)
    char *_bytes_data "PyBytes_AS_STRING"(PyObject *)
    int _PyBytes_Resize(PyObject **bytes, Py_ssize_t newsize)
    void Py_DECREF(PyObject *)
    void Py_XDECREF(PyObject *)

cdef extern from *:
    """
    #ifndef RTLD_NOLOAD
    #define RTLD_NOLOAD 0
    #endif
    typedef struct ssl_st icafast_SSL;
    typedef struct bio_st icafast_BIO;
    """
    int RTLD_NOLOAD
    ctypedef struct icafast_SSL
    ctypedef struct icafast_BIO

ctypedef int (*f_ssl_read)(icafast_SSL *, void *, size_t, size_t *) noexcept nogil
ctypedef int (*f_ssl_write)(icafast_SSL *, const void *, size_t, size_t *) noexcept nogil
ctypedef int (*f_ssl_get_error)(const icafast_SSL *, int) noexcept nogil
ctypedef icafast_BIO *(*f_ssl_get_bio)(const icafast_SSL *) noexcept nogil
ctypedef int (*f_ssl_shutdown)(icafast_SSL *) noexcept nogil
ctypedef int (*f_bio_io)(icafast_BIO *, void *, int) noexcept nogil
ctypedef size_t (*f_bio_pending)(icafast_BIO *) noexcept nogil
ctypedef void (*f_void)() noexcept nogil
ctypedef unsigned long (*f_ulong)() noexcept nogil
ctypedef void (*f_err_string)(unsigned long, char *, size_t) noexcept nogil

# OpenSSL's constants (the same in 1.1.1 and 3.x)
DEF SSL_ERROR_SSL = 1
DEF SSL_ERROR_WANT_READ = 2
DEF SSL_ERROR_WANT_WRITE = 3
DEF SSL_ERROR_SYSCALL = 5
DEF SSL_ERROR_ZERO_RETURN = 6
#: the largest plaintext of one TLS record: writes are cut and joined into records of this size
DEF RECORD = 16384

cdef f_ssl_read p_read = NULL
cdef f_ssl_write p_write = NULL
cdef f_ssl_get_error p_get_error = NULL
cdef f_ssl_get_bio p_get_rbio = NULL
cdef f_ssl_get_bio p_get_wbio = NULL
cdef f_ssl_shutdown p_shutdown = NULL
cdef f_bio_io p_bio_write = NULL
cdef f_bio_io p_bio_read = NULL
cdef f_bio_pending p_bio_pending = NULL
cdef f_void p_err_clear = NULL
cdef f_ulong p_err_get = NULL
cdef f_err_string p_err_string = NULL
cdef object _bind_error = "not bound yet"

#: CPython versions whose ``_ssl`` objects are laid out as read below (checked per pipe too)
_LAYOUT_VERSIONS = ((3, 8), (3, 15))


cdef void *_sym(void *h, const char *name) except NULL:
    cdef void *p = dlsym(h, name)
    if p == NULL:
        raise LookupError(f"OpenSSL function {name.decode()} not found next to Python's _ssl")
    return p


def bind():
    """Look up the OpenSSL functions in the library Python's ``ssl`` module uses. Returns
    ``None`` when the pipe can be used, else the reason it cannot (then use the loop's TLS)."""
    global _bind_error, p_read, p_write, p_get_error, p_get_rbio, p_get_wbio, p_shutdown
    global p_bio_write, p_bio_read, p_bio_pending, p_err_clear, p_err_get, p_err_string
    if _bind_error is None:
        return None
    cdef void *h
    cdef f_ulong version
    if not (_LAYOUT_VERSIONS[0] <= sys.version_info[:2] < _LAYOUT_VERSIONS[1]):
        _bind_error = f"Python {sys.version_info[0]}.{sys.version_info[1]}: _ssl layout unknown"
        return _bind_error
    import _ssl
    path = getattr(_ssl, "__file__", None)
    if path:
        h = dlopen(path.encode(), RTLD_NOW | RTLD_NOLOAD)
    else:  # _ssl built into the interpreter: its OpenSSL is in the program's global scope
        h = dlopen(NULL, RTLD_NOW)
    if h == NULL:
        err = dlerror()
        _bind_error = f"dlopen of _ssl failed: {err.decode() if err != NULL else '?'}"
        return _bind_error
    try:
        version = <f_ulong>_sym(h, b"OpenSSL_version_num")
        if version() != ssl.OPENSSL_VERSION_NUMBER:
            _bind_error = (f"OpenSSL found ({version():#x}) is not Python's "
                           f"({ssl.OPENSSL_VERSION_NUMBER:#x})")
            return _bind_error
        p_read = <f_ssl_read>_sym(h, b"SSL_read_ex")
        p_write = <f_ssl_write>_sym(h, b"SSL_write_ex")
        p_get_error = <f_ssl_get_error>_sym(h, b"SSL_get_error")
        p_get_rbio = <f_ssl_get_bio>_sym(h, b"SSL_get_rbio")
        p_get_wbio = <f_ssl_get_bio>_sym(h, b"SSL_get_wbio")
        p_shutdown = <f_ssl_shutdown>_sym(h, b"SSL_shutdown")
        p_bio_write = <f_bio_io>_sym(h, b"BIO_write")
        p_bio_read = <f_bio_io>_sym(h, b"BIO_read")
        p_bio_pending = <f_bio_pending>_sym(h, b"BIO_ctrl_pending")
        p_err_clear = <f_void>_sym(h, b"ERR_clear_error")
        p_err_get = <f_ulong>_sym(h, b"ERR_get_error")
        p_err_string = <f_err_string>_sym(h, b"ERR_error_string_n")
    except LookupError as e:
        _bind_error = str(e)
        return _bind_error
    _bind_error = None
    return None


cdef inline void *_field(object obj, Py_ssize_t offset):
    # A pointer field of a CPython object, ``offset`` bytes after the object header.
    return (<void **>(<char *><PyObject *>obj + sizeof(PyObject) + offset))[0]


cdef object _ssl_error(str what):
    # The OpenSSL error queue as an ssl.SSLError, the queue left empty.
    cdef char buf[256]
    cdef unsigned long code = p_err_get()
    msg = what
    if code:
        p_err_string(code, buf, sizeof(buf))
        msg = f"{what}: {buf.decode('utf-8', 'replace')}"
    p_err_clear()
    return ssl.SSLError(1, msg)


cdef class TLSPipe:
    """Ciphertext in, plaintext out (``open``); plaintext in, ciphertext out (``seal``), on a
    connection whose handshake is done. See :class:`icafast.tlspipe.TLSPipe`."""

    cdef object _obj, _in, _out  # the SSLObject and its BIOs: they own the pointers below
    cdef icafast_SSL *_ssl
    cdef icafast_BIO *_rbio
    cdef icafast_BIO *_wbio
    cdef char *_stage  # small writes joined into one record
    cdef Py_ssize_t _staged
    cdef public bint peer_closed

    def __cinit__(self, sslobj, incoming, outgoing):
        if bind() is not None:
            raise RuntimeError(f"TLS pipe unavailable: {_bind_error}")
        import _ssl
        inner = getattr(sslobj, "_sslobj", None)
        if (type(inner) is not _ssl._SSLSocket or type(incoming) is not _ssl.MemoryBIO
                or type(outgoing) is not _ssl.MemoryBIO
                or _ssl._SSLSocket.__basicsize__ < sizeof(PyObject) + 2 * sizeof(void *)
                or _ssl.MemoryBIO.__basicsize__ < sizeof(PyObject) + sizeof(void *)):
            raise RuntimeError("TLS pipe unavailable: not an ssl.SSLObject over two MemoryBIOs")
        # PySSLSocket: {PyObject_HEAD; PyObject *Socket; SSL *ssl; ...};
        # PySSLMemoryBIO: {PyObject_HEAD; BIO *bio; ...}
        self._ssl = <icafast_SSL *>_field(inner, sizeof(void *))
        self._rbio = <icafast_BIO *>_field(incoming, 0)
        self._wbio = <icafast_BIO *>_field(outgoing, 0)
        if (self._ssl == NULL or p_get_rbio(self._ssl) != self._rbio
                or p_get_wbio(self._ssl) != self._wbio):
            raise RuntimeError("TLS pipe unavailable: the SSL object's BIOs are not the given ones")
        self._obj, self._in, self._out = sslobj, incoming, outgoing
        self._stage = <char *>malloc(RECORD)
        if self._stage == NULL:
            raise MemoryError()
        self._staged = 0
        self.peer_closed = False

    def __dealloc__(self):
        free(self._stage)

    cpdef bytes open(self, data):
        """Feed received ciphertext; return all the plaintext it completes (``b""`` if none).
        A close_notify from the peer sets ``peer_closed``; a bad record raises ssl.SSLError."""
        cdef Py_buffer view
        cdef Py_ssize_t cap, got = 0, n
        cdef size_t done
        cdef int r, err
        cdef PyObject *out = NULL
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            p_err_clear()
            if view.len:
                r = p_bio_write(self._rbio, view.buf, <int>view.len)
                if r != view.len:
                    raise MemoryError("TLS: could not buffer received records")
            cap = view.len + RECORD
        finally:
            PyBuffer_Release(&view)
        out = _new_bytes(NULL, cap)
        if out == NULL:
            raise MemoryError()
        try:
            while True:
                r = p_read(self._ssl, _bytes_data(out) + got, <size_t>(cap - got), &done)
                if r == 1:
                    got += <Py_ssize_t>done
                    if got == cap:  # (cannot happen: plaintext is shorter than its records)
                        cap *= 2
                        if _PyBytes_Resize(&out, cap) < 0:
                            raise MemoryError()
                    continue
                err = p_get_error(self._ssl, r)
                if err == SSL_ERROR_WANT_READ or err == SSL_ERROR_WANT_WRITE:
                    break
                if err == SSL_ERROR_ZERO_RETURN:
                    self.peer_closed = True
                    p_err_clear()
                    break
                raise _ssl_error("TLS record rejected" if err == SSL_ERROR_SSL else
                                 f"TLS read failed (error {err})")
            if got == 0:
                return b""
            if got != cap and _PyBytes_Resize(&out, got) < 0:  # (shrinks in place)
                raise MemoryError()
            return <bytes>out
        finally:
            Py_XDECREF(out)

    cdef int _write(self, const char *p, Py_ssize_t n) except -1:
        cdef size_t done
        cdef int r
        while n > 0:
            r = p_write(self._ssl, p, <size_t>n, &done)
            if r != 1:
                raise _ssl_error(f"TLS write failed (error {p_get_error(self._ssl, r)})")
            p += done
            n -= <Py_ssize_t>done
        return 0

    cdef int _add(self, const char *p, Py_ssize_t n) except -1:
        # Append to the staged record; whole records of a large buffer go straight through.
        cdef Py_ssize_t room, whole
        while n > 0:
            if self._staged == 0 and n >= RECORD:
                whole = n - n % RECORD
                self._write(p, whole)
                p += whole
                n -= whole
                continue
            room = RECORD - self._staged
            if room > n:
                room = n
            memcpy(self._stage + self._staged, p, room)
            self._staged += room
            p += room
            n -= room
            if self._staged == RECORD:
                self._staged = 0
                self._write(self._stage, RECORD)
        return 0

    cpdef bytes seal(self, data):
        """Encrypt ``data`` (a bytes-like object, or a list of them sent as one stream: small
        buffers share a record) and return the ciphertext to send."""
        cdef Py_buffer view
        p_err_clear()
        self._staged = 0
        if type(data) is list:
            for b in <list>data:
                PyObject_GetBuffer(b, &view, PyBUF_SIMPLE)
                try:
                    self._add(<const char *>view.buf, view.len)
                finally:
                    PyBuffer_Release(&view)
        else:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                self._add(<const char *>view.buf, view.len)
            finally:
                PyBuffer_Release(&view)
        if self._staged:
            n = self._staged
            self._staged = 0
            self._write(self._stage, n)
        return self.output()

    cpdef bytes output(self):
        """Ciphertext waiting to be sent (post-handshake messages, a key update's answer)."""
        cdef size_t n = p_bio_pending(self._wbio)
        if n == 0:
            return b""
        result = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>n)
        if p_bio_read(self._wbio, PyBytes_AS_STRING(result), <int>n) != <int>n:
            raise _ssl_error("TLS: could not take the records to send")
        return result

    def close(self):
        """A close_notify alert, as ciphertext to send before closing the connection."""
        p_err_clear()
        p_shutdown(self._ssl)
        p_err_clear()
        return self.output()
