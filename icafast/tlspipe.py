"""TLS records in and out of a link, on a connection whose handshake Python's ``ssl`` did.

The specification and pure-Python twin of the compiled pipe in ``icafast._tlsio``: the same
methods, the same results, ``ssl.SSLError`` on a bad record (the message differs: the compiled
pipe reports OpenSSL's error string). A link that uses a pipe runs TLS over a plain transport:
the handshake is done by an ``ssl.SSLObject`` over two ``ssl.MemoryBIO`` objects (so
certificates and their checks are exactly Python's), then every record goes through the pipe.

``pipe_for(sslobj, incoming, outgoing)`` gives the compiled pipe where it can run (see
``icafast._tlsio.bind``), else ``None``: icafast then uses the event loop's TLS transport, whose
per-record path is faster than this twin's. ``ICAFAST_TLS_IO`` overrides: ``loop`` (the loop's
TLS transport), ``pure`` (this twin: tests), ``compiled`` (fail if it cannot run).
"""

from __future__ import annotations

import os
import ssl
from typing import Any

__all__ = ["TLSPipe", "RECORD", "tls_io_mode", "pipe_for", "compiled_unavailable", "uses_pipe",
           "describe"]

#: the largest plaintext of one TLS record: writes are joined and cut into records of this size
RECORD = 16384


