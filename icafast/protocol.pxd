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


cdef class _Link:
    cdef public object id, phase, nonce, peer_nonce
    cdef public _CFrameDecoder decoder
    cdef public double started, last_rx, last_heard, last_ping
    cdef public object ping_ts, peer_max_payload, confirm_secret


cdef class SessionEngine:
    # No instance __dict__: the compiled adapter's calls of the cpdef methods below then go
    # straight to C (an instance dict makes Cython look each call up, in case an attribute
    # overrides the method; 10,000 sessions defeat its cache).
    cdef public object config, _policy, session_id, state, created
    cdef public _CReplayBuffer tx  # (the compiled core's: its methods are C calls from here)
    cdef public double _ack_delay, _handshake_timeout, _ping_after, _dead_timeout
    cdef public object _frame_size
    cdef public _Link _link
    cdef public object _tx_sent, _tx_fin, _tx_fin_acked, _peer_ack, _rx, _rx_fin, _rx_acked
    cdef public object _ack_hold, _ack_now, _now, sink_backlog, _ack_due, _ack_threshold
    cdef public object _link_seq, _out, _events, _disconnected_at
    cdef public object reconnects, bytes_received, replayed_total, last_activity, srtt, rttvar
    cdef public object close_reason

    # the per-message path: C calls within the module and from the compiled adapter
    cpdef next_event(self)
    cpdef _next_raw(self)
    cpdef _free(self)
    cpdef send_view(self, max_bytes)
    cpdef commit_view(self, n)
    cpdef data_to_send(self, include_data=*)
    @cython.locals(tx=_CReplayBuffer)
    cpdef _frame_data(self, _Link link)
    cpdef _ack_value(self)
    cpdef _tx_limit(self)
    cpdef _sent_ack(self)
    cpdef receive_data(self, data, now)
    @cython.locals(f=_CFrame)
    cpdef _receive_frames(self, _Link link, list frames, now)
    cpdef _apply_ack(self, ack)
    cpdef _on_ack(self, ack)
    cpdef _on_data(self, _CFrame f, now)
    cpdef _check_done(self)
    cpdef get_timer(self)
    cpdef _extra_timer(self)
    # ... and an idle session's keepalive: its timer and the PING / PONG frames
    cpdef handle_timer(self, double now)
    cpdef _handle_extra_timer(self, now)
    cpdef _ping(self, _Link link, double now)
    cpdef _send_control(self, ftype, seq=*, payload=*)
    cpdef _shrink_if_idle(self)
    cpdef _rtt_sample(self, double r)


cdef class ClientSession(SessionEngine):
    cdef public object _secret, _rng, _attempt, _reconnect_at, _ever_established
    cdef public object server_policy, _close_pending, _first_attempt_at

    cpdef _extra_timer(self)
    cpdef _handle_extra_timer(self, now)


cdef class ServerHandshake:
    cdef dict __dict__
    cdef public object config, decoder, nonce, client_nonce, client_max_payload
    cdef public object client_replay_limit, started, version, received, resume, done
    cdef public object _waiting_hello, _out, _events


cdef class ServerSession(SessionEngine):
    cdef public object _secret, _pending_secret, held, _expiry, client_address, attached_links

    cpdef _check_done(self)
    cpdef _extra_timer(self)
    cpdef _handle_extra_timer(self, now)
