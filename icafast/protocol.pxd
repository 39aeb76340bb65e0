# Cython declarations for protocol.py, which is compiled as it is when a C compiler is present
# (pure-Python mode with this augmenting .pxd: the .py stays the one source of the engine and
# runs unchanged where it is not compiled). Attributes are public so that adapters, tests and
# embedders see the same objects either way.

cimport cython
from icafast._core cimport (
    Frame as _CFrame,
    FrameDecoder as _CFrameDecoder,
    ReplayBuffer as _CReplayBuffer,
)

cpdef _us(double now)  # (a C call from the PING path)

# Frame types and link phases as C constants (compared on every frame)
cdef int _TYPE_DATA, _TYPE_ACK, _TYPE_PING, _TYPE_PONG, _TYPE_CLOSE
cdef int _HELLO_SENT, _AUTH_SENT, _ESTABLISHED
cdef int _WC_HOLD, _WC_HIGH, _WC_LOW  # window control's phases
cdef unsigned long long _MAX_OFFSET
cdef double _NEVER
cdef int _FLAG_FIN
cdef object _CLOSED, _ACTIVE  # (State members as C globals: no module lookup per call)


cdef class _Link:
    cdef public object id, nonce, peer_nonce
    cdef public int phase
    cdef public _CFrameDecoder decoder
    cdef public double started, last_rx, last_heard, last_ping
    cdef public object ping_ts
    cdef public unsigned long long peer_max_payload
    cdef public bint confirm_secret, reading_paused, acks_heard


