"""The TLS pipe (icafast._tlsio) against its pure-Python twin (icafast.tlspipe).

Each test makes a real TLS connection in memory: two ``ssl.SSLObject`` over ``MemoryBIO``s,
Python's own handshake, then the pipes of either kind on each end. Records sealed by one kind
must open with the other, however the ciphertext is cut on the way, and both kinds must cut a
stream into the same records.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icafast import tls, tlspipe

_tlsio = pytest.importorskip("icafast._tlsio", reason="compiled TLS pipe not built")

KINDS = {"compiled": lambda *a: _tlsio.TLSPipe(*a), "pure": lambda *a: tlspipe.TLSPipe(*a)}


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    d = tmp_path_factory.mktemp("tlspipe")
    cert, key, _ = tls.ensure_self_signed(str(d))
    return tls.server_context(cert, key), tls.client_context(ca=cert).context


def handshake(contexts, version=None, session=None):
    """A finished TLS handshake in memory: (server objects, client objects). ``session``: one
    for the client to offer (from a pipe's ``session()``)."""
    sctx, cctx = contexts
    if version is not None:
        cctx = tls.client_context(insecure=True).context
        cctx.maximum_version = version
    si, so, ci, co = (ssl.MemoryBIO() for _ in range(4))
    s = sctx.wrap_bio(si, so, server_side=True)
    c = cctx.wrap_bio(ci, co, server_hostname="localhost")
    if session is not None:
        assert tlspipe.offer_session(c, session)
    done = set()
    for _ in range(10):
        for name, obj, out, peer_in in (("c", c, co, si), ("s", s, so, ci)):
            try:
                obj.do_handshake()
                done.add(name)
            except ssl.SSLWantReadError:
                pass
            if out.pending:
                peer_in.write(out.read())
        if done == {"c", "s"}:
            break
    assert done == {"c", "s"}
    return (s, si, so), (c, ci, co)


def pipes(contexts, server_kind, client_kind, version=None):
    srv, cli = handshake(contexts, version)
    return KINDS[server_kind](*srv), KINDS[client_kind](*cli)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("kind", KINDS)
def test_sessions_from_either_kind_resume_and_survive_a_connection_that_ends_badly(
        contexts, kind, version):
    """A client pipe gives its session once the server's ticket is in (TLS 1.3 sends it after
    the handshake); offered to the next connection, it resumes it. The compiled kind keeps an
    in-memory copy, so a connection that then ends without a close_notify (OpenSSL marks its
    own session as not resumable) leaves the kept session resumable."""
    contexts = (contexts[0], tls.client_context(insecure=True).context)
    contexts[1].maximum_version = version
    sp, cp = pipes(contexts, "compiled", kind)
    cp.open(sp.seal(b"hello"))  # (the ticket arrives ahead of the data)
    sess = cp.session()
    assert sess is not None
    assert type(sess) is (ssl.SSLSession if kind == "pure" else _tlsio.Session)
    for _ in range(3):
        srv, cli = handshake(contexts, session=sess)
        assert cli[0].session_reused and srv[0].session_reused
        assert cli[0].getpeercert(binary_form=True)  # (the server's certificate is kept)
        # the connection ends without a close_notify: OpenSSL marks its session
        sp2, cp2 = KINDS["compiled"](*srv), KINDS[kind](*cli)
        assert cp2.open(sp2.seal(b"x")) == b"x"
        del sp2, cp2, srv, cli
    if kind == "compiled":
        assert sess.resumable
    off = _tlsio.Session()  # (an empty one is never offered)
    assert not off.resumable
    _, cli = handshake(contexts)
    assert not tlspipe.offer_session(cli[0], off)


def test_bind_finds_pythons_openssl():
    assert _tlsio.bind() is None
    assert tlspipe.compiled_unavailable() in (None, "ICAFAST_PURE_PYTHON is set")


def test_compiled_pipe_refuses_what_is_not_a_memory_bio_connection(contexts):
    (s, si, so), _ = handshake(contexts)
    with pytest.raises(RuntimeError, match="unavailable"):
        _tlsio.TLSPipe(s, so, si)  # (the BIOs swapped: not the SSL object's own)
    with pytest.raises(RuntimeError, match="unavailable"):
        _tlsio.TLSPipe(object(), si, so)
    with pytest.raises(RuntimeError, match="unavailable"):
        _tlsio.TLSPipe(s, si, bytearray(8))


@pytest.mark.parametrize("server_kind", KINDS)
@pytest.mark.parametrize("client_kind", KINDS)
@settings(max_examples=25, deadline=None)
@given(messages=st.lists(st.binary(max_size=40_000), min_size=1, max_size=6),
       cuts=st.lists(st.integers(1, 70_000), min_size=1, max_size=8),
       as_list=st.booleans())
def test_records_open_on_the_other_kind_however_cut(contexts, server_kind, client_kind,
                                                    messages, cuts, as_list):
    for sender, receiver in ((0, 1), (1, 0)):
        ends = pipes(contexts, server_kind, client_kind)
        a, b = ends[sender], ends[receiver]
        # one seal per message, or all of them in one seal (a burst of frames)
        wire = a.seal(list(messages)) if as_list else b"".join(a.seal(m) for m in messages)
        got, i, k = [], 0, 0
        while i < len(wire):
            n = cuts[k % len(cuts)]
            got.append(b.open(wire[i:i + n]))
            i, k = i + n, k + 1
        assert b"".join(got) == b"".join(messages)
        assert b.open(b"") == b"" and not b.peer_closed


@settings(max_examples=30, deadline=None)
@given(bufs=st.lists(st.binary(max_size=50_000), max_size=8))
def test_both_kinds_cut_a_stream_into_the_same_records(contexts, bufs):
    """Small buffers share a record, large ones are cut into full 16 KiB records: the
    ciphertext lengths of the two kinds are the same (same cipher suite, same records)."""
    c, _ = pipes(contexts, "compiled", "compiled")
    p, _ = pipes(contexts, "pure", "pure")
    assert len(c.seal(list(bufs))) == len(p.seal(list(bufs)))


def test_small_buffers_become_one_record(contexts):
    for kind in KINDS:
        a, b = pipes(contexts, kind, kind)
        first = a.seal(b"x" * 100)
        joined = a.seal([b"h" * 30, memoryview(b"p" * 60), bytearray(10)])
        assert len(joined) == len(first)  # one record, not three
        assert b.open(first + joined) == b"x" * 100 + b"h" * 30 + b"p" * 60 + bytes(10)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("kinds", [("compiled", "pure"), ("pure", "compiled")])
def test_close_notify_and_a_bad_record(contexts, version, kinds):
    a, b = pipes(contexts, *kinds, version=version)
    data = os.urandom(3000)
    assert b.open(a.seal(data)) == data
    bad = bytearray(a.seal(b"y" * 500))
    bad[-3] ^= 1  # (the record's authentication tag)
    with pytest.raises(ssl.SSLError):
        b.open(bytes(bad))
    a2, b2 = pipes(contexts, *kinds, version=version)
    assert b2.open(a2.seal(b"last") + a2.close()) == b"last"
    assert b2.peer_closed


def test_post_handshake_messages_reach_the_peer(contexts):
    """TLS 1.3 servers send session tickets after the handshake: they come out of the pipe's
    ``output`` and the client consumes them without any plaintext."""
    for kind in KINDS:
        srv, cli = pipes(contexts, kind, kind)
        tickets = srv.output()
        assert cli.open(tickets) == b""
        assert cli.open(srv.seal(b"after")) == b"after"


def test_no_compiled_pipe_without_a_matching_openssl():
    """bind() refuses an OpenSSL that is not Python's: checked in a child process whose
    OpenSSL_version_num cannot be faked, so here the refusal path through the version gate."""
    code = ("import sys; sys.version_info = (3, 99, 0, 'final', 0)\n"
            "from icafast import _tlsio\n"
            "print(_tlsio.bind())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "layout unknown" in out.stdout


def _client_done_first(contexts):
    """A TLS 1.3 handshake up to the client's end: its Finished still waits in ``co``."""
    sctx, cctx = contexts
    si, so, ci, co = (ssl.MemoryBIO() for _ in range(4))
    s = sctx.wrap_bio(si, so, server_side=True)
    c = cctx.wrap_bio(ci, co, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        c.do_handshake()  # ClientHello
    si.write(co.read())
    with pytest.raises(ssl.SSLWantReadError):
        s.do_handshake()  # ServerHello ... Finished
    ci.write(so.read())
    c.do_handshake()
    assert co.pending
    return (s, si, so), (c, ci, co)


@pytest.mark.parametrize("server_kind", KINDS)
def test_records_that_came_with_the_last_handshake_flight(contexts, server_kind):
    """The client finishes its handshake first and may send data at once: those records reach
    the server in the same read as the client's Finished, before the server's pipe exists."""
    (s, si, so), (c, ci, co) = _client_done_first(contexts)
    client = KINDS["compiled"](c, ci, co)
    si.write(client.output() + client.seal(b"early bird"))  # one read: Finished + data
    s.do_handshake()
    server = KINDS[server_kind](s, si, so)
    assert server.open(b"") == b"early bird"
    assert client.open(server.seal(b"reply")) == b"reply"


def test_the_ssl_object_outlives_its_pipe(contexts):
    """The pipe gives the connection BIOs of its own; the SSLObject still answers questions
    about the connection, during the pipe's life and after it is gone."""
    (s, si, so), (c, ci, co) = handshake(contexts)
    a, b = _tlsio.TLSPipe(s, si, so), _tlsio.TLSPipe(c, ci, co)
    assert b.open(a.seal(b"x")) == b"x"
    assert s.version() == c.version() and s.cipher() == c.cipher()
    del a, b
    import gc

    gc.collect()
    assert c.getpeercert(binary_form=True)
    assert s.version() in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize("kind", KINDS)
def test_send_and_what_open_owes_go_to_the_sink(contexts, kind):
    """``send`` seals into the attached sink; ``open`` writes there what is owed the peer (here
    the client's Finished, still unsent when the pipe took over)."""
    (s, si, so), (c, ci, co) = _client_done_first(contexts)
    client = KINDS[kind](c, ci, co)
    wire: list[bytes] = []
    client.attach(wire.append)
    assert client.open(b"") == b"" and len(wire) == 1  # the Finished
    client.send([b"one ", memoryview(b"two")])
    si.write(b"".join(wire))
    s.do_handshake()
    server = KINDS["pure" if kind == "compiled" else "compiled"](s, si, so)
    assert server.open(b"") == b"one two"
    client.open(server.output())  # (session tickets: nothing owed)
    assert len(wire) == 2


def test_idle_frees_the_record_buffers_only_when_nothing_is_held(contexts):
    """The compiled pipe keeps OpenSSL's record buffers between records (Python's ssl has it
    free them after each one); ``idle()`` frees them, unless half a record waits in them."""
    a, b = pipes(contexts, "compiled", "compiled")
    wire = a.seal(b"z" * 5000)
    assert b.open(wire[:100]) == b""  # half a record, held by OpenSSL
    assert b.idle() is False
    assert b.open(wire[100:]) == b"z" * 5000
    assert b.idle() is True and a.idle() is True
    assert b.open(a.seal(b"again")) == b"again"  # (the buffers come back as needed)
    p, q = pipes(contexts, "pure", "pure")
    assert p.idle() is True and q.open(p.seal(b"pure")) == b"pure"


def _leave_an_openssl_error() -> bool:
    """Push an error onto this thread's OpenSSL error queue, as careless code using the same
    OpenSSL might leave it; False where the library has no function to do it with."""
    import _ssl
    import ctypes

    lib = ctypes.CDLL(_ssl.__file__)
    if hasattr(lib, "ERR_new") and hasattr(lib, "ERR_set_error"):  # OpenSSL 3
        lib.ERR_new()
        lib.ERR_set_error(20, 101, None)  # (ERR_LIB_SSL, any reason)
        return True
    if hasattr(lib, "ERR_put_error"):  # OpenSSL 1.1.1
        lib.ERR_put_error(20, 0, 101, b"test", 1)
        return True
    return False


def test_an_error_someone_else_left_in_openssls_queue_is_not_taken_for_ours(contexts):
    """The pipe does not clear OpenSSL's per-thread error queue before each call; an error
    left there by other code must not make a read that merely waits for more look failed.
    (OpenSSL 3.0's SSL_read drops such an error itself, so there this holds the library to
    it; where a library keeps it, the pipe's failure path takes it out and asks again.)"""
    a, b = pipes(contexts, "compiled", "compiled")
    wire = a.seal(b"q" * 3000)
    if not _leave_an_openssl_error():
        pytest.skip("this OpenSSL has no ERR_new/ERR_put_error to leave an error with")
    assert b.open(wire[:50]) == b""  # half a record: SSL_read wants more
    assert b.open(wire[50:]) == b"q" * 3000
    assert ssl.RAND_status()  # (and the queue is usable by Python's ssl afterwards)
    bad = bytearray(a.seal(b"r" * 100))
    bad[-1] ^= 1
    with pytest.raises(ssl.SSLError, match="TLS record rejected"):
        b.open(bytes(bad))  # a real error is still one


@pytest.mark.parametrize("kind", KINDS)
def test_lone_control_messages_free_the_buffers_and_traffic_goes_on(contexts, kind):
    """With ``quiet_max`` set (a link sets its frame header size), a record of that little
    plaintext frees the record buffers after it; what follows still flows, in both ways."""
    a, b = pipes(contexts, kind, kind)
    a.quiet_max = b.quiet_max = 28
    for size in (28, 5000, 1, 28, 40_000, 28):
        msg = os.urandom(size)
        assert b.open(a.seal(msg)) == msg
        assert a.open(b.seal(msg)) == msg
    wire = a.seal(b"k" * 28)
    assert b.open(wire[:10]) == b"" and b.open(wire[10:]) == b"k" * 28  # (split: held, then freed)


@pytest.mark.parametrize("spare", [True, False])
def test_a_resumption_gets_a_new_ticket_only_where_the_server_does_not_spare_it(tmp_path, spare):
    """``tls.server_context`` sends a ticket after a full handshake and none after a resumption
    with a young ticket (the client offers that one again, and it still resumes); OpenSSL's
    default, kept where ``spare_tickets`` is not set, sends one after every resumption, as
    ``server_context`` does where the compiled module cannot run (``ICAFAST_PURE_PYTHON=1``)."""
    cert, key, _ = tls.ensure_self_signed(str(tmp_path))
    spared = spare and tlspipe.compiled_unavailable() is None
    if spare:
        sctx = tls.server_context(cert, key)
    else:
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(cert, key)
        sctx.num_tickets = 1
    ctxs = (sctx, tls.client_context(ca=cert).context)
    srv, cli = handshake(ctxs)
    assert cli[1].pending  # the full handshake's ticket, waiting for the client to read it
    sp, cp = KINDS["compiled"](*srv), KINDS["compiled"](*cli)
    assert cp.open(sp.seal(b"x")) == b"x"
    sess = cp.session()
    for _ in range(3):
        srv, cli = handshake(ctxs, session=sess)
        assert srv[0].session_reused and cli[0].session_reused
        assert bool(cli[1].pending) is not spared  # a new ticket after the resumption, or none
        sp, cp = KINDS["compiled"](*srv), KINDS["compiled"](*cli)
        assert cp.open(sp.seal(b"y")) == b"y"
        sess = cp.session()  # (the same ticket again where none came)


def test_ticket_decisions():
    """What the spared server does with an offered ticket: OpenSSL's SSL_TICKET_STATUS in
    (its own TLS 1.3 tickets come as SUCCESS_RENEW), SSL_TICKET_RETURN out."""
    success, success_renew, empty, no_decrypt = 5, 6, 3, 4
    use, use_renew, ignore_renew = 3, 4, 2
    for status in (success, success_renew):
        assert _tlsio.ticket_decision(status, 0, 7200) == use
        assert _tlsio.ticket_decision(status, 3599, 7200) == use
        assert _tlsio.ticket_decision(status, 3600, 7200) == use_renew  # half its life: renew
        assert _tlsio.ticket_decision(status, 9000, 7200) == use_renew
        assert _tlsio.ticket_decision(status, -5, 7200) == use_renew  # (the clock went back)
        assert _tlsio.ticket_decision(status, 0, 0) == use_renew
    for status in (empty, no_decrypt):  # a full handshake, with a ticket after it
        assert _tlsio.ticket_decision(status, -1, 0) == ignore_renew
    assert not _tlsio.spare_tickets(object())


def test_ticket_keys_carried_to_a_new_context_open_the_tickets_of_the_one_before(
        tmp_path, monkeypatch):
    """A new server context (a certificate reloaded, the process an upgrade hands over to)
    has new ticket keys and cannot open the tickets of the one before: its clients would make
    full handshakes. Given that one's keys (``tls.export_ticket_keys`` /
    ``import_ticket_keys``), it resumes them; but only where it lets in the same clients (a
    resumption shows no certificate): not after client certificates stop or start being
    required, nor under another client CA. Keys that are not keys change nothing, and where
    the compiled module cannot run there are none to carry."""
    monkeypatch.delenv("ICAFAST_PURE_PYTHON", raising=False)
    cert, key, _ = tls.ensure_self_signed(str(tmp_path / "a"))
    other, _, _ = tls.ensure_self_signed(str(tmp_path / "b"))
    cctx = tls.client_context(ca=cert).context
    first = tls.server_context(cert, key)
    srv, cli = handshake((first, cctx))
    sp, cp = KINDS["compiled"](*srv), KINDS["compiled"](*cli)
    assert cp.open(sp.seal(b"x")) == b"x"  # (the ticket arrives)
    sess = cp.session()

    def resumes(sctx: ssl.SSLContext) -> bool:
        srv, cli = handshake((sctx, cctx), session=sess)
        assert srv[0].session_reused == cli[0].session_reused
        return bool(srv[0].session_reused)

    assert resumes(first)
    keys = tls.export_ticket_keys(first)
    assert keys is not None and len(bytes.fromhex(keys["keys"])) == 80
    nxt = tls.server_context(cert, key)
    assert _tlsio.ticket_keys(nxt) != _tlsio.ticket_keys(first)
    assert not resumes(nxt)  # (its own keys: a full handshake)
    assert tls.import_ticket_keys(nxt, keys)
    assert _tlsio.ticket_keys(nxt) == _tlsio.ticket_keys(first)
    assert resumes(nxt)
    # not keys: refused, and the keys stay as they were
    for bad in (None, {}, {"scope": keys["scope"]}, {**keys, "keys": "zz"},
                {**keys, "keys": keys["keys"][:-2]}, {**keys, "keys": keys["keys"] + "00"}):
        assert not tls.import_ticket_keys(nxt, bad), bad
    assert _tlsio.ticket_keys(nxt) == _tlsio.ticket_keys(first)
    assert not _tlsio.set_ticket_keys(object(), b"\0" * 80)
    assert _tlsio.ticket_keys(object()) is None
    # client certificates: the keys go only where the same CAs are required
    required = tls.export_ticket_keys(tls.server_context(cert, key, client_ca=cert))
    assert required is not None and required["scope"] != keys["scope"]
    for elsewhere in (tls.server_context(cert, key),
                      tls.server_context(cert, key, client_ca=other)):
        before = _tlsio.ticket_keys(elsewhere)
        assert not tls.import_ticket_keys(elsewhere, required)
        assert _tlsio.ticket_keys(elsewhere) == before
    assert not tls.import_ticket_keys(tls.server_context(cert, key, client_ca=cert), keys)
    assert tls.import_ticket_keys(tls.server_context(cert, key, client_ca=cert), required)
    # the client CA file compared whole (any certificate in it, of any kind, may let a client
    # in): the same file with one more certificate is another scope
    both = tmp_path / "both.pem"
    both.write_bytes(Path(cert).read_bytes() + Path(other).read_bytes())
    assert not tls.import_ticket_keys(tls.server_context(cert, key, client_ca=str(both)),
                                      required)
    # a context that checks clients in a way not known (not made by server_context, or
    # changed since): its keys are neither given nor taken
    own = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    own.load_cert_chain(cert, key)
    assert tls.export_ticket_keys(own) is not None  # (it checks no client: the default)
    own.load_verify_locations(cert)
    own.verify_mode = ssl.CERT_REQUIRED
    changed = tls.server_context(cert, key)
    changed.verify_mode = ssl.CERT_OPTIONAL
    for unknown in (own, changed):
        assert tls.ticket_scope(unknown) is None and tls.export_ticket_keys(unknown) is None
        assert not tls.import_ticket_keys(unknown, keys)
    # a client CA file rewritten while it was loaded: what was loaded cannot be told
    load = tls._load_verify_locations

    def rewritten(ctx: ssl.SSLContext, ca: str) -> None:
        load(ctx, ca)
        Path(ca).write_bytes(Path(other).read_bytes())

    monkeypatch.setattr(tls, "_load_verify_locations", rewritten)
    moving = tmp_path / "moving.pem"
    moving.write_bytes(Path(cert).read_bytes())
    racing = tls.server_context(cert, key, client_ca=str(moving))
    assert tls.ticket_scope(racing) is None and tls.export_ticket_keys(racing) is None
    monkeypatch.setattr(tls, "_load_verify_locations", load)
    monkeypatch.setenv("ICAFAST_PURE_PYTHON", "1")  # (Python's ssl cannot reach them)
    assert tls.export_ticket_keys(first) is None
    assert not tls.import_ticket_keys(tls.server_context(cert, key), keys)


def test_renewed_ticket_keys_open_no_ticket_sealed_before(tmp_path, monkeypatch):
    """``tls.renew_ticket_keys`` gives a server context new keys, made at random: a ticket
    sealed before no longer resumes (a full handshake, which brings a ticket sealed with the
    new keys, and that one resumes). The age given to ``export_ticket_keys`` goes with the
    keys. Where the compiled module cannot run, nothing is renewed."""
    monkeypatch.delenv("ICAFAST_PURE_PYTHON", raising=False)
    cert, key, _ = tls.ensure_self_signed(str(tmp_path))
    cctx = tls.client_context(ca=cert).context
    sctx = tls.server_context(cert, key)

    def ticket(session: Any = None) -> tuple[Any, bool]:
        """A link's ticket (what its client would offer next), and whether it resumed."""
        srv, cli = handshake((sctx, cctx), session=session)
        sp, cp = KINDS["compiled"](*srv), KINDS["compiled"](*cli)
        assert cp.open(sp.seal(b"x")) == b"x"  # (the ticket arrives)
        assert srv[0].session_reused == cli[0].session_reused
        return cp.session() or session, bool(srv[0].session_reused)

    old, _ = ticket()
    assert ticket(old)[1]
    before = _tlsio.ticket_keys(sctx)
    assert tls.renew_ticket_keys(sctx)
    after = _tlsio.ticket_keys(sctx)
    assert after is not None and before is not None and len(after) == len(before) == 80
    assert after != before and after[:16] != before[:16]  # (the key name too)
    new, reused = ticket(old)
    assert not reused  # (sealed with the keys of before)
    assert ticket(new)[1]
    doc = tls.export_ticket_keys(sctx, 12.5)
    assert doc is not None and doc["age"] == 12.5 and bytes.fromhex(doc["keys"]) == after
    assert "age" not in tls.export_ticket_keys(sctx)
    monkeypatch.setenv("ICAFAST_PURE_PYTHON", "1")
    assert not tls.renew_ticket_keys(sctx)
    assert _tlsio.ticket_keys(sctx) == after


@pytest.mark.parametrize("kind", KINDS)
def test_a_fatal_alert_from_the_peer_is_an_error_not_a_close_notify(tmp_path, kind):
    """A TLS 1.3 client ends its handshake before the server has checked its certificate:
    the server's refusal (a certificate_required alert, when the client gave none) arrives as
    the first record the pipe opens. The compiled pipe took that alert, whose error it takes
    out of OpenSSL's queue before asking again what the read came to, for a close_notify
    (OpenSSL marks the connection shut either way), and the client logged "connection closed
    by peer (TLS close_notify)" instead of why the server refused it."""
    cert, key, _ = tls.ensure_self_signed(str(tmp_path))
    sctx = tls.server_context(cert, key, client_ca=cert)
    cctx = tls.client_context(insecure=True).context
    si, so, ci, co = (ssl.MemoryBIO() for _ in range(4))
    s = sctx.wrap_bio(si, so, server_side=True)
    c = cctx.wrap_bio(ci, co, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        c.do_handshake()
    si.write(co.read())
    with pytest.raises(ssl.SSLWantReadError):
        s.do_handshake()
    ci.write(so.read())
    c.do_handshake()  # (done: TLS 1.3)
    assert c.version() == "TLSv1.3"
    si.write(co.read())
    with pytest.raises(ssl.SSLError, match="PEER_DID_NOT_RETURN_A_CERTIFICATE"):
        s.do_handshake()
    alert = so.read()
    assert alert
    pipe = KINDS[kind](c, ci, co)
    with pytest.raises(ssl.SSLError, match="alert certificate required"):
        pipe.open(alert)
    assert not pipe.peer_closed


def _expiring_client(tmp_path, seconds: float):
    """A client certificate (and its key) that expires in ``seconds``: (cert, key, end)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")])
    pkey = ec.generate_private_key(ec.SECP256R1())
    ends = now + datetime.timedelta(seconds=seconds)
    ccert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
             .public_key(pkey.public_key()).serial_number(1)
             .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(ends)
             .sign(pkey, hashes.SHA256()))
    cpath, kpath = tmp_path / "c.pem", tmp_path / "k.pem"
    cpath.write_bytes(ccert.public_bytes(serialization.Encoding.PEM))
    kpath.write_bytes(pkey.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    return str(cpath), str(kpath), ends


def _until(end) -> None:
    """Sleep until just past the datetime ``end`` (a certificate's end: whole seconds)."""
    import datetime
    import time

    time.sleep(max(0.0, (end - datetime.datetime.now(datetime.timezone.utc)).total_seconds())
               + 1.1)


@pytest.mark.skipif(tlspipe.compiled_unavailable() is not None,
                    reason="the ticket callback needs the compiled module")
def test_a_client_certificate_that_expired_cannot_resume(tmp_path):
    """A TLS 1.3 resumption shows no certificate: a client whose certificate had expired
    since its full handshake resumed with its ticket and was let in (a new connection
    without the ticket was refused "certificate has expired"), and every resumption past half
    the ticket's lifetime renewed it, so that it could go on. The server now makes a full
    handshake of such a resumption, which checks the certificate and refuses it."""
    cert, key, _ = tls.ensure_self_signed(str(tmp_path / "srv"))
    cpath, kpath, ends = _expiring_client(tmp_path, 2)
    ctxs = (tls.server_context(cert, key, client_ca=cpath),
            tls.client_context(ca=cert, cert=cpath, key=kpath).context)
    srv, cli = handshake(ctxs)
    sp, cp = KINDS["compiled"](*srv), KINDS["compiled"](*cli)
    assert cp.open(sp.seal(b"x")) == b"x"
    sess = cp.session()
    srv, cli = handshake(ctxs, session=sess)  # (still valid: resumed)
    assert srv[0].session_reused
    _until(ends)
    with pytest.raises(ssl.SSLError, match="certificate has expired"):
        handshake(ctxs, session=sess)  # a full handshake, which refuses it


def test_without_the_ticket_callback_client_certificates_get_no_tickets(tmp_path,
                                                                       monkeypatch):
    """Where the compiled module cannot run (so neither the ticket callback that refuses to
    resume an expired client certificate's session), a server that requires client
    certificates issued TLS 1.3 tickets all the same: a client whose certificate had expired
    since its full handshake resumed with its ticket, and OpenSSL renewed the ticket on each
    resumption, so it could go on for good. Such a server now issues no ticket: every link
    makes a full handshake, which checks the certificate. A server without client
    certificates still issues them."""
    monkeypatch.setattr(tlspipe, "compiled_unavailable", lambda: "not here (test)")
    cert, key, _ = tls.ensure_self_signed(str(tmp_path / "srv"))
    assert tls.server_context(cert, key).num_tickets == 1
    cpath, kpath, ends = _expiring_client(tmp_path, 2)
    ctxs = (tls.server_context(cert, key, client_ca=cpath),
            tls.client_context(ca=cert, cert=cpath, key=kpath).context)
    assert ctxs[0].num_tickets == 0
    srv, cli = handshake(ctxs)
    sp, cp = KINDS["pure"](*srv), KINDS["pure"](*cli)
    assert cp.open(sp.seal(b"x")) == b"x"
    assert cli[0].version() == "TLSv1.3" and cp.session() is None  # (no ticket to offer)
    sess = cli[0].session  # (a session without a ticket: offered, it cannot resume)
    _until(ends)
    with pytest.raises(ssl.SSLError, match="certificate has expired"):
        handshake(ctxs, session=sess)
