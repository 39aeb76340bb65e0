# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""TLS records in and out of a link without Python's ``ssl`` wrappers on the per-record path.

A drop-in twin of :class:`icafast.tlspipe.TLSPipe` (which is the specification). Python's
``ssl`` module still makes the context, runs the handshake and checks the certificate: the pipe
is built from the ``ssl.SSLObject`` and the two ``ssl.MemoryBIO`` objects of a finished
handshake. After that, each record is read and written with OpenSSL's own calls on that same
connection object (``SSL_read_ex``/``SSL_write_ex``), holding the GIL (nothing here blocks),
without the Python-level wrappers, their exception per empty read, and the release and re-take
of the GIL around every call (benchmarks/HISTORY.md, "TLS records driven from C").

The pipe also gives the connection two BIOs of its own in place of the memory BIOs: OpenSSL
reads records straight from the buffer the event loop received (no copy into a memory BIO) and
writes them straight into the ``bytes`` object that goes to the transport (no copy out of one).
The ``MemoryBIO`` objects keep their own references to their BIOs and are left as they are.

OpenSSL is not linked at build time. The functions are looked up at run time in the OpenSSL
that Python's own ``_ssl`` module uses (``bind()``), so the pipe always works on the very
objects Python created, and a build needs no OpenSSL headers. ``bind()`` refuses, and icafast
falls back to the event loop's TLS transport, when the library's version is not Python's or
when the interpreter is not a CPython 3.8-3.14, whose ``_ssl`` objects are laid out as read here
(checked again on each pipe: the ``SSL``'s read and write BIOs must be the two ``MemoryBIO``
objects' own).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.object cimport PyObject
from libc.string cimport memcpy
from libc.time cimport time
from posix.dlfcn cimport RTLD_NOW, dlerror, dlopen, dlsym

import ssl
import sys

cdef extern from "Python.h":
    # (raw references: output buffers are grown and shrunk in place)
    PyObject *_new_bytes "PyBytes_FromStringAndSize"(const char *, Py_ssize_t)
    char *_bytes_data "PyBytes_AS_STRING"(PyObject *)
    Py_ssize_t _bytes_size "PyBytes_GET_SIZE"(PyObject *)
    int _PyBytes_Resize(PyObject **bytes, Py_ssize_t newsize)
    void Py_XDECREF(PyObject *)

cdef extern from *:
    """
    #ifndef RTLD_NOLOAD
    #define RTLD_NOLOAD 0
    #endif
    typedef struct ssl_st icafast_SSL;
    typedef struct bio_st icafast_BIO;
    typedef struct bio_method_st icafast_BIO_METHOD;
    typedef struct ssl_session_st icafast_SSL_SESSION;
    """
    int RTLD_NOLOAD
    ctypedef struct icafast_SSL
    ctypedef struct icafast_SSL_SESSION
    ctypedef struct icafast_BIO
    ctypedef struct icafast_BIO_METHOD

ctypedef int (*f_ssl_read)(icafast_SSL *, void *, size_t, size_t *) noexcept nogil
ctypedef int (*f_ssl_write)(icafast_SSL *, const void *, size_t, size_t *) noexcept nogil
ctypedef int (*f_ssl_get_error)(const icafast_SSL *, int) noexcept nogil
ctypedef icafast_BIO *(*f_ssl_get_bio)(const icafast_SSL *) noexcept nogil
ctypedef void (*f_ssl_set0_bio)(icafast_SSL *, icafast_BIO *) noexcept nogil
ctypedef int (*f_ssl_shutdown)(icafast_SSL *) noexcept nogil
ctypedef long (*f_ssl_ctrl)(icafast_SSL *, int, long, void *) noexcept nogil
ctypedef int (*f_ssl_free_buffers)(icafast_SSL *) noexcept nogil
ctypedef int (*f_void_int)() noexcept nogil
ctypedef icafast_SSL_SESSION *(*f_get1_session)(icafast_SSL *) noexcept nogil
ctypedef int (*f_set_session)(icafast_SSL *, icafast_SSL_SESSION *) noexcept nogil
ctypedef void (*f_session_free)(icafast_SSL_SESSION *) noexcept nogil
ctypedef int (*f_session_int)(const icafast_SSL_SESSION *) noexcept nogil
ctypedef icafast_SSL_SESSION *(*f_session_dup)(const icafast_SSL_SESSION *) noexcept nogil
ctypedef void (*f_void)() noexcept nogil
# i2d_SSL_SESSION, d2i_SSL_SESSION (a session in DER and back: a hand-over to a new process)
ctypedef int (*f_i2d_session)(const icafast_SSL_SESSION *, unsigned char **) noexcept nogil
ctypedef icafast_SSL_SESSION *(*f_d2i_session)(icafast_SSL_SESSION **, const unsigned char **,
                                               long) noexcept nogil
ctypedef long (*f_session_long)(const icafast_SSL_SESSION *) noexcept nogil
# SSL_SESSION_get0_peer, X509_get0_notAfter, X509_cmp_current_time (X509 and ASN1_TIME as
# untyped pointers)
ctypedef void *(*f_get0_ptr)(const void *) noexcept nogil
ctypedef int (*f_cmp_time)(const void *) noexcept nogil
# SSL_CTX_set_session_ticket_cb (the SSL_CTX and the callbacks as untyped pointers)
ctypedef int (*f_ctx_ticket_cb)(void *, void *, void *, void *) noexcept nogil
# SSL_CTX_ctrl (the SSL_CTX as an untyped pointer)
ctypedef long (*f_ctx_ctrl)(void *, int, long, void *) noexcept nogil
ctypedef unsigned long (*f_ulong)() noexcept nogil
ctypedef void (*f_err_string)(unsigned long, char *, size_t) noexcept nogil
# the BIO method of the pipe's own BIOs
ctypedef int (*cb_write)(icafast_BIO *, const char *, size_t, size_t *) noexcept
ctypedef int (*cb_read)(icafast_BIO *, char *, size_t, size_t *) noexcept
ctypedef long (*cb_ctrl)(icafast_BIO *, int, long, void *) noexcept
ctypedef icafast_BIO_METHOD *(*f_meth_new)(int, const char *) noexcept nogil
ctypedef int (*f_meth_set_write)(icafast_BIO_METHOD *, cb_write) noexcept nogil
ctypedef int (*f_meth_set_read)(icafast_BIO_METHOD *, cb_read) noexcept nogil
ctypedef int (*f_meth_set_ctrl)(icafast_BIO_METHOD *, cb_ctrl) noexcept nogil
ctypedef icafast_BIO *(*f_bio_new)(const icafast_BIO_METHOD *) noexcept nogil
ctypedef void (*f_bio_set_data)(icafast_BIO *, void *) noexcept nogil
ctypedef void *(*f_bio_get_data)(icafast_BIO *) noexcept nogil
ctypedef void (*f_bio_set_int)(icafast_BIO *, int) noexcept nogil

# OpenSSL's constants (the same in 1.1.1 and 3.x)
DEF SSL_TICKET_EMPTY = 3
DEF SSL_TICKET_NO_DECRYPT = 4
DEF SSL_TICKET_SUCCESS = 5
DEF SSL_TICKET_SUCCESS_RENEW = 6
DEF SSL_TICKET_RETURN_IGNORE_RENEW = 2
DEF SSL_TICKET_RETURN_USE = 3
DEF SSL_TICKET_RETURN_USE_RENEW = 4
DEF SSL_ERROR_SSL = 1
DEF SSL_ERROR_WANT_READ = 2
DEF SSL_ERROR_WANT_WRITE = 3
DEF SSL_ERROR_SYSCALL = 5
DEF SSL_ERROR_ZERO_RETURN = 6
DEF SSL_CTRL_CLEAR_MODE = 78
DEF SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
DEF SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
DEF SSL_MODE_RELEASE_BUFFERS = 0x10
DEF BIO_TYPE_SOURCE_SINK = 0x0400
DEF BIO_FLAGS_READ = 0x01
DEF BIO_FLAGS_RWS = 0x07
DEF BIO_FLAGS_SHOULD_RETRY = 0x08
DEF BIO_CTRL_PUSH = 6
DEF BIO_CTRL_POP = 7
DEF BIO_CTRL_FLUSH = 11
DEF BIO_CTRL_DUP = 12
#: the largest plaintext of one TLS record: writes are cut and joined into records of this size
DEF RECORD = 16384
#: room reserved per record for its header, tag and padding (TLS 1.3 AEAD: 22 bytes; TLS 1.2
#: CBC with SHA-384 and the longest padding: 325); a record that needs more grows the buffer
DEF RECORD_ROOM = 64

cdef f_ssl_read p_read = NULL
cdef f_ssl_write p_write = NULL
cdef f_ssl_get_error p_get_error = NULL
cdef f_ssl_get_bio p_get_rbio = NULL
cdef f_ssl_get_bio p_get_wbio = NULL
cdef f_ssl_set0_bio p_set0_rbio = NULL
cdef f_ssl_set0_bio p_set0_wbio = NULL
cdef f_ssl_shutdown p_shutdown = NULL
cdef f_ssl_ctrl p_ssl_ctrl = NULL
cdef f_ssl_free_buffers p_free_buffers = NULL
cdef f_void p_err_clear = NULL
cdef f_ulong p_err_get = NULL
cdef f_err_string p_err_string = NULL
cdef f_bio_new p_bio_new = NULL
cdef f_bio_set_data p_bio_set_data = NULL
cdef f_bio_get_data p_bio_get_data = NULL
cdef f_bio_set_int p_bio_set_init = NULL
cdef f_bio_set_int p_bio_set_flags = NULL
cdef f_bio_set_int p_bio_clear_flags = NULL
cdef f_get1_session p_get1_session = NULL
cdef f_set_session p_set_session = NULL
cdef f_session_free p_session_free = NULL
cdef f_session_int p_session_resumable = NULL
cdef f_session_dup p_session_dup = NULL
cdef f_session_long p_session_time = NULL
cdef f_session_long p_session_timeout = NULL
cdef f_i2d_session p_i2d_session = NULL  # (these two: NULL where not found)
cdef f_d2i_session p_d2i_session = NULL
cdef f_ctx_ticket_cb p_ctx_ticket_cb = NULL  # (NULL where the library has none: 1.1.0)
cdef f_ctx_ctrl p_ctx_ctrl = NULL
cdef f_get0_ptr p_session_peer = NULL  # (these three: NULL where not found)
cdef f_get0_ptr p_not_after = NULL
cdef f_cmp_time p_cmp_now = NULL
cdef icafast_BIO_METHOD *_method = NULL
cdef object _bind_error = "not bound yet"

#: CPython versions whose ``_ssl`` objects are laid out as read below (checked per pipe too)
_LAYOUT_VERSIONS = ((3, 8), (3, 15))


cdef struct _IO:
    # what the pipe's BIOs read from and write to, for the call in progress
    const char *src  # received ciphertext not yet read by OpenSSL
    Py_ssize_t src_len
    PyObject *out  # a bytes object being filled with ciphertext to send (or NULL)
    Py_ssize_t out_len
    bint failed  # the output buffer could not grow


cdef int _bio_write(icafast_BIO *b, const char *data, size_t n, size_t *done) noexcept:
    # (called by OpenSSL within the pipe's calls, which hold the GIL)
    cdef _IO *io = <_IO *>p_bio_get_data(b)
    cdef Py_ssize_t need, cap
    p_bio_clear_flags(b, BIO_FLAGS_RWS | BIO_FLAGS_SHOULD_RETRY)
    if io == NULL:
        return 0
    need = io.out_len + <Py_ssize_t>n
    if io.out == NULL:
        io.out = _new_bytes(NULL, need + RECORD + RECORD_ROOM)
        if io.out == NULL:
            io.failed = True
            return 0
    elif need > _bytes_size(io.out):
        cap = 2 * _bytes_size(io.out)
        if _PyBytes_Resize(&io.out, need if need > cap else cap) < 0:
            io.failed = True
            return 0
    memcpy(_bytes_data(io.out) + io.out_len, data, n)
    io.out_len = need
    done[0] = n
    return 1


cdef int _bio_read(icafast_BIO *b, char *buf, size_t n, size_t *done) noexcept:
    cdef _IO *io = <_IO *>p_bio_get_data(b)
    p_bio_clear_flags(b, BIO_FLAGS_RWS | BIO_FLAGS_SHOULD_RETRY)
    if io == NULL or io.src_len == 0:
        p_bio_set_flags(b, BIO_FLAGS_READ | BIO_FLAGS_SHOULD_RETRY)
        done[0] = 0
        return 0
    if <size_t>io.src_len < n:
        n = <size_t>io.src_len
    memcpy(buf, io.src, n)
    io.src += n
    io.src_len -= <Py_ssize_t>n
    done[0] = n
    return 1


cdef long _bio_ctrl(icafast_BIO *b, int cmd, long num, void *ptr) noexcept:
    if cmd == BIO_CTRL_FLUSH or cmd == BIO_CTRL_DUP or cmd == BIO_CTRL_PUSH or cmd == BIO_CTRL_POP:
        return 1
    return 0


cdef void *_sym(void *h, const char *name) except NULL:
    cdef void *p = dlsym(h, name)
    if p == NULL:
        raise LookupError(f"OpenSSL function {name.decode()} not found next to Python's _ssl")
    return p


def bind():
    """Look up the OpenSSL functions in the library Python's ``ssl`` module uses. Returns
    ``None`` when the pipe can be used, else the reason it cannot (then use the loop's TLS)."""
    global _bind_error, p_read, p_write, p_get_error, p_get_rbio, p_get_wbio, p_shutdown
    global p_set0_rbio, p_set0_wbio, p_err_clear, p_err_get
    global p_err_string, p_bio_new, p_bio_set_data, p_bio_get_data, p_bio_set_init
    global p_bio_set_flags, p_bio_clear_flags, _method, p_ssl_ctrl, p_free_buffers
    global p_get1_session, p_set_session, p_session_free, p_session_resumable, p_session_dup
    global p_session_time, p_session_timeout, p_ctx_ticket_cb, p_ctx_ctrl
    global p_session_peer, p_not_after, p_cmp_now, p_i2d_session, p_d2i_session
    if _bind_error is None:
        return None
    cdef void *h
    cdef f_ulong version
    cdef f_void_int new_index
    cdef f_meth_new meth_new
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
        p_set0_rbio = <f_ssl_set0_bio>_sym(h, b"SSL_set0_rbio")
        p_set0_wbio = <f_ssl_set0_bio>_sym(h, b"SSL_set0_wbio")
        p_shutdown = <f_ssl_shutdown>_sym(h, b"SSL_shutdown")
        p_ssl_ctrl = <f_ssl_ctrl>_sym(h, b"SSL_ctrl")
        p_free_buffers = <f_ssl_free_buffers>_sym(h, b"SSL_free_buffers")
        p_get1_session = <f_get1_session>_sym(h, b"SSL_get1_session")
        p_set_session = <f_set_session>_sym(h, b"SSL_set_session")
        p_session_free = <f_session_free>_sym(h, b"SSL_SESSION_free")
        p_session_resumable = <f_session_int>_sym(h, b"SSL_SESSION_is_resumable")
        p_session_dup = <f_session_dup>_sym(h, b"SSL_SESSION_dup")
        p_session_time = <f_session_long>_sym(h, b"SSL_SESSION_get_time")
        p_session_timeout = <f_session_long>_sym(h, b"SSL_SESSION_get_timeout")
        p_ctx_ticket_cb = <f_ctx_ticket_cb>dlsym(h, b"SSL_CTX_set_session_ticket_cb")
        p_ctx_ctrl = <f_ctx_ctrl>_sym(h, b"SSL_CTX_ctrl")
        p_session_peer = <f_get0_ptr>dlsym(h, b"SSL_SESSION_get0_peer")
        p_not_after = <f_get0_ptr>dlsym(h, b"X509_get0_notAfter")
        p_cmp_now = <f_cmp_time>dlsym(h, b"X509_cmp_current_time")
        p_i2d_session = <f_i2d_session>dlsym(h, b"i2d_SSL_SESSION")
        p_d2i_session = <f_d2i_session>dlsym(h, b"d2i_SSL_SESSION")
        p_err_clear = <f_void>_sym(h, b"ERR_clear_error")
        p_err_get = <f_ulong>_sym(h, b"ERR_get_error")
        p_err_string = <f_err_string>_sym(h, b"ERR_error_string_n")
        p_bio_new = <f_bio_new>_sym(h, b"BIO_new")
        p_bio_set_data = <f_bio_set_data>_sym(h, b"BIO_set_data")
        p_bio_get_data = <f_bio_get_data>_sym(h, b"BIO_get_data")
        p_bio_set_init = <f_bio_set_int>_sym(h, b"BIO_set_init")
        p_bio_set_flags = <f_bio_set_int>_sym(h, b"BIO_set_flags")
        p_bio_clear_flags = <f_bio_set_int>_sym(h, b"BIO_clear_flags")
        new_index = <f_void_int>_sym(h, b"BIO_get_new_index")
        meth_new = <f_meth_new>_sym(h, b"BIO_meth_new")
        set_write = <f_meth_set_write>_sym(h, b"BIO_meth_set_write_ex")
        set_read = <f_meth_set_read>_sym(h, b"BIO_meth_set_read_ex")
        set_ctrl = <f_meth_set_ctrl>_sym(h, b"BIO_meth_set_ctrl")
        if _method == NULL:
            _method = meth_new(BIO_TYPE_SOURCE_SINK | new_index(), b"icafast TLS pipe")
            if (_method == NULL or set_write(_method, _bio_write) != 1
                    or set_read(_method, _bio_read) != 1 or set_ctrl(_method, _bio_ctrl) != 1):
                _bind_error = "could not make the pipe's BIO method"
                return _bind_error
    except LookupError as e:
        _bind_error = str(e)
        return _bind_error
    _bind_error = None
    return None


cdef inline void *_field(object obj, Py_ssize_t offset):
    # A pointer field of a CPython object, ``offset`` bytes after the object header.
    return (<void **>(<char *><PyObject *>obj + sizeof(PyObject) + offset))[0]


cdef icafast_SSL *_ssl_of(object sslobj) except NULL:
    # The OpenSSL connection of an ``ssl.SSLObject``.
    import _ssl
    inner = getattr(sslobj, "_sslobj", None)
    if (type(inner) is not _ssl._SSLSocket
            or _ssl._SSLSocket.__basicsize__ < sizeof(PyObject) + 2 * sizeof(void *)):
        raise RuntimeError("TLS pipe unavailable: not an ssl.SSLObject")
    # PySSLSocket: {PyObject_HEAD; PyObject *Socket; SSL *ssl; ...};
    cdef icafast_SSL *conn = <icafast_SSL *>_field(inner, sizeof(void *))
    if conn == NULL:
        raise RuntimeError("TLS pipe unavailable: an ssl.SSLObject without a connection")
    return conn


cdef int _ticket_decision(int status, long age, long lifetime) noexcept nogil:
    # (OpenSSL reports every TLS 1.3 ticket it decrypted with its own key as SUCCESS_RENEW:
    # that is its policy of a new ticket after each resumption, not a key that is due)
    if status == SSL_TICKET_SUCCESS or status == SSL_TICKET_SUCCESS_RENEW:
        if lifetime > 0 and 0 <= age < lifetime // 2:
            return SSL_TICKET_RETURN_USE  # resumed; the client keeps its ticket
        return SSL_TICKET_RETURN_USE_RENEW
    # no ticket, or one this server cannot read: a full handshake, and a ticket after it
    return SSL_TICKET_RETURN_IGNORE_RENEW


def ticket_decision(int status, long age, long lifetime):
    """What a server with :func:`spare_tickets` does with a ticket a client offers (OpenSSL's
    ``SSL_TICKET_STATUS`` in, ``SSL_TICKET_RETURN`` out): ``age`` seconds since its session
    began, ``lifetime`` the session's timeout."""
    return _ticket_decision(status, age, lifetime)


cdef bint _peer_expired(icafast_SSL_SESSION *ss) noexcept nogil:
    # Whether the session holds a peer certificate (a server's session: the client's) whose
    # validity has ended since the full handshake that checked it (or cannot be told).
    cdef const void *peer
    cdef const void *end
    if p_session_peer == NULL or p_not_after == NULL or p_cmp_now == NULL:
        return False
    peer = p_session_peer(ss)
    if peer == NULL:
        return False
    end = p_not_after(peer)
    return end == NULL or p_cmp_now(end) <= 0  # (-1: before now; 0: an error)


cdef int _on_ticket(icafast_SSL *s, icafast_SSL_SESSION *ss, const unsigned char *keyname,
                    size_t keyname_len, int status, void *arg) noexcept nogil:
    cdef long age = -1
    cdef long lifetime = 0
    if ss != NULL and (status == SSL_TICKET_SUCCESS or status == SSL_TICKET_SUCCESS_RENEW):
        if _peer_expired(ss):
            # The client's certificate has expired since it was checked: a full handshake,
            # which checks it again (and refuses it), rather than a resumption that would let
            # it in without showing it (and renew its ticket, over and over)
            p_err_clear()
            return SSL_TICKET_RETURN_IGNORE_RENEW
        age = <long>time(NULL) - p_session_time(ss)
        lifetime = p_session_timeout(ss)
    return _ticket_decision(status, age, lifetime)


def spare_tickets(ctx):
    """A server ``ssl.SSLContext`` that sends no new TLS 1.3 session ticket after a handshake
    that resumed with a ticket still in the first half of its lifetime (the client offers that
    one again), instead of one after every resumption (OpenSSL's default). Each new ticket cost
    the server its encryption and the client its decryption and a copy of the session: about
    200,000 instructions per new session between them. Full handshakes, and resumptions with
    an older ticket, still get one, so a client that reconnects at least once per half
    lifetime (OpenSSL's default lifetime: 2 h) never falls back to a full handshake. Returns
    whether it was set (not where the library has no ticket callbacks, or Python's ``_ssl``
    objects are laid out otherwise)."""
    if bind() is not None or p_ctx_ticket_cb == NULL:
        return False
    cdef void *c = _ctx_of(ctx)
    if c == NULL:
        return False
    return p_ctx_ticket_cb(c, NULL, <void *>_on_ticket, NULL) == 1


cdef void *_ctx_of(object ctx):
    # The OpenSSL SSL_CTX of an ``ssl.SSLContext`` (NULL: not one, or laid out otherwise).
    import _ssl
    if (not isinstance(ctx, _ssl._SSLContext)
            or _ssl._SSLContext.__basicsize__ < sizeof(PyObject) + sizeof(void *)):
        return NULL
    # PySSLContext: {PyObject_HEAD; SSL_CTX *ctx; ...}
    return _field(ctx, 0)


cdef long _ticket_keys_size(void *c) noexcept:
    # (SSL_CTRL_GET_TLSEXT_TICKET_KEYS without a buffer: their size, 80 in OpenSSL 1.1 and 3)
    cdef long n = p_ctx_ctrl(c, SSL_CTRL_GET_TLSEXT_TICKET_KEYS, 0, NULL)
    p_err_clear()
    return n if 0 < n <= 4096 else 0


def ticket_keys(ctx):
    """The keys with which a server ``ssl.SSLContext`` seals and opens its TLS session
    tickets, as OpenSSL gives them (``SSL_CTX_get_tlsext_ticket_keys``: the key name, the HMAC
    key and the AES key, 80 bytes), or None where they cannot be read. OpenSSL makes them at
    random with each context, and they live as long as it: a new context (a certificate
    reloaded, an upgraded process) cannot open the tickets of the one before unless it is given
    them (:func:`set_ticket_keys`)."""
    if bind() is not None:
        return None
    cdef void *c = _ctx_of(ctx)
    if c == NULL:
        return None
    cdef long n = _ticket_keys_size(c)
    if n == 0:
        return None
    out = bytearray(n)
    cdef unsigned char[::1] view = out
    if p_ctx_ctrl(c, SSL_CTRL_GET_TLSEXT_TICKET_KEYS, n, &view[0]) != 1:
        p_err_clear()
        return None
    return bytes(out)


def set_ticket_keys(ctx, keys):
    """Give a server ``ssl.SSLContext`` the ticket keys of another (:func:`ticket_keys`): it
    then opens that one's tickets, and seals its own with them. Returns whether it took them
    (not where they are not of this library's size, or cannot be set)."""
    if bind() is not None:
        return False
    cdef void *c = _ctx_of(ctx)
    if c == NULL:
        return False
    cdef bytes b = bytes(keys)
    cdef long n = _ticket_keys_size(c)
    if n == 0 or n != len(b):
        return False
    if p_ctx_ctrl(c, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, n, <void *><const char *>b) != 1:
        p_err_clear()
        return False
    return True


cdef class Session:
    """A TLS session a client may resume: a copy of OpenSSL's ``SSL_SESSION`` made in memory
    (``SSL_SESSION_dup``: the certificate is shared, not copied).

    Python's ``SSLObject.session`` copies a session through its DER encoding both when it is
    read and when it is set (a workaround for OpenSSL 1.1.0), and decoding the server's
    certificate in those copies costs OpenSSL 3 about as much as the resumed handshake itself.
    Copies are still needed: OpenSSL marks a connection's session as not resumable when that
    connection ends without a close_notify, which is how a broken link ends. So the session is
    copied when it is taken from a connection, and each connection it is offered to gets a
    copy of its own; the kept one belongs to no connection."""

    cdef icafast_SSL_SESSION *_sess

    def __dealloc__(self):
        if self._sess != NULL:
            p_session_free(self._sess)
            self._sess = NULL

    @property
    def resumable(self):
        """Whether OpenSSL would still offer it (a connection that failed may have marked it
        otherwise)."""
        return self._sess != NULL and p_session_resumable(self._sess) == 1

    def offer(self, sslobj):
        """Offer this session in the handshake of a client connection (an ``ssl.SSLObject``)
        not started yet. Returns whether OpenSSL took it (the server may still refuse it:
        then the handshake is a full one)."""
        cdef icafast_SSL *conn = _ssl_of(sslobj)
        cdef icafast_SSL_SESSION *copy
        cdef int ok
        if not self.resumable:
            return False
        # a copy of its own for the connection: a TLS 1.2 resumption keeps the session it was
        # given, and marks it not resumable if it ends without a close_notify
        copy = p_session_dup(self._sess)
        if copy == NULL:
            p_err_clear()
            return False
        ok = p_set_session(conn, copy)
        p_session_free(copy)  # (the connection holds its own reference)
        if ok != 1:
            p_err_clear()
            return False
        return True

    def to_bytes(self):
        """The session in OpenSSL's DER form (its secrets among it), for another process of
        this client to resume with (``session_from_bytes``); None where it cannot be written
        out."""
        cdef int n
        cdef unsigned char *p
        cdef unsigned char[::1] view
        if self._sess == NULL or p_i2d_session == NULL:
            return None
        n = p_i2d_session(self._sess, NULL)
        if n <= 0:
            p_err_clear()
            return None
        out = bytearray(n)
        view = out
        p = &view[0]
        if p_i2d_session(self._sess, &p) != n:
            p_err_clear()
            return None
        return bytes(out)


def session_from_bytes(data):
    """A :class:`Session` from ``Session.to_bytes()`` (another process's), or None where the
    bytes are not one, or it can no longer be resumed."""
    cdef const unsigned char *p
    cdef icafast_SSL_SESSION *sess
    if bind() is not None or p_d2i_session == NULL:
        return None
    cdef bytes b = bytes(data)
    if not b:
        return None
    p = <const unsigned char *><const char *>b
    sess = p_d2i_session(NULL, &p, len(b))
    if sess == NULL:
        p_err_clear()
        return None
    cdef Session out = Session.__new__(Session)
    out._sess = sess
    if not out.resumable:
        return None
    return out


cdef Session _session_of(icafast_SSL *conn):
    # A copy of the connection's session if it can be resumed, else None.
    cdef icafast_SSL_SESSION *sess = p_get1_session(conn)
    cdef icafast_SSL_SESSION *copy = NULL
    if sess == NULL:
        return None
    if p_session_resumable(sess) == 1:
        copy = p_session_dup(sess)
    p_session_free(sess)
    if copy == NULL:
        p_err_clear()
        return None
    cdef Session out = Session.__new__(Session)
    out._sess = copy
    return out


cdef unsigned long _first_error = 0  # (the code of the error _pop_errors took out last)


cdef str _pop_errors():
    # The first error of OpenSSL's queue as text, the queue left empty.
    global _first_error
    cdef char buf[256]
    cdef unsigned long code = p_err_get()
    _first_error = code
    text = ""
    if code:
        p_err_string(code, buf, sizeof(buf))
        text = buf.decode("utf-8", "replace")
    p_err_clear()
    return text


cdef bint _is_received_alert(unsigned long code):
    # Whether an error code is OpenSSL's "the peer sent this fatal alert": the SSL library's
    # (20; in the top bits from bit 23 in OpenSSL 3, bit 24 in 1.1) with a reason of 1000 plus
    # the alert's number (SSL_AD_REASON_OFFSET).
    cdef unsigned long reason = code & 0xFFF
    return (1000 <= reason < 1256
            and (((code >> 23) & 0xFF) == 20 or ((code >> 24) & 0xFF) == 20))


cdef int _failure(icafast_SSL *conn, int r, str what) except -1:
    # What a failed SSL_read_ex/SSL_write_ex means: SSL_ERROR_WANT_READ (and the like), or
    # SSL_ERROR_ZERO_RETURN, returned; an error raised as ssl.SSLError.
    #
    # SSL_get_error reads this thread's error queue, so an error another user of OpenSSL left
    # there would pass for ours. The queue is not cleared before every call (that costs
    # OpenSSL 3 hundreds of instructions, and it is nearly always empty): instead, an error is
    # taken out, and the call's own state asked again without it.
    cdef int err = p_get_error(conn, r)
    if err != SSL_ERROR_SSL and err != SSL_ERROR_SYSCALL:
        return err
    text = _pop_errors()
    err = p_get_error(conn, r)
    if err == SSL_ERROR_WANT_READ or err == SSL_ERROR_WANT_WRITE:
        return err  # (the error was not this call's)
    # A fatal alert from the peer marks the connection shut as a close_notify does, so that,
    # its error taken out, OpenSSL says SSL_ERROR_ZERO_RETURN for it too: it is an error
    if err == SSL_ERROR_ZERO_RETURN and not _is_received_alert(_first_error):
        return err
    raise ssl.SSLError(1, f"{what}: {text}" if text else f"{what} (error {err})")


#: Shared by every pipe (each call holds the GIL from start to end and calls back into no
#: Python code that could enter another pipe): small reads are decrypted here and copied out
#: at their exact size, and small writes joined here into one record.
cdef char _plain[2 * RECORD]
cdef char _stage[RECORD]


cdef class TLSPipe:
    """Ciphertext in, plaintext out (``open``); plaintext in, ciphertext out (``seal``), on a
    connection whose handshake is done. See :class:`icafast.tlspipe.TLSPipe`."""

    cdef object _obj, _in, _out  # the SSLObject (owns the SSL) and its memory BIOs
    cdef icafast_SSL *_ssl
    cdef icafast_BIO *_rbio  # the pipe's own BIOs, owned by the SSL once set
    cdef icafast_BIO *_wbio
    cdef _IO _io
    cdef bytes _carry  # records the memory BIO held when the pipe took over
    cdef Py_ssize_t _staged
    cdef public bint peer_closed
    #: records of at most this much plaintext (a link's control messages: keepalives, acks)
    #: free the record buffers after them, so that an idle link holds none between keepalives
    cdef public Py_ssize_t quiet_max
    cdef object _sink  # where ``send`` (and ``open``, for its answers) write ciphertext

    def __cinit__(self, sslobj, incoming, outgoing):
        cdef icafast_BIO *mem_in
        cdef icafast_BIO *mem_out
        self._io.out = NULL
        if bind() is not None:
            raise RuntimeError(f"TLS pipe unavailable: {_bind_error}")
        import _ssl
        if (type(incoming) is not _ssl.MemoryBIO or type(outgoing) is not _ssl.MemoryBIO
                or _ssl.MemoryBIO.__basicsize__ < sizeof(PyObject) + sizeof(void *)):
            raise RuntimeError("TLS pipe unavailable: not an ssl.SSLObject over two MemoryBIOs")
        # PySSLMemoryBIO: {PyObject_HEAD; BIO *bio; ...}
        self._ssl = _ssl_of(sslobj)
        mem_in = <icafast_BIO *>_field(incoming, 0)
        mem_out = <icafast_BIO *>_field(outgoing, 0)
        if (self._ssl == NULL or p_get_rbio(self._ssl) != mem_in
                or p_get_wbio(self._ssl) != mem_out):
            raise RuntimeError("TLS pipe unavailable: the SSL object's BIOs are not the given ones")
        self._obj, self._in, self._out = sslobj, incoming, outgoing
        self._staged = 0
        self.peer_closed = False
        self.quiet_max = 0
        # what the memory BIOs still hold moves over: records received with the handshake's
        # last flight, and anything not yet sent
        self._carry = incoming.read() if incoming.pending else b""
        pending = outgoing.read() if outgoing.pending else b""
        self._rbio = p_bio_new(_method)
        self._wbio = p_bio_new(_method)
        if self._rbio == NULL or self._wbio == NULL:
            raise MemoryError()
        p_bio_set_data(self._rbio, &self._io)
        p_bio_set_init(self._rbio, 1)
        p_bio_set_data(self._wbio, &self._io)
        p_bio_set_init(self._wbio, 1)
        # (the MemoryBIO objects hold references of their own to their BIOs)
        p_set0_rbio(self._ssl, self._rbio)
        p_set0_wbio(self._ssl, self._wbio)
        # Python asks OpenSSL to free a connection's record buffers whenever they are empty
        # (SSL_MODE_RELEASE_BUFFERS): a malloc and a free of ~17 KiB per record each way,
        # about 1,300 instructions per round trip. The pipe keeps them, and ``idle()`` frees
        # them when the link has been quiet (called on the session's timers)
        p_ssl_ctrl(self._ssl, SSL_CTRL_CLEAR_MODE, SSL_MODE_RELEASE_BUFFERS, NULL)
        if pending:
            self._io.out = _new_bytes(pending, len(pending))
            if self._io.out == NULL:
                raise MemoryError()
            self._io.out_len = len(pending)

    def __dealloc__(self):
        # The SSL object (the SSLObject's) outlives the pipe: its BIOs must not reach back
        if self._rbio != NULL:
            p_bio_set_data(self._rbio, NULL)
        if self._wbio != NULL:
            p_bio_set_data(self._wbio, NULL)
        Py_XDECREF(self._io.out)
        self._io.out = NULL

    cpdef bytes open(self, data):
        """Feed received ciphertext; return all the plaintext it completes (``b""`` if none).
        A close_notify from the peer sets ``peer_closed``; a bad record raises ssl.SSLError."""
        cdef Py_buffer view
        cdef Py_ssize_t cap, got = 0
        cdef size_t done
        cdef int r, err
        cdef PyObject *out = NULL
        cdef char *buf
        cdef bint small
        if self._carry:
            data = self._carry + bytes(data)
            self._carry = b""
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        self._io.src = <const char *>view.buf
        self._io.src_len = view.len
        try:
            # The plaintext is shorter than the records that carry it, but a record begun in
            # an earlier read may end in this one (up to RECORD more). A small read is
            # decrypted into the shared buffer, which holds that much, and copied out at its
            # size; a large one straight into a bytes object, shrunk at the end.
            small = view.len <= RECORD
            if small:
                cap = 2 * RECORD
                buf = _plain
            else:
                cap = view.len + RECORD
                out = _new_bytes(NULL, cap)
                if out == NULL:
                    raise MemoryError()
                buf = _bytes_data(out)
            while True:
                r = p_read(self._ssl, buf + got, <size_t>(cap - got), &done)
                if r == 1:
                    got += <Py_ssize_t>done
                    if got == cap:  # (cannot happen, see above; but if it did: more room)
                        if small:
                            out = _new_bytes(_plain, got)
                            if out == NULL:
                                raise MemoryError()
                            small = False
                        cap *= 2
                        if _PyBytes_Resize(&out, cap) < 0:
                            raise MemoryError()
                        buf = _bytes_data(out)
                    elif self._io.src_len == 0:
                        # OpenSSL reads a record's exact length and returned all of this one's
                        # plaintext: nothing is left to read, so the call that would only
                        # say so (about a thousand instructions) is skipped
                        break
                    continue
                err = _failure(self._ssl, r, "TLS record rejected")
                if err == SSL_ERROR_ZERO_RETURN:
                    self.peer_closed = True
                break
            if self._io.failed:
                self._io.failed = False
                raise MemoryError("TLS: no memory for the records to send")
            if 0 < got <= self.quiet_max and self._io.src_len == 0:
                p_free_buffers(self._ssl)  # (a lone control message: see quiet_max)
            if got == 0:
                result = b""
            elif small:
                result = _plain[:got]
            else:
                if got != cap and _PyBytes_Resize(&out, got) < 0:  # (shrinks in place)
                    raise MemoryError()
                result = <bytes>out
            if self._io.out_len and self._sink is not None:  # (a post-handshake answer)
                self._sink(self.output())
            return result
        finally:
            Py_XDECREF(out)
            self._io.src = NULL
            self._io.src_len = 0
            PyBuffer_Release(&view)

    cdef int _write(self, const char *p, Py_ssize_t n) except -1:
        cdef size_t done
        cdef int r
        while n > 0:
            r = p_write(self._ssl, p, <size_t>n, &done)
            if r != 1:
                if self._io.failed:
                    self._io.failed = False
                    raise MemoryError("TLS: no memory for the records to send")
                _failure(self._ssl, r, "TLS write failed")
                raise ssl.SSLError(1, "TLS write failed: the connection wants a read")
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
            memcpy(_stage + self._staged, p, room)
            self._staged += room
            p += room
            n -= room
            if self._staged == RECORD:
                self._staged = 0
                self._write(_stage, RECORD)
        return 0

    cdef int _reserve(self, Py_ssize_t plaintext) except -1:
        # Room for the records of ``plaintext`` bytes in the output buffer, so that OpenSSL
        # writes them without growing it
        cdef Py_ssize_t need = self._io.out_len + plaintext + (
            plaintext // RECORD + 2) * RECORD_ROOM
        if self._io.out == NULL:
            self._io.out = _new_bytes(NULL, need)
            if self._io.out == NULL:
                raise MemoryError()
        elif need > _bytes_size(self._io.out):
            if _PyBytes_Resize(&self._io.out, need) < 0:
                raise MemoryError()
        return 0

    cpdef bytes seal(self, data):
        """Encrypt ``data`` (a bytes-like object, or a list of them sent as one stream: small
        buffers share a record) and return the ciphertext to send."""
        cdef Py_buffer view
        cdef Py_ssize_t n
        self._staged = 0
        if type(data) is list:
            n = 0
            for b in <list>data:
                n += len(b)
            self._reserve(n)
            for b in <list>data:
                PyObject_GetBuffer(b, &view, PyBUF_SIMPLE)
                try:
                    self._add(<const char *>view.buf, view.len)
                finally:
                    PyBuffer_Release(&view)
        else:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                self._reserve(view.len)
                self._add(<const char *>view.buf, view.len)
            finally:
                PyBuffer_Release(&view)
        if self._staged:
            n = self._staged
            self._staged = 0
            self._write(_stage, n)
            if n <= self.quiet_max:  # (a lone control message: see quiet_max)
                p_free_buffers(self._ssl)
        return self.output()

    cpdef bint idle(self):
        """Free the connection's record buffers if nothing is held in them (a quiet link need
        not keep ~34 KiB); the next record allocates them again. True if they are free."""
        return p_free_buffers(self._ssl) == 1

    def attach(self, sink):
        """Write ciphertext to ``sink`` (a transport's ``write``): ``send`` seals into it, and
        ``open`` writes there what the peer's records called for (tickets, key updates)."""
        self._sink = sink

    cpdef send(self, data):
        """``sink(seal(data))``: the write of a link that runs TLS itself."""
        self._sink(self.seal(data))

    cpdef bytes output(self):
        """Ciphertext waiting to be sent (post-handshake messages, a key update's answer)."""
        cdef PyObject *out = self._io.out
        cdef Py_ssize_t n = self._io.out_len
        if out == NULL or n == 0:
            return b""
        self._io.out = NULL
        self._io.out_len = 0
        try:
            if n != _bytes_size(out) and _PyBytes_Resize(&out, n) < 0:  # (shrinks in place)
                raise MemoryError()
            return <bytes>out
        finally:
            Py_XDECREF(out)

    def session(self):
        """A copy of the session a client may resume on its next connection to this server
        (its ticket received), or ``None``. See :class:`Session`."""
        return _session_of(self._ssl)

    def close(self):
        """A close_notify alert, as ciphertext to send before closing the connection."""
        p_err_clear()
        p_shutdown(self._ssl)
        p_err_clear()
        self._io.failed = False
        return self.output()