cdef class SessionEngine:
    # No instance __dict__: the compiled adapter's calls of the cpdef methods below then go
    # straight to C (an instance dict makes Cython look each call up, in case an attribute
    # overrides the method; 10,000 sessions defeat its cache).
    cdef public object config, _policy, session_id, state, created
    cdef public _CReplayBuffer tx  # (the compiled core's: its methods are C calls from here)
    cdef public double _ack_delay, _handshake_timeout, _ping_after, _dead_timeout
    cdef public _Link _link
    # Stream offsets and counters as C integers (PROTOCOL.md 4.1: every offset, the FIN's
    # ack included, fits in 64 bits; the engine refuses a stream that would pass that)
    cdef public unsigned long long _tx_sent, _tx_high, _peer_ack, _rx, _rx_acked, sink_backlog
    cdef public unsigned long long _frame_size, _ack_threshold, _window, _burst
    cdef public unsigned long long _peer_replay_limit
    cdef public object handshake_rtt
    # window control (protocol.py, WC_*)
    cdef public unsigned long long _window_hi, _window_lo, _wc_choice, _wc_b0, _wc_settle
    cdef public unsigned long long _wc_full
    cdef public int _wc_phase
    cdef public double _wc_t0, _wc_rate, _wc_rate_lo, _wc_until, _wc_hold
    cdef public unsigned long long reconnects, bytes_received, replayed_total
    cdef public bint _tx_fin, _tx_fin_acked, _rx_fin, _ack_now
    cdef public double _now, last_activity, _ack_due
    cdef public object _ack_hold
    cdef public object _link_seq, _disconnected_at
    cdef public list _out
    cdef public list _events  # (consumed from _ev_head on: no deque method lookups)
    cdef public Py_ssize_t _ev_head
    cdef public object srtt, rttvar, close_reason

    # the per-message path: C calls within the module and from the compiled adapter
    cpdef next_event(self)
    @cython.locals(events=list, i=Py_ssize_t)
    cpdef _next_raw(self)
    cpdef unsigned long long _free(self) except? 0xFFFFFFFFFFFFFFFF
    @cython.locals(tx=_CReplayBuffer, used=cython.ulonglong, w=cython.ulonglong)
    @cython.final
    cdef inline unsigned long long _room(self) noexcept
    @cython.locals(room=cython.ulonglong)
    cpdef send_view(self, max_bytes=*)
    cpdef commit_view(self, n)
    @cython.locals(room=cython.ulonglong)
    cpdef _recv_window(self, unsigned long long max_bytes)
    cpdef _commit_recv(self, unsigned long long n)
    @cython.locals(ackv=cython.ulonglong, out=list)
    cpdef list data_to_send(self, include_data=*)
    @cython.locals(tx=_CReplayBuffer, end=cython.ulonglong, sent=cython.ulonglong,
                   n=cython.ulonglong, size=cython.ulonglong, rx=cython.ulonglong,
                   high=cython.ulonglong, last=bint, fin=bint)
    cpdef _frame_data(self, _Link link)
    @cython.locals(sent=cython.ulonglong, n=cython.ulonglong)
    cpdef _frame_one(self)
    @cython.locals(ackv=cython.ulonglong)
    cpdef bint _output_idle(self) except -1
    cpdef bint has_unsent(self) except -1
    @cython.locals(rx=cython.ulonglong, backlog=cython.ulonglong, v=cython.ulonglong)
    cpdef unsigned long long _ack_value(self) except? 0xFFFFFFFFFFFFFFFF
    @cython.locals(sent=cython.ulonglong)
    cpdef bint _both_ended(self) except -1
    @cython.locals(end=cython.ulonglong)
    cpdef unsigned long long _tx_limit(self) except? 0xFFFFFFFFFFFFFFFF
    cpdef _sent_ack(self)
    cpdef receive_data(self, data, now)
    cpdef _frames_in(self, _Link link, list frames, now)
    @cython.locals(f=_CFrame, rx=cython.ulonglong, n=cython.ulonglong)
    cpdef _receive_one(self, data, double now)
    @cython.locals(f=_CFrame, t=int, heard=bint)
    cpdef _receive_frames(self, _Link link, list frames, now)
    @cython.locals(tx=_CReplayBuffer, end=cython.ulonglong)
    cpdef _apply_ack(self, unsigned long long ack)
    @cython.locals(upper=cython.ulonglong, sent=cython.ulonglong)
    cpdef _on_ack(self, unsigned long long ack)
    @cython.locals(s=cython.ulonglong, n=cython.ulonglong, rx=cython.ulonglong,
                   skip=cython.ulonglong, fin=int)
    cpdef _on_data(self, _CFrame f, now)
    cpdef _check_done(self)
    cpdef get_timer(self)
    @cython.locals(t=double, dead=double)
    cpdef double _deadline(self) except? -1.0
    cpdef _extra_timer(self)
    # ... and an idle session's keepalive: its timer and the PING / PONG frames
    cpdef handle_timer(self, double now)
    cpdef _handle_extra_timer(self, now)
    cpdef _ping(self, _Link link, double now)
    cpdef _send_control(self, ftype, seq=*, payload=*)
    cpdef _shrink_if_idle(self)
    cpdef _rtt_sample(self, double r)
    cpdef _wc_switch(self, int phase, unsigned long long window, unsigned long long ack)
    cpdef _wc_hold_for(self, unsigned long long window)
    cpdef _wc_ack(self, unsigned long long used, unsigned long long ack)


cdef class ClientSession(SessionEngine):
    cdef public object _secret, _rng, _attempt, _reconnect_at, _ever_established
    cdef public object server_policy, _close_pending, _first_attempt_at, _new_token

    cpdef _extra_timer(self)
    cpdef _handle_extra_timer(self, now)


cdef class ServerHandshake:
    cdef dict __dict__
    cdef public object config, decoder, nonce, client_nonce, client_max_payload
    cdef public object client_replay_limit, started, version, received, resume, done
    cdef public object _waiting_hello, _hello_read, _out, _events, _hello_at, rtt


cdef class ServerSession(SessionEngine):
    cdef public object _secret, _pending_secret, held, _expiry, client_address, attached_links
    cdef public object new_token

    cpdef _check_done(self)
    cpdef _extra_timer(self)
    cpdef _handle_extra_timer(self, now)