class TLSPipe:
    """Ciphertext in, plaintext out (:meth:`open`); plaintext in, ciphertext out (:meth:`seal`)."""

    def __init__(self, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        self._obj, self._in, self._out = sslobj, incoming, outgoing
        #: the peer sent close_notify: no more plaintext will come
        self.peer_closed = False
        #: records of at most this much plaintext free the record buffers after them (the
        #: compiled pipe; Python's ``ssl`` frees them after every record anyway)
        self.quiet_max = 0
        self._sink: Any = None

    def idle(self) -> bool:
        """Free the connection's record buffers if nothing is held in them. (Python's ``ssl``
        already frees them after every record: always True here.)"""
        return True

    def attach(self, sink: Any) -> None:
        """Write ciphertext to ``sink`` (a transport's ``write``): ``send`` seals into it, and
        ``open`` writes there what the peer's records called for (tickets, key updates)."""
        self._sink = sink

    def send(self, data: Any) -> None:
        """``sink(seal(data))``: the write of a link that runs TLS itself."""
        self._sink(self.seal(data))

    def open(self, data: Any) -> bytes:
        """Feed received ciphertext; return all the plaintext it completes (``b""`` if none).
        A close_notify from the peer sets ``peer_closed``; a bad record raises ssl.SSLError."""
        if len(data):
            self._in.write(data)
        parts = []
        while True:
            try:
                chunk = self._obj.read(RECORD)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            if not chunk:  # (a close_notify seen by an earlier read)
                self.peer_closed = True
                break
            parts.append(chunk)
        if self._sink is not None and self._out.pending:  # (a post-handshake answer)
            self._sink(self.output())
        return b"".join(parts)

    def seal(self, data: Any) -> bytes:
        """Encrypt ``data`` (a bytes-like object, or a list of them sent as one stream: small
        buffers share a record) and return the ciphertext to send."""
        joined = b"".join(data) if isinstance(data, list) else data
        if len(joined):
            self._obj.write(joined)  # (OpenSSL cuts it into records of RECORD bytes)
        return self.output()

    def output(self) -> bytes:
        """Ciphertext waiting to be sent (post-handshake messages, a key update's answer)."""
        return self._out.read() if self._out.pending else b""

    def close(self) -> bytes:
        """A close_notify alert, as ciphertext to send before closing the connection."""
        try:
            self._obj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass  # (the peer's close_notify is not awaited)
        return self.output()

    def session(self) -> ssl.SSLSession | None:
        """The session a client may resume on its next connection to this server (its ticket
        received), or ``None``; give it to :func:`offer_session`."""
        sess = self._obj.session
        return sess if sess is not None and sess.has_ticket else None


def tls_io_mode() -> str:
    """``ICAFAST_TLS_IO``: ``auto`` (default), ``compiled``, ``pure`` or ``loop``."""
    v = os.environ.get("ICAFAST_TLS_IO", "").strip().lower() or "auto"
    if v not in ("auto", "compiled", "pure", "loop"):
        raise ValueError(f"ICAFAST_TLS_IO={v!r}: expected auto, compiled, pure or loop")
    return v


def compiled_unavailable() -> str | None:
    """Why the compiled pipe cannot run here (``None``: it can)."""
    from ._impl import _want_pure

    if _want_pure():
        return "ICAFAST_PURE_PYTHON is set"
    try:
        mod = _compiled_module()
    except ImportError as e:
        return f"icafast._tlsio not built ({e})"
    return mod.bind()  # type: ignore[no-any-return]


def uses_pipe() -> bool:
    """Whether links run TLS through a pipe (else through the event loop's TLS transport)."""
    mode = tls_io_mode()
    if mode == "loop":
        return False
    if mode == "pure":
        return True
    why = compiled_unavailable()
    if why is not None and mode == "compiled":
        raise RuntimeError(f"ICAFAST_TLS_IO=compiled: {why}")
    return why is None


def describe() -> str:
    """What runs TLS on links here, for logs: ``compiled pipe``, ``pure-Python pipe`` or the
    event loop's transport (with the reason the pipe is not used)."""
    mode = tls_io_mode()
    if mode == "pure":
        return "pure-Python pipe (ICAFAST_TLS_IO=pure)"
    if mode == "loop":
        return "the event loop's TLS transport (ICAFAST_TLS_IO=loop)"
    why = compiled_unavailable()
    return "compiled pipe" if why is None else f"the event loop's TLS transport ({why})"


def spare_tickets(ctx: ssl.SSLContext) -> bool:
    """On a server context: no new session ticket after a resumption with a ticket in the first
    half of its lifetime (:func:`icafast._tlsio.spare_tickets`), where the compiled module can
    run; elsewhere OpenSSL's default stays (a new ticket after every handshake). Returns
    whether it was set."""
    if compiled_unavailable() is not None:
        return False
    return bool(_compiled_module().spare_tickets(ctx))


def offer_session(sslobj: ssl.SSLObject, session: Any) -> bool:
    """Offer a session from a pipe's ``session()`` in the handshake of a client connection
    not started yet (whether it is resumed is the server's choice). Returns whether it was
    set: ``ssl.SSLSession`` through Python (which copies it), ``icafast._tlsio.Session``
    through OpenSSL."""
    if isinstance(session, ssl.SSLSession):
        try:
            sslobj.session = session
        except ValueError:  # (a session of another context)
            return False
        return True
    return bool(session.offer(sslobj))


def session_from_bytes(data: bytes) -> Any:
    """A session written out by a pipe's session's ``to_bytes()`` (in another process: a
    client's hand-over), to offer as :func:`offer_session` does; None where the compiled
    module cannot run or the bytes are not a session that can be resumed."""
    if compiled_unavailable() is not None:
        return None
    return _compiled_module().session_from_bytes(data)


def ticket_keys(ctx: ssl.SSLContext) -> bytes | None:
    """The keys a server context seals and opens its session tickets with
    (:func:`icafast._tlsio.ticket_keys`), where the compiled module can run; elsewhere None
    (Python's ``ssl`` has no way to them: a new context cannot open the tickets of one before)."""
    if compiled_unavailable() is not None:
        return None
    return _compiled_module().ticket_keys(ctx)  # type: ignore[no-any-return]


def set_ticket_keys(ctx: ssl.SSLContext, keys: bytes) -> bool:
    """Give a server context the ticket keys of another (:func:`ticket_keys`). Returns whether
    it took them (never where the compiled module cannot run)."""
    if compiled_unavailable() is not None:
        return False
    return bool(_compiled_module().set_ticket_keys(ctx, keys))


_compiled: Any = None


def _compiled_module() -> Any:
    """``icafast._tlsio`` (ImportError where it is not built), imported once."""
    global _compiled
    if _compiled is None:
        from . import _tlsio  # type: ignore[attr-defined]

        _compiled = _tlsio
    return _compiled


def pipe_for(sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> Any:
    """The pipe for a finished handshake: compiled unless ``ICAFAST_TLS_IO=pure``."""
    if tls_io_mode() == "pure":
        return TLSPipe(sslobj, incoming, outgoing)
    return _compiled_module().TLSPipe(sslobj, incoming, outgoing)
