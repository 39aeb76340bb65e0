"""TLS for the client<->server link (stdlib ``ssl``; TLS 1.2 minimum, 1.3 preferred).

On by default. The server uses ``--tls-cert/--tls-key`` or, when none is given, a self-signed
certificate it creates on first start in its state directory (and prints its SHA-256
fingerprint). The client verifies the server with a CA file (``--tls-ca``) or a pinned
fingerprint (``--tls-fingerprint``) and refuses an unverified server unless told
``--tls-insecure``.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import secrets
import socket
import ssl
import stat
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .paths import check_private_dir

__all__ = [
    "ClientTLS",
    "server_context",
    "client_context",
    "ensure_self_signed",
    "fingerprint_of_pem",
    "fingerprint_of_der",
    "normalize_fingerprint",
    "default_state_dir",
    "check_peer",
    "TLSVerifyError",
]


class TLSVerifyError(ConnectionError):
    """The server's certificate did not match the pinned fingerprint."""


def default_state_dir() -> str:
    if os.getuid() == 0:
        return "/var/lib/icafast"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    return os.path.join(base, "icafast")


def normalize_fingerprint(text: str) -> str:
    """'AB:CD:...', 'abcd...', 'sha256:ABCD...' or what ``openssl x509 -fingerprint -sha256``
    prints ('sha256 Fingerprint=AB:CD:...') -> 64 lower-case hex digits."""
    t = text.strip().lower()
    for prefix in ("sha256:", "sha256 fingerprint="):
        if t.startswith(prefix):
            t = t[len(prefix):]
    t = t.replace(":", "").replace(" ", "")
    if len(t) != 64 or any(c not in "0123456789abcdef" for c in t):
        raise ValueError(f"not a SHA-256 fingerprint (64 hex digits): {text!r}")
    return t


def pinned(fingerprints: str | Iterable[str] | None) -> tuple[str, ...]:
    """Fingerprints as ``--tls-fingerprint`` takes them: one, several separated by commas, or
    an iterable of them -> normalized, each once, in order."""
    if not fingerprints:
        return ()
    items = fingerprints.split(",") if isinstance(fingerprints, str) else list(fingerprints)
    out: dict[str, None] = {}
    for item in items:
        out[normalize_fingerprint(item)] = None
    return tuple(out)


