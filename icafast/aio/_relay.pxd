# Cython declarations for _relay.py, which is compiled as it is when a C compiler is present
# (see icafast/protocol.pxd): the per-message path (endpoint and link callbacks, the runner's
# pump) then runs without dictionary lookups. Attributes are public: adapters, tests and
# embedders see the same objects either way.
from icafast.protocol cimport SessionEngine


cdef class Runner:
    cdef dict __dict__
    cdef object __weakref__
    cdef public object loop, name, endpoint, link, on_status, _timer, _timer_at, _done
    cdef public object _close_link_after_flush, closed_future
    cdef public SessionEngine engine


cdef class _EndpointBase:
    cdef public object runner  # a Runner, or the client's plain-relay fallback bridge
    cdef public object transport, paused, eof, closed, _spare, _in_spare, _hint, pending
    cdef public object _offered, _burst


cdef class _LinkBase:
    cdef public object owner, transport, link_id, write_paused, closed, peer, join_writes
