# Cython declarations for _relay.py, which is compiled as it is when a C compiler is present
# (see icafast/protocol.pxd): the per-message path (endpoint and link callbacks, the runner's
# pump) then runs without dictionary lookups. Attributes are public: adapters, tests and
# embedders see the same objects either way.
cimport cython

from icafast.protocol cimport SessionEngine


cdef class Runner

cdef double _NEVER
cdef Py_ssize_t _READ_SIZE, _MIN_READ_SIZE  # (READ_SIZE, MIN_READ_SIZE as C constants)
cdef Py_ssize_t _BULK_READ, _BULK_SMALL_READS
cdef double _TIMER_TICK, _COALESCE_AFTER


cdef class _EndpointBase:
    cdef public object runner  # a Runner, or the client's plain-relay fallback bridge
    cdef public object transport, _spare
    # the transport's write, writelines and get_write_buffer_size
    cdef public object _write, _writelines, _buffered
    cdef public list pending
    cdef public bint paused, eof, closed, _in_spare
    cdef public Py_ssize_t _hint, _offered, _burst

    @cython.locals(r=Runner, eng=SessionEngine, n=Py_ssize_t)
    cpdef get_buffer(self, Py_ssize_t sizehint)
    @cython.locals(r=Runner, total=Py_ssize_t, hint=Py_ssize_t)
    cpdef buffer_updated(self, Py_ssize_t nbytes)


cdef class _LinkBase:
    cdef public object owner, transport, link_id, peer, tls_setup, tls, ssl_object, on_lost
    cdef public object _write, _writelines  # the transport's (bound once: no lookup per call)
    cdef public bint write_paused, reading_held, closed, join_writes
    cdef public _BulkReaderBase _bulk
    cdef public Py_ssize_t bulk_starts, bulk_reads

    @cython.locals(r=Runner)
    cpdef data_received(self, data)
    cpdef _stop_bulk(self)


cdef class _BulkReaderBase:
    cdef public _LinkBase link
    cdef public bint lost
    cdef public Py_ssize_t _small

    cpdef get_buffer(self, Py_ssize_t sizehint)
    @cython.locals(link=_LinkBase, b=bytearray)
    cpdef buffer_updated(self, Py_ssize_t nbytes)


cdef class _TickSlot:
    cdef public Runner runner


cdef class _Ticks:
    cdef public object loop
    cdef public dict due

    cpdef add(self, Runner runner, long long tick)
    @cython.locals(slot=_TickSlot, r=Runner)
    cpdef _fire(self, long long tick)


cdef class Runner:
    cdef dict __dict__
    cdef object __weakref__
    cdef public object loop, name, on_status, _timer, closed_future, _time
    cdef public double _timer_at
    cdef public _Ticks _ticks
    cdef public _TickSlot _slot
    cdef public long long _tick
    cdef public bint _done, _close_link_after_flush, _sink_written, _more_due
    cdef public unsigned long long _sink_cap
    cdef public SessionEngine engine
    cdef public _EndpointBase endpoint
    cdef public _LinkBase link

    # the per-message path and the timers, as C methods for the calls within this module
    # (their Python-visible entry points are pump() and _on_timer())
    @cython.locals(bufs=list, batch=list)
    cdef _pump(self)
    @cython.locals(eng=SessionEngine, link=_LinkBase, ep=_EndpointBase)
    cdef _pump_source(self)
    @cython.locals(t=double)
    cdef _schedule(self)
    cdef _cancel_timer(self)
    cdef _timer_fired(self)
    cdef bint _sink_queues(self, _EndpointBase ep) except -1
    cdef _deliver(self, data)
    cdef _deliver_all(self, list bufs)
    @cython.locals(eng=SessionEngine, ep=_EndpointBase, link=_LinkBase)
    cdef _link_data(self, _LinkBase link, data)