def fingerprint_of_der(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def fingerprint_of_pem(path: str) -> str:
    """The fingerprint of the first certificate in the PEM file at ``path``: the one a TLS
    context loads as its own (what precedes it, such as the "Bag Attributes" that
    ``openssl pkcs12`` writes, or ``openssl x509 -text``'s dump, is skipped as OpenSSL skips
    it; ``ssl.PEM_cert_to_DER_cert`` refuses a file that does not start with the certificate)."""
    with open(path, encoding="ascii", errors="replace") as f:
        text = f.read()
    start = text.find(ssl.PEM_HEADER)
    end = text.find(ssl.PEM_FOOTER, start)
    if start < 0 or end < 0:
        raise ValueError(f"certificate file {path} holds no PEM certificate "
                         f"({ssl.PEM_HEADER} ... {ssl.PEM_FOOTER})")
    try:
        der = ssl.PEM_cert_to_DER_cert(text[start : end + len(ssl.PEM_FOOTER)])
    except ValueError as e:  # (not base64)
        raise ValueError(f"certificate file {path}: {e}") from None
    return fingerprint_of_der(der)


def _load_cert_chain(ctx: ssl.SSLContext, cert: str, key: str | None) -> None:
    """``ctx.load_cert_chain`` without OpenSSL's passphrase prompt: for an encrypted key it
    asks on the terminal, and a server or client started from one would wait there (or, with
    none, fail with "Invalid argument")."""
    def no_passphrase() -> bytes:
        raise ValueError(f"the private key in {key or cert} is encrypted: give one without a "
                         "passphrase (openssl pkey -in KEY -out NEWKEY writes one, mode 0600)")

    ctx.load_cert_chain(cert, key, password=no_passphrase)


def _load_verify_locations(ctx: ssl.SSLContext, ca: str) -> None:
    """``ctx.load_verify_locations``, with an error that names the file."""
    try:
        ctx.load_verify_locations(ca)
    except ssl.SSLError as e:
        raise ssl.SSLError(e.errno, f"CA file {ca}: {e.reason or e}: it must hold PEM "
                                    "certificates") from None


#: a certificate that expires within this is said to (icafast.tls.validity_problem)
EXPIRES_SOON = datetime.timedelta(days=14)
#: how long a server's session ticket keys seal tickets before new ones take their place
#: (see :func:`renew_ticket_keys`): a key that leaks opens the TLS sessions resumed within
#: that time at most, not all of those since the server started
TICKET_KEY_LIFETIME = 12 * 3600.0


def validity_problem(cert: str, now: datetime.datetime | None = None,
                     who: str = "clients that verify it (--tls-ca)",
                     renew: str = "") -> str | None:
    """What is wrong with the dates of the first certificate in the PEM file ``cert`` (this
    end's own), or None: expired, not valid yet, or expiring within EXPIRES_SOON (then
    followed by ``renew``: how a renewed one is taken). ``who`` refuses such a certificate
    on every link (a server's: clients that verify it with a CA; a pinned fingerprint does
    not look at dates)."""
    from cryptography import x509

    with open(cert, "rb") as f:
        c = x509.load_pem_x509_certificate(f.read())
    utc = datetime.timezone.utc
    start = getattr(c, "not_valid_before_utc", None) or c.not_valid_before.replace(tzinfo=utc)
    end = getattr(c, "not_valid_after_utc", None) or c.not_valid_after.replace(tzinfo=utc)
    now = now or datetime.datetime.now(utc)
    if now > end:
        return f"the certificate in {cert} expired on {end:%Y-%m-%d %H:%M} UTC: {who} refuse it"
    if now < start:
        return (f"the certificate in {cert} is not valid before {start:%Y-%m-%d %H:%M} UTC "
                f"(is this machine's clock right?): {who} refuse it")
    if end - now < EXPIRES_SOON:
        left = end - now
        days = left.days
        when = (f"in {days} day{'s' if days != 1 else ''}" if days
                else f"in {left.seconds // 3600} h {left.seconds % 3600 // 60} min")
        return (f"the certificate in {cert} expires on {end:%Y-%m-%d %H:%M} UTC, {when}: "
                f"{who} will refuse it then" + (f"; {renew}" if renew else ""))
    return None


def pretty_fingerprint(fp: str) -> str:
    return ":".join(fp[i : i + 2] for i in range(0, len(fp), 2)).upper()


def _check_state_dir(state_dir: str) -> None:
    """Refuse a state directory that another user could write to: they could put a key of
    their own (with its certificate) in place of the server's, or one beside it before the
    server's first start, and impersonate the server to every client that pins its
    fingerprint (:func:`icafast.paths.check_private_dir`; the directory itself not even
    sticky)."""
    check_private_dir(state_dir, "state directory", "the server's key", "--state-dir",
                      sticky_ok=False)


def key_readable_by_everyone(key: str) -> bool:
    """Whether every user of the machine may read the private key file ``key`` (a group that
    may, such as Debian's ``ssl-cert``, is the administrator's choice)."""
    return bool(os.stat(key).st_mode & 0o004)


def _write_new(path: str, data: bytes, mode: int) -> str:
    """Write ``data`` to a new file beside ``path`` (created with ``mode``, never an existing
    file or link followed) and flush it to disk; return its name, for :func:`os.replace`."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path),
                               prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def ensure_self_signed(state_dir: str) -> tuple[str, str, bool]:
    """Return (cert path, key path, created) for the server's self-signed certificate,
    creating an ECDSA P-256 key and a 10-year certificate on first use.

    Clients pin the certificate's fingerprint, so a new one is made only where neither file
    is there: one without the other (a file lost or removed) is an error that says so, rather
    than a new certificate that every pinned client would refuse. The key is written to a new
    file of mode 0600 (never through one already there, whatever its mode or owner), both are
    flushed to disk before they take their names, and a key that others may read is made
    private again with a warning. The directory must not be writable by other users
    (:func:`_check_state_dir`); servers that share it make one pair between them."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    _check_state_dir(state_dir)
    cert = os.path.join(state_dir, "server-cert.pem")
    key = os.path.join(state_dir, "server-key.pem")
    if os.path.lexists(cert) and os.path.lexists(key):
        # (no lock to take: the directory may be read-only, or another user's, as root's)
        return _existing(cert, key)
    # Servers that share the directory (the default one, as root) and start together: one
    # makes the pair while the others wait, then use it. (Each made its own, and the files
    # each renamed last made a pair that did not match, or not the one it had printed.)
    lock = os.open(os.path.join(state_dir, ".lock"),
                   os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_self_signed(state_dir)
    finally:
        os.close(lock)


def _existing(cert: str, key: str) -> tuple[str, str, bool]:
    # The pair is there: a key others may read is made private again, with a warning.
    st = os.stat(key)
    if st.st_mode & 0o077:
        try:
            os.chmod(key, 0o600)
            done = "made private (0600)"
        except OSError as e:
            done = f"it could not be made private ({e.strerror or e})"
        logging.getLogger("icafast").warning(
            "TLS: the private key %s was readable by others (mode %04o): %s; if someone may "
            "have read it, remove %s and %s to create a new certificate (a new fingerprint "
            "for the clients)", key, stat.S_IMODE(st.st_mode), done, key, cert)
    return cert, key, False


def _ensure_self_signed(state_dir: str) -> tuple[str, str, bool]:
    cert = os.path.join(state_dir, "server-cert.pem")
    key = os.path.join(state_dir, "server-key.pem")
    have_cert, have_key = os.path.lexists(cert), os.path.lexists(key)
    if have_cert and have_key:  # (made by a server that held the lock before)
        return _existing(cert, key)
    if have_cert or have_key:
        there, missing = (cert, key) if have_cert else (key, cert)
        raise FileNotFoundError(
            errno.ENOENT, f"{there} is there without {missing}: a new self-signed certificate "
            "would have a new fingerprint, which clients pinned to the old one refuse. "
            f"Restore {missing}, or remove {there} to create a new certificate")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    pkey = ec.generate_private_key(ec.SECP256R1())
    host = socket.gethostname() or "localhost"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"icafast server {host}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    san = x509.SubjectAlternativeName([
        x509.DNSName(host),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pkey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(pkey, hashes.SHA256())
    )
    key_pem = pkey.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    key_tmp = _write_new(key, key_pem, 0o600)
    try:
        cert_tmp = _write_new(cert, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    except BaseException:
        os.unlink(key_tmp)
        raise
    os.replace(key_tmp, key)
    os.replace(cert_tmp, cert)
    dfd = os.open(state_dir, os.O_RDONLY)
    try:  # (the names too, before the fingerprint is printed and pinned)
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return cert, key, True


def _base(protocol: ssl._SSLMethod) -> ssl.SSLContext:
    """A context with the standard library's defaults (``ssl.create_default_context``:
    no compression, forward-secret AEAD ciphers first) but no certificate authorities loaded:
    each side loads only what it trusts. (The system's CA directory would also cost every
    handshake a scan of that directory in OpenSSL 3, even where nothing is verified.)"""
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    keylog = os.environ.get("SSLKEYLOGFILE")  # (as create_default_context: for debugging)
    if keylog and not sys.flags.ignore_environment:
        ctx.keylog_filename = keylog
        # (an environment variable set for debugging, in a profile, is easily inherited by a
        # server: its every link would then be readable by whoever reads that file)
        logging.getLogger("icafast").warning(
            "TLS: the keys of every link are written to %s (SSLKEYLOGFILE is set): whoever "
            "can read that file can decrypt the traffic", keylog)
    return ctx


def server_context(cert: str, key: str, client_ca: str | None = None, *,
                   pair_error: Callable[[Exception], Exception] | None = None
                   ) -> ssl.SSLContext:
    """Server context; with ``client_ca`` clients must present a certificate it signed.
    Where ``cert`` and ``key`` do not load as a certificate and its key (ssl.SSLError,
    ValueError, OSError), ``pair_error`` (if given) makes the exception raised instead, one
    that can say what the files are.

    It issues one TLS session ticket per full handshake (encrypted with a key that lives as
    long as the context), with which a client may resume: an abbreviated handshake, with new
    keys (ECDHE) but without the certificate and its signature. A resumption gets a new ticket
    only once the one it used is past half its lifetime (OpenSSL's default is one after every
    resumption; see :func:`icafast.tlspipe.spare_tickets`). With ``client_ca`` where that
    callback cannot be set (no compiled module), it issues none (see below)."""
    from .tlspipe import spare_tickets

    ctx = _base(ssl.PROTOCOL_TLS_SERVER)
    ctx.num_tickets = 1
    tickets_checked = spare_tickets(ctx)
    try:
        _load_cert_chain(ctx, cert, key)
    except (OSError, ValueError) as e:
        if pair_error is None:
            raise
        raise pair_error(e) from None
    ca_bytes = None
    if client_ca:
        # (what a ticket's client was checked against: see ticket_scope. Read before and after
        # the load: a file rewritten meanwhile may not be what was loaded, and gets no scope)
        ca_bytes = _read_or_none(client_ca)
        _load_verify_locations(ctx, client_ca)
        if _read_or_none(client_ca) != ca_bytes:
            ca_bytes = None
        ctx.verify_mode = ssl.CERT_REQUIRED
        # TLS 1.2 also resumes by session ID, from the server's session cache: no ticket
        # callback sees that, so a client certificate that expired would go unchecked for the
        # rest of its session's lifetime. icafast's own client negotiates TLS 1.3 anyway.
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        if not tickets_checked:
            # A TLS 1.3 resumption shows no certificate, and OpenSSL does not look at the one
            # the session keeps: without the ticket callback that makes a full handshake of a
            # ticket whose client certificate has expired (the compiled module), such a client
            # would come back in with its ticket, renewed on each resumption. No tickets: every
            # link makes a full handshake, which checks the certificate.
            ctx.num_tickets = 0
    if not client_ca or ca_bytes is not None:
        _SCOPES[ctx] = (ctx.verify_mode, _scope_of(ctx.verify_mode, ca_bytes))
    return ctx


def _read_or_none(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None  # (a load says what is wrong with the file)


#: what each server context made by :func:`server_context` verifies clients against (see
#: :func:`ticket_scope`)
_SCOPES: weakref.WeakKeyDictionary[ssl.SSLContext, tuple[int, str]] = \
    weakref.WeakKeyDictionary()


def _scope_of(verify_mode: int, client_ca: bytes | None) -> str:
    h = hashlib.sha256(b"icafast ticket scope 1\0%d\0" % verify_mode)
    if client_ca is not None:
        h.update(client_ca)
    return h.hexdigest()


def ticket_scope(ctx: ssl.SSLContext) -> str | None:
    """What a client that resumes with one of a server context's tickets was checked against,
    beyond the server's key: whether the context verifies client certificates, and the client
    CA file it was loaded from (a digest of its bytes: every certificate trusted, whatever its
    kind). A resumption shows no certificate, so a ticket may only be opened by a context that
    would have let the same clients in. None where that cannot be told (a context that verifies
    clients, not made by :func:`server_context`): its keys are never carried."""
    mode, scope = _SCOPES.get(ctx, (None, None))
    if mode == ctx.verify_mode:  # (not changed since)
        return scope
    if ctx.verify_mode == ssl.CERT_NONE:
        return _scope_of(ssl.CERT_NONE, None)
    return None


def export_ticket_keys(ctx: ssl.SSLContext, age: float | None = None) -> dict[str, Any] | None:
    """A server context's session ticket keys, and the scope they were used in
    (:func:`ticket_scope`), for a context that takes its place (:func:`import_ticket_keys`):
    a certificate reloaded, the server an upgrade in place hands over to. ``age``: how long
    they have sealed tickets, in seconds (recorded as ``age``, for the next server to renew
    them in time). None where they cannot be read (no compiled module)."""
    from .tlspipe import ticket_keys

    keys = ticket_keys(ctx)
    scope = ticket_scope(ctx)
    if keys is None or scope is None:
        return None
    doc: dict[str, Any] = {"scope": scope, "keys": keys.hex()}
    if age is not None:
        doc["age"] = age
    return doc


def renew_ticket_keys(ctx: ssl.SSLContext) -> bool:
    """Give a server context new session ticket keys, made at random as OpenSSL makes its
    own: the tickets it sealed before can no longer be opened (each of their clients makes a
    full handshake once), and a key that leaks later opens none of them. OpenSSL never changes
    a context's keys by itself; a server calls this every :data:`TICKET_KEY_LIFETIME`.
    Returns whether they were changed (never where the keys cannot be reached: no compiled
    module)."""
    from .tlspipe import set_ticket_keys, ticket_keys

    keys = ticket_keys(ctx)
    return keys is not None and set_ticket_keys(ctx, secrets.token_bytes(len(keys)))


def import_ticket_keys(ctx: ssl.SSLContext, doc: Any) -> bool:
    """Open and seal session tickets with the keys :func:`export_ticket_keys` wrote out, so
    that the clients of the context before resume their TLS sessions (abbreviated handshakes)
    instead of making full ones. Taken only where this context lets in the same clients (the
    same :func:`ticket_scope`): a client CA added, removed or changed, or client certificates
    required where they were not, and every client shows its certificate again, in a full
    handshake. Returns whether they were taken.

    The keys then live on, as they would had the server gone on without a reload or an
    upgrade (OpenSSL does not change them while a context lives), until the server renews
    them (:func:`renew_ticket_keys`): how long they have already lived is ``doc["age"]``,
    where the exporter gave it."""
    from .tlspipe import set_ticket_keys

    scope = ticket_scope(ctx)
    if scope is None or not isinstance(doc, dict) or doc.get("scope") != scope:
        return False
    try:
        keys = bytes.fromhex(doc["keys"])
    except (KeyError, TypeError, ValueError):
        return False
    return set_ticket_keys(ctx, keys)


@dataclass
class ClientTLS:
    """How the client secures and verifies its links."""

    context: ssl.SSLContext
    #: SHA-256 fingerprint the server certificate must have (None: the context verifies);
    #: the first of ``fingerprints`` when several are pinned
    fingerprint: str | None = None
    #: Name to check the certificate against (None: the server host given).
    server_hostname: str | None = None
    #: Resume TLS sessions: a link offers the session of the latest link to the same server
    #: (same address and name), an abbreviated handshake if the server still takes it. Only
    #: TLS 1.3 sessions: their resumption makes new keys (ECDHE); TLS 1.2's reuses the old.
    resume: bool = True
    #: every fingerprint pinned, any of which the server certificate may have (a certificate
    #: being replaced: the old one's and the new one's); empty: ``fingerprint`` alone
    fingerprints: tuple[str, ...] = ()
    _sessions: dict[tuple[str, int, str], Any] = field(default_factory=dict, init=False,
                                                       repr=False, compare=False)
    #: the files the context was loaded from (CA, certificate, key), what they were then,
    #: and how to load them again (client_context sets them: see current_context)
    _files: tuple[str, ...] = field(default=(), repr=False, compare=False)
    _stamp: tuple[Any, ...] = field(default=(), repr=False, compare=False)
    _reload: Callable[[], ssl.SSLContext] | None = field(default=None, repr=False,
                                                        compare=False)

    def current_context(self) -> ssl.SSLContext:
        """The context for a new link. When a file it was loaded from has changed since (a
        renewed client certificate, written over the old as an ACME client does, or a new CA
        file), it is loaded again first, so that a long-running client needs no restart, which
        would end its sessions. Files that do not load are a warning, once per change, and
        the context loaded before stays. The links already up keep theirs."""
        if self._reload is None:  # (no files: nothing to load again)
            return self.context
        stamp = file_stamp(self._files)
        if stamp == self._stamp:
            return self.context
        self._stamp = stamp  # (tried once per change: a file still being written changes again)
        try:
            ctx = self._reload()
        except (OSError, ValueError) as e:
            logging.getLogger("icafast").warning(
                "TLS: %s changed but does not load (%s); new links keep what was loaded before",
                ", ".join(self._files), getattr(e, "reason", None) or e)
            return self.context
        self.context = ctx
        self._sessions.clear()  # (a new certificate must be shown: full handshakes)
        logging.getLogger("icafast").info("TLS: %s changed: loaded again for new links",
                                          ", ".join(self._files))
        return ctx

    def session_for(self, host: str, port: int) -> Any:
        """The session to offer a new link to ``host:port`` (None: a full handshake).

        Resuming is as safe as the handshake that made the session: only a server this client
        verified (chain and name, or pinned fingerprint) can have sealed its ticket, and the
        certificate the session carries is that server's, which :func:`check_peer` checks
        again. A session is kept per address and name checked (``server_hostname`` or the
        host), never offered to another server."""
        if not self.resume:
            return None
        return self._sessions.get((host, port, self.server_hostname or host))

    def _identity(self) -> Any:
        """What the sessions kept were made under: the pins, the name checked, the files and
        what they were, the verification (as JSON has it)."""
        return json.loads(json.dumps([
            self.fingerprint, list(self.fingerprints), self.server_hostname, list(self._files),
            list(self._stamp), int(self.context.verify_mode), self.context.check_hostname]))

    def export_sessions(self) -> dict[str, Any]:
        """The sessions kept, written out for the client a hand-over goes to
        (:meth:`import_sessions`: there the links resume them, as they would here). Sessions
        that cannot be written out (where the compiled pipe does not run) are left out."""
        out = []
        for (host, port, name), session in self._sessions.items():
            to_bytes = getattr(session, "to_bytes", None)
            data = to_bytes() if to_bytes is not None else None
            if data:
                out.append([host, port, name, data.hex()])
        return {"identity": self._identity(), "sessions": out}

    def import_sessions(self, doc: Any) -> int:
        """Keep the sessions :meth:`export_sessions` wrote out in another process, if they
        were made under the same settings and files as this client's (else none: links make
        full handshakes, as after a change of files). Returns how many were taken."""
        from .tlspipe import session_from_bytes

        if not self.resume or not isinstance(doc, dict) or \
                doc.get("identity") != self._identity():
            return 0
        taken = 0
        for host, port, name, data in doc.get("sessions", []):
            session = session_from_bytes(bytes.fromhex(data))
            if session is not None:
                self._sessions[(str(host), int(port), str(name))] = session
                taken += 1
        return taken

    def remember(self, host: str, port: int, session: Any) -> None:
        """Keep the session of a link to ``host:port`` that is up (its TLS pipe's
        ``session()``)."""
        if not self.resume or session is None:
            return
        if len(self._sessions) >= 64:  # (one per server: a client has few)
            self._sessions.clear()
        self._sessions[(host, port, self.server_hostname or host)] = session


def file_stamp(paths: tuple[str, ...]) -> tuple[Any, ...]:
    """What tells whether files have changed: each one's device, inode, size and modification
    time (a file written over, or renamed into place; None for one that cannot be read)."""
    out: list[Any] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def client_context(*, ca: str | None = None, fingerprint: str | Iterable[str] | None = None,
                   insecure: bool = False, cert: str | None = None, key: str | None = None,
                   server_hostname: str | None = None) -> ClientTLS:
    """Build the client's TLS settings. Exactly one way of trusting the server is needed:
    ``ca`` (chain + host name), ``fingerprint`` (pinned certificate; several, in a list or
    separated by commas, while the server's certificate is replaced) or ``insecure``."""
    if not (ca or fingerprint or insecure):
        raise ValueError("refusing an unverified server: give a CA file (--tls-ca), a pinned "
                         "certificate fingerprint (--tls-fingerprint) or --tls-insecure")
    files = tuple(f for f in (ca, cert, key) if f)
    stamp = file_stamp(files)  # (before they are read: a change after that is seen later)
    pins = pinned(fingerprint)
    out = ClientTLS(_client_ssl(ca, cert, key), pins[0] if pins else None, server_hostname,
                    fingerprints=pins)
    if files:
        out._files, out._stamp = files, stamp
        out._reload = functools.partial(_client_ssl, ca, cert, key)
    return out


def _client_ssl(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    if ca:  # only this CA file: not also the system's authorities
        _load_verify_locations(ctx, ca)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:  # pinned or insecure: no chain check (a pin is checked after the handshake)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert:
        _load_cert_chain(ctx, cert, key)
    return ctx


def check_peer(tls: ClientTLS | None, ssl_object: ssl.SSLObject | None) -> None:
    """After the handshake: raise TLSVerifyError unless the server certificate has a pinned
    fingerprint (any of them, when several are pinned)."""
    if tls is None or tls.fingerprint is None:
        return
    pins = tls.fingerprints or (tls.fingerprint,)
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise TLSVerifyError("server presented no certificate")
    got = fingerprint_of_der(der)
    if got not in pins:
        raise TLSVerifyError(f"server certificate fingerprint {pretty_fingerprint(got)} does not "
                             "match the pinned "
                             + " or ".join(pretty_fingerprint(p) for p in pins))
