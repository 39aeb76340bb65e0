"""TLS on the client<->server link: default-on, verification, pinning, client certificates."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import logging
import os
import re
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from relay_helpers import (
    FAST,
    Backend,
    Setup,
    Stats,
    free_port,
    links_up,
    looking_tls_client,
    needs_tls_pipe,
    presented_fingerprint,
    read_until_closed,
    recv_stream,
    run_async,
    send_stream,
    wait_for,
)

from icafast import IMPLEMENTATION, tls
from icafast import events as ev
from icafast.aio import Mapping, RelayServer, open_session
from icafast.tlspipe import uses_pipe

PY = sys.executable


def _make_ca(tmp, name: str = "test CA"):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))

    def issue(cn: str, sans: list, fname: str, client: bool = False):
        k = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(subject).public_key(k.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(days=1)))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        c = b.sign(key, hashes.SHA256())
        cp, kp = tmp / f"{fname}.crt", tmp / f"{fname}.key"
        cp.write_bytes(c.public_bytes(serialization.Encoding.PEM))
        kp.write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        return str(cp), str(kp)

    ca_path = tmp / f"{name.replace(' ', '_')}.crt"
    ca_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(ca_path), issue


def test_self_signed_certificate_created_once(tmp_path):
    cert, key, created = tls.ensure_self_signed(str(tmp_path / "state"))
    assert created and os.stat(key).st_mode & 0o777 == 0o600
    cert2, key2, created2 = tls.ensure_self_signed(str(tmp_path / "state"))
    assert (cert2, key2, created2) == (cert, key, False)
    fp = tls.fingerprint_of_pem(cert)
    assert len(fp) == 64
    assert tls.normalize_fingerprint(tls.pretty_fingerprint(fp)) == fp
    for text in (fp.upper(), f"SHA256:{fp}", f"sha256:{tls.pretty_fingerprint(fp)}",
                 f"sha256 Fingerprint={tls.pretty_fingerprint(fp)}\n"):  # (openssl x509's)
        assert tls.normalize_fingerprint(text) == fp, text
    with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
        tls.normalize_fingerprint(f"sha1 Fingerprint={tls.pretty_fingerprint(fp)[:59]}")


def test_self_signed_key_is_private_whatever_was_there(tmp_path, caplog):
    """The key was written through a fixed "server-key.pem.tmp", opened without O_EXCL: one
    left there (by a crash, or made by another user in a shared directory) kept its mode, and
    the server's new private key was readable by everyone (0644), or written where a link
    there led. A key made readable by others since is made private again, with a warning."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    for name in ("server-key.pem.tmp", "server-cert.pem.tmp"):
        (state / name).write_text("")
        os.chmod(state / name, 0o644)
    outside = tmp_path / "outside"
    outside.write_text("")
    os.chmod(outside, 0o644)
    (state / ".server-key.pem.x.tmp").symlink_to(outside)
    cert, key, created = tls.ensure_self_signed(str(state))
    assert created and os.stat(key).st_mode & 0o777 == 0o600
    assert outside.read_text() == ""
    assert sorted(p.name for p in state.iterdir() if p.suffix == ".pem") == [
        "server-cert.pem", "server-key.pem"]
    os.chmod(key, 0o644)
    with caplog.at_level("WARNING", logger="icafast"):
        assert tls.ensure_self_signed(str(state)) == (cert, key, False)
    assert os.stat(key).st_mode & 0o777 == 0o600
    assert "readable by others (mode 0644)" in caplog.text


def _serve_args(*argv: str):
    from icafast import cli

    return cli.build_parser().parse_args(["serve", *argv])


def test_the_self_signed_pair_is_loaded_once(tmp_path, monkeypatch):
    """serve loaded the self-signed pair twice at start: once alone (so that its error named
    the self-signed files, not --tls-cert/--tls-key) and again for the server's context. It is
    loaded once, and its error still names the files; an error that is not the pair's (an
    SSLKEYLOGFILE that cannot be written) is not blamed on them."""
    from icafast import cli

    state = tmp_path / "state"
    tls.ensure_self_signed(str(state))
    loads: list[tuple[str, str | None]] = []
    real = tls._load_cert_chain

    def counted(ctx, cert, key):
        loads.append((cert, key))
        real(ctx, cert, key)

    monkeypatch.setattr(tls, "_load_cert_chain", counted)
    ctx = cli._server_tls(_serve_args("--state-dir", str(state)), {})
    assert ctx is not None and loads == [(str(state / "server-cert.pem"),
                                          str(state / "server-key.pem"))]
    monkeypatch.setenv("SSLKEYLOGFILE", str(tmp_path / "nowhere" / "keys.log"))
    with pytest.raises(FileNotFoundError):
        cli._server_tls(_serve_args("--state-dir", str(state)), {})
    monkeypatch.delenv("SSLKEYLOGFILE")
    key = state / "server-key.pem"
    key.write_text(key.read_text()[:50])
    with pytest.raises(ValueError, match=f"the self-signed certificate {state}/server-cert.pem "
                       f"and its key {key} do not load"):
        cli._server_tls(_serve_args("--state-dir", str(state)), {})


def test_a_self_signed_key_readable_by_others_is_said_once(tmp_path, monkeypatch, caplog):
    """A self-signed key that others may read, and that could not be made private (a key the
    server does not own), was warned of twice: by the state directory's check ("could not be
    made private") and again as if it were a --tls-key ("can be read by every user ... chmod
    o-r"). The second applies to a --tls-key only."""
    from icafast import cli

    state = tmp_path / "state"
    cert, key, _ = tls.ensure_self_signed(str(state))
    os.chmod(key, 0o644)

    def refused(path, mode, *args, **kw):
        raise PermissionError(1, "Operation not permitted", path)

    with monkeypatch.context() as m, caplog.at_level("WARNING", logger="icafast"):
        m.setattr(os, "chmod", refused)
        cli._server_tls(_serve_args("--state-dir", str(state)), {})
    said = [r.getMessage() for r in caplog.records if key in r.getMessage()]
    assert len(said) == 1 and "it could not be made private" in said[0], said
    caplog.clear()
    with caplog.at_level("WARNING", logger="icafast"):  # (a --tls-key: said as such)
        cli._server_tls(_serve_args("--tls-cert", cert, "--tls-key", key), {})
    said = [r.getMessage() for r in caplog.records if key in r.getMessage()]
    assert said == [f"TLS: the private key {key} can be read by every user of this machine "
                    f"(chmod o-r {key})"], said


@pytest.mark.parametrize("lost", ["server-key.pem", "server-cert.pem"])
def test_self_signed_half_pair_is_refused_not_replaced(tmp_path, lost):
    """With one of its two files gone (removed, or a crash between the two renames), a new
    certificate was made without a word above INFO: a new fingerprint, which every client
    pinned to the old one refuses. The server now says which file is missing and does not
    touch the other."""
    state = tmp_path / "state"
    cert, key, _ = tls.ensure_self_signed(str(state))
    kept = {p.name: p.read_bytes() for p in state.iterdir()}
    (state / lost).unlink()
    with pytest.raises(FileNotFoundError, match=f"is there without {re.escape(str(state / lost))}"
                                                ": a new self-signed certificate would have"):
        tls.ensure_self_signed(str(state))
    assert {p.name: p.read_bytes() for p in state.iterdir()} == {
        k: v for k, v in kept.items() if k != lost}


def test_self_signed_state_dir_others_can_write_is_refused(tmp_path):
    """Another user who can write the state directory can put a key of theirs (and its
    certificate) there, before the first start or in place of the server's, and impersonate
    the server to clients pinned to it; such a directory was used as it was."""
    state = tmp_path / "state"
    state.mkdir()
    for mode in (0o777, 0o1777, 0o770):
        os.chmod(state, mode)
        with pytest.raises(PermissionError, match=f"is writable by other users \\(mode {mode:04o}"):
            tls.ensure_self_signed(str(state))
        assert not list(state.iterdir())
    os.chmod(state, 0o755)
    assert tls.ensure_self_signed(str(state))[2]


def _start_sharing(state: str, barrier, results) -> None:
    barrier.wait()
    try:
        cert, key, _ = tls.ensure_self_signed(state)
        tls.server_context(cert, key)
        results.put(tls.fingerprint_of_pem(cert))
    except Exception as e:  # (reported to the test)
        results.put(repr(e))


def test_servers_sharing_a_state_dir_make_one_pair(tmp_path):
    """Servers that share the state directory (the default one, /var/lib/icafast as root) and
    start together each made a pair: each printed a fingerprint of its own, the files renamed
    last made a pair that did not match (KEY_VALUES_MISMATCH at the next start), and clients
    pinned to what a server printed were refused after its restart."""
    import multiprocessing

    mp = multiprocessing.get_context("fork")
    for trial in range(2):
        state = str(tmp_path / f"state{trial}")
        barrier, results = mp.Barrier(6), mp.Queue()
        procs = [mp.Process(target=_start_sharing, args=(state, barrier, results))
                 for _ in range(6)]
        for p in procs:
            p.start()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(10)
        assert set(got) == {tls.fingerprint_of_pem(os.path.join(state, "server-cert.pem"))}


def test_a_key_log_file_is_said(tmp_path, monkeypatch, caplog):
    """SSLKEYLOGFILE (a debugging aid, honoured as Python's default contexts do) makes every
    link's keys go to that file; a server or client that inherited it said nothing."""
    cert, key, _ = tls.ensure_self_signed(str(tmp_path / "state"))
    log = tmp_path / "keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(log))
    with caplog.at_level("WARNING", logger="icafast"):
        assert tls.server_context(cert, key).keylog_filename == str(log)
        tls.client_context(insecure=True)
    assert caplog.text.count(f"the keys of every link are written to {log}") == 2
    monkeypatch.delenv("SSLKEYLOGFILE")
    caplog.clear()
    with caplog.at_level("WARNING", logger="icafast"):
        assert tls.server_context(cert, key).keylog_filename is None
    assert not caplog.text


def test_an_existing_pair_needs_no_write_to_its_directory(tmp_path, monkeypatch):
    """A pair kept where the server may only read (a read-only volume, root's directory read
    by a server run as another user) is used without creating anything there."""
    state = tmp_path / "state"
    made = tls.ensure_self_signed(str(state))
    real_open = os.open

    def read_only(path, flags, *args, **kw):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise PermissionError(13, "Read-only file system", path)
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", read_only)
    assert tls.ensure_self_signed(str(state)) == (made[0], made[1], False)


def test_fingerprint_is_the_first_certificate_s_wherever_it_starts(tmp_path):
    """A PEM file with text before its certificate ("Bag Attributes" from openssl pkcs12,
    openssl x509 -text's dump) loads in OpenSSL as the server's certificate; its fingerprint
    was refused ("Invalid PEM encoding"), and so was the server's start."""
    cert, key, _ = tls.ensure_self_signed(str(tmp_path / "state"))
    pem = Path(cert).read_text()
    prefixed = tmp_path / "bag.pem"
    prefixed.write_text("Bag Attributes\n    localKeyID: 01 02\nsubject=CN = x\n\n" + pem
                        + pem)
    assert tls.fingerprint_of_pem(str(prefixed)) == tls.fingerprint_of_pem(cert)
    tls.server_context(str(prefixed), key)
    with pytest.raises(ValueError, match=f"certificate file {re.escape(key)} holds no PEM "):
        tls.fingerprint_of_pem(key)


def _tls_start(*args: str) -> subprocess.CompletedProcess[str]:
    # (a new session: no controlling terminal, where OpenSSL would ask for a passphrase)
    return subprocess.run([PY, "-m", "icafast", *args], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL, start_new_session=True)


def test_tls_files_that_do_not_load_get_one_line_naming_the_file(tmp_path):
    """An encrypted key made OpenSSL ask for its passphrase on the terminal (a server started
    from one waited there; without one it failed with "[Errno 22] Invalid argument"); a file
    of the wrong kind got OpenSSL's message, which names no file."""
    from cryptography.hazmat.primitives import serialization

    cert, key, _ = tls.ensure_self_signed(str(tmp_path / "a"))
    other_cert, _, _ = tls.ensure_self_signed(str(tmp_path / "b"))
    pkey = serialization.load_pem_private_key(Path(key).read_bytes(), None)
    enc = tmp_path / "encrypted.pem"
    enc.write_bytes(pkey.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"secret")))
    serve = ["serve", "--listen", "127.0.0.1:0", "--control", str(tmp_path / "c.sock")]
    connect = ["connect", "--server", "127.0.0.1:2598"]
    cases = [
        (serve + ["--tls-cert", cert, "--tls-key", str(enc)],
         f"the private key in {enc} is encrypted: give one without a passphrase"),
        (connect + ["--tls-insecure", "--tls-client-cert", cert, "--tls-client-key", str(enc)],
         f"the private key in {enc} is encrypted: give one without a passphrase"),
        (serve + ["--tls-cert", key, "--tls-key", cert],
         f"certificate file {key} holds no PEM certificate"),
        (serve + ["--tls-cert", other_cert, "--tls-key", key],
         "--tls-key is not the private key of the certificate in --tls-cert"),
        (serve + ["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", key],
         f"CA file {key}: NO_CERTIFICATE_OR_CRL_FOUND"),
        (connect + ["--tls-ca", key], f"CA file {key}: NO_CERTIFICATE_OR_CRL_FOUND"),
        # (was "[Errno 20] Not a directory: ...", without saying what the path was for)
        (serve + ["--state-dir", f"{key}/state"],
         f"cannot keep the self-signed certificate in {key}/state (--state-dir): Not a "),
        # (the self-signed pair, damaged: named as what it is, not as --tls-cert/--tls-key)
        (serve + ["--state-dir", str(tmp_path / "damaged")],
         f"the self-signed certificate {tmp_path}/damaged/server-cert.pem and its key "
         f"{tmp_path}/damaged/server-key.pem do not load ("),
    ]
    _, damaged, _ = tls.ensure_self_signed(str(tmp_path / "damaged"))
    Path(damaged).write_text(Path(damaged).read_text()[:50])
    for args, message in cases:
        p = _tls_start(*args)
        assert p.returncode == 1, (args, p.returncode, p.stderr)
        (line,) = [t for t in p.stderr.splitlines() if " INFO " not in t
                   and "fingerprint:" not in t]
        assert message in line and line.startswith(f"icafast {args[0]}: TLS: "), (args, line)
        assert "pass phrase" not in p.stderr + p.stdout, p.stderr


def test_server_warns_of_a_certificate_out_of_its_dates(tmp_path):
    """An expired (or not yet valid) --tls-cert started without a word: every client that
    verifies it with --tls-ca was refused ("certificate has expired"), and only the clients'
    logs said why."""
    import socket

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    pkey = ec.generate_private_key(ec.SECP256R1())
    key = tmp_path / "k.pem"
    key.write_bytes(pkey.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server")])
    busy = socket.socket()  # (the server stops at its listen, after its TLS set-up)
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        for label, start, end, said in (
                ("expired", -10, -2, f"expired on {now - datetime.timedelta(days=2):%Y-%m-%d}"),
                ("future", 2, 10, "is not valid before "
                                  f"{now + datetime.timedelta(days=2):%Y-%m-%d}"),
                ("soon", -30, 3, f"expires on {now + datetime.timedelta(days=3):%Y-%m-%d}"),
                ("valid", -1, 15, None)):
            cert = tmp_path / f"{label}.pem"
            cert.write_bytes(
                x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(pkey.public_key()).serial_number(1)
                .not_valid_before(now + datetime.timedelta(days=start))
                .not_valid_after(now + datetime.timedelta(days=end))
                .sign(pkey, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
            p = _tls_start("serve", "--listen", f"127.0.0.1:{busy.getsockname()[1]}",
                           "--tls-cert", str(cert), "--tls-key", str(key),
                           "--control", str(tmp_path / "c.sock"))
            assert "cannot listen" in p.stderr, p.stderr
            # (and a client's own certificate, for servers with --tls-client-ca)
            c = _tls_start("connect", "--listen", f"127.0.0.1:{busy.getsockname()[1]}",
                           "--server", "127.0.0.1:9", "--tls-insecure", "--tls-client-cert",
                           str(cert), "--tls-client-key", str(key))
            assert "address already in use" in c.stderr.lower(), c.stderr
            refuse = "will refuse it then" if label == "soon" else "refuse it"
            if said is None:
                assert f"certificate in {cert}" not in p.stderr + c.stderr, p.stderr + c.stderr
            else:
                assert (f"WARNING TLS: the certificate in {cert} {said}" in p.stderr
                        and f"clients that verify it (--tls-ca) {refuse}" in p.stderr), p.stderr
                assert (f"WARNING TLS: the certificate in {cert} {said}" in c.stderr
                        and f"servers (--tls-client-ca) {refuse}" in c.stderr), c.stderr
            if label == "soon":  # (and how a renewed one is taken, with no restart)
                assert "UTC, in 2 days:" in p.stderr or "UTC, in 3 days:" in p.stderr, p.stderr
                assert "then send icafast serve SIGHUP" in p.stderr, p.stderr
                assert "new links load the renewed one, with no restart" in c.stderr, c.stderr
    finally:
        busy.close()


def test_how_soon_a_certificate_expires_is_said_in_days_then_hours(tmp_path):
    cert, _, _ = _pair(tmp_path)  # (valid for ten years from now)
    from cryptography import x509

    end = x509.load_pem_x509_certificate(Path(cert).read_bytes()).not_valid_after_utc
    assert tls.validity_problem(cert) is None
    for before, when in ((datetime.timedelta(days=13, hours=1), "in 13 days"),
                         (datetime.timedelta(days=1, hours=2), "in 1 day:"),
                         (datetime.timedelta(hours=5, minutes=7), "in 5 h 7 min")):
        said = tls.validity_problem(cert, now=end - before, renew="do this")
        assert said is not None and when in said and said.endswith("; do this"), said
    assert tls.validity_problem(cert, now=end - datetime.timedelta(days=15)) is None


def test_a_running_command_looks_at_its_certificate_s_dates_every_day(tmp_path,
                                                                      monkeypatch, caplog):
    """A server (or client) that runs for months is told that its certificate comes to its
    end, not only at start."""
    from icafast import cli

    cert, _, _ = _pair(tmp_path)
    from cryptography import x509

    end = x509.load_pem_x509_certificate(Path(cert).read_bytes()).not_valid_after_utc
    real = tls.validity_problem
    days_on = [0]

    def later(path, now=None, **kw):  # (each look: another ten days on towards the end)
        days_on[0] += 10
        return real(path, now=end - datetime.timedelta(days=25 - days_on[0]), **kw)

    monkeypatch.setattr(tls, "validity_problem", later)
    monkeypatch.setattr(cli, "DATES_CHECKED_EVERY", 0.01)

    async def main() -> None:
        task = asyncio.create_task(cli._every_day(lambda: cli._say_dates(cert, server=True)))
        for _ in range(500):  # (bounded: at most 5 s)
            if days_on[0] >= 30:
                break
            await asyncio.sleep(0.01)
        task.cancel()

    run_async("asyncio", main(), timeout=10)
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    # the first look, 15 days before the end, says nothing; the next, 5 days before, and
    # the third, 5 days after, do
    assert len(said) >= 2, said
    assert "expires on" in said[0] and ("in 4 days" in said[0] or "in 5 days" in said[0]), said
    assert "expired on" in said[1], said


def test_no_tls_with_an_option_that_secures_the_links_is_refused(tmp_path):
    """``--no-tls`` dropped a --tls-client-ca, --tls-cert or --tls-fingerprint given with it
    (on the command line or in the config file) without a word: a server an administrator
    meant to admit only clients with a certificate admitted anyone, in plain text."""
    cert, key, fp = _pair(tmp_path / "pki")
    serve = ["serve", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9", "--control",
             str(tmp_path / "c.sock"), "--no-tls"]
    connect = ["connect", "--listen", "127.0.0.1:0", "--server", "127.0.0.1:9", "--no-tls"]
    cfg = tmp_path / "icafast.toml"
    cfg.write_text(f'tls_client_ca = "{cert}"\n')
    for args, named in (
            (serve + ["--tls-client-ca", cert], "--tls-client-ca"),
            (serve + ["--tls-cert", cert, "--tls-key", key], "--tls-cert, --tls-key"),
            (serve + ["--config", str(cfg)], "--tls-client-ca"),
            (connect + ["--tls-fingerprint", fp], "--tls-fingerprint"),
            (connect + ["--tls-ca", cert], "--tls-ca"),
            (connect + ["--tls-client-cert", cert, "--tls-client-key", key],
             "--tls-client-cert, --tls-client-key")):
        p = _tls_start(*args)
        assert p.returncode == 1, (args, p.returncode, p.stderr)
        assert (f"icafast {args[0]}: TLS: --no-tls (plain-text links) leaves no use for "
                f"{named}: give one or the other") in p.stderr, (args, p.stderr)
        assert "listening on" not in p.stderr


def test_client_refuses_to_trust_nothing():
    with pytest.raises(ValueError, match="unverified"):
        tls.client_context()


def _pair(tmp_path):
    cert, key, _ = tls.ensure_self_signed(str(tmp_path))
    return cert, key, tls.fingerprint_of_pem(cert)


@pytest.mark.parametrize("tls_io", ["auto", "pure", "loop"])
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_pinned_fingerprint_session_survives_breaks(tmp_path, loop, tls_io, monkeypatch):
    """Both ways of running TLS: by the link through a pipe (compiled by default; ``pure``:
    the Python twin) and by the event loop's TLS transport (``loop``). The session ends
    cleanly: its last link lingers after CLOSE and is closed without a transport error
    (conftest's autouse fixture fails the test on one)."""
    monkeypatch.setenv("ICAFAST_TLS_IO", tls_io)
    piped = tls_io != "loop" and (tls_io == "pure" or uses_pipe())
    cert, key, fp = _pair(tmp_path)
    size = 8 * 1024 * 1024

    async def main() -> None:
        async with Setup(Backend("stream", size=size),
                         ssl=tls.server_context(cert, key)) as s:
            cev: list = []
            reader, writer = await s.client(events=cev,
                                            tls=tls.client_context(fingerprint=fp))
            app = Stats()
            done = asyncio.Event()

            async def breaker() -> None:
                for k in range(6):
                    assert await wait_for(lambda k=k: links_up(cev) == k + 1
                                          and s.proxy.live_connections > 0, 10)
                    if k == 0:  # frames leave in one TLS write per burst, not one per buffer
                        (runner,) = s.server.sessions_by_id.values()
                        assert await wait_for(lambda r=runner: r.link is not None, 10)
                        link = runner.link
                        if piped:  # (the pipe joins small buffers into records itself)
                            assert link.tls is not None and not link.join_writes
                            assert type(link.tls).__module__ == ("icafast.tlspipe" if
                                                                  tls_io == "pure" else
                                                                  "icafast._tlsio")
                        else:
                            assert link.tls is None and link.join_writes
                        assert link.ssl_object.version() in ("TLSv1.2", "TLSv1.3")
                    await asyncio.sleep(0.05)
                    (s.proxy.reset if k % 2 == 0 else s.proxy.blackhole)()
                done.set()

            await asyncio.gather(send_stream(writer, size, 1, app, gate=(size // 2, done)),
                                 recv_stream(reader, app), breaker())
            assert await wait_for(lambda: s.backend.closed == 1, 10)
            be = s.backend.conns[0]
            assert be.recv_hash.digest() == app.sent_hash.digest()
            assert be.sent_hash.digest() == app.recv_hash.digest()
            assert len(s.backend.conns) == 1
            assert sum(1 for e in cev if isinstance(e, ev.LinkUp) and e.resumed) >= 6
            writer.close()
            await asyncio.sleep(0.3)  # the lingering links see their peers close

    run_async(loop, main(), timeout=120)


@pytest.mark.parametrize("tls_io", ["auto", "pure", "loop"])
def test_corrupted_records_close_the_link_and_the_session_resumes(tmp_path, tls_io,
                                                                   monkeypatch):
    """A flipped byte in a TLS record: that link is closed with a logged reason, the session
    resumes on a new link with every byte delivered once and in order, and another session
    through the same server is not disturbed."""
    monkeypatch.setenv("ICAFAST_TLS_IO", tls_io)
    cert, key, fp = _pair(tmp_path)
    size = 4 * 1024 * 1024
    # The pure-Python core checksums a few MB/s: a loop busy with a burst sends no keepalive
    # for longer than FAST's 0.4 s dead timeout, and links would die of that, not of the bad
    # records this test is about
    config = FAST if IMPLEMENTATION == "cython" else dataclasses.replace(
        FAST, keepalive_interval=0.5, dead_timeout=3.0)

    async def main() -> None:
        async with Setup(Backend("stream", size=size), config,
                         ssl=tls.server_context(cert, key)) as s:
            cev: list = []
            reader, writer = await s.client(events=cev, tls=tls.client_context(fingerprint=fp))
            # a bystander session straight to the server (not through the corrupting proxy)
            r2, w2 = await s.client(direct=True, tls=tls.client_context(fingerprint=fp))
            app = Stats()
            app2 = Stats()
            done = asyncio.Event()

            async def corrupter() -> None:
                for k in range(3):
                    assert await wait_for(lambda k=k: links_up(cev) == k + 1
                                          and s.proxy.live_connections > 0, 10)
                    await asyncio.sleep(0.05)
                    # (>= 1: the loop's TLS transport half-closes a link it gave up, and the
                    # proxy counts that pair until its other end closes too)
                    assert s.proxy.corrupt() >= 1
                assert await wait_for(lambda: links_up(cev) == 4, 10)
                done.set()

            await asyncio.gather(send_stream(writer, size, 1, app, gate=(size // 2, done)),
                                 recv_stream(reader, app),
                                 send_stream(w2, size, 3, app2), recv_stream(r2, app2),
                                 corrupter())
            assert await wait_for(lambda: s.backend.closed == 2, 10)
            hashes = {c.recv_hash.digest(): c for c in s.backend.conns}
            for st in (app, app2):
                be = hashes[st.sent_hash.digest()]
                assert be.sent_hash.digest() == st.recv_hash.digest()
            assert len(s.backend.conns) == 2
            assert sum(1 for e in cev if isinstance(e, ev.LinkUp) and e.resumed) == 3
            # the server saw bad records and said so (a flipped byte that lands in a record's
            # length instead makes the link stall until it is found dead: allowed, not expected)
            lost = [e.reason for e in s.events if isinstance(e, ev.LinkLost)]
            assert len(lost) == 3, lost
            assert sum("bad record mac" in r.lower() for r in lost) >= 2, lost

    run_async("uvloop", main(), timeout=120)


@pytest.mark.parametrize("tls_io", ["auto", "pure"])
def test_links_resume_tls_sessions(tmp_path, tls_io, monkeypatch):
    """A client resumes the TLS session of its latest link to the same server: new links of
    a session (after a break) and links of new sessions make abbreviated handshakes, and the
    pinned certificate is still checked on them. A server that no longer takes the ticket
    (a restarted server: a new ticket key) gets a full handshake and the session works; a
    client told ``resume=False`` never offers one. ``pure``: Python's ``ssl`` sessions."""
    monkeypatch.setenv("ICAFAST_TLS_IO", tls_io)
    if tls_io == "auto":  # (without the pipe, "auto" is the loop's TLS: no resumption)
        needs_tls_pipe("the compiled pipe cannot run here")
    cert, key, fp = _pair(tmp_path)

    def reused(s: Setup) -> list[bool]:  # the server's side of each session's link
        return [r.link.ssl_object.session_reused for r in s.server.sessions_by_id.values()
                if r.link is not None]

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter, data: bytes) -> None:
        w.write(data)
        assert await asyncio.wait_for(r.readexactly(len(data)), 10) == data

    async def main() -> None:
        ct = tls.client_context(fingerprint=fp)
        async with Setup(Backend("echo"), ssl=tls.server_context(cert, key)) as s:
            cev: list = []
            r1, w1 = await s.client(events=cev, tls=ct)
            await echo(r1, w1, b"first")
            assert reused(s) == [False]  # (nothing to resume yet)
            (key1,) = ct._sessions
            assert key1[:2] == ("127.0.0.1", s.proxy.port)
            for k in range(3):  # breaks: each new link resumes
                s.proxy.reset()
                assert await wait_for(lambda k=k: links_up(cev) == k + 2
                                      and reused(s) == [True], 10), (links_up(cev), reused(s))
                await echo(r1, w1, b"after break %d" % k)
            r2, w2 = await s.client(direct=True, tls=ct)  # a new session, another address
            await echo(r2, w2, b"second")
            assert sorted(reused(s)) == [False, True]
            r3, w3 = await s.client(direct=True, tls=ct)  # now resumed too
            await echo(r3, w3, b"third")
            assert sorted(reused(s)) == [False, True, True]
            assert len(ct._sessions) == 2
            old = ct._sessions[key1]
            off = tls.client_context(fingerprint=fp)
            off.resume = False
            r4, w4 = await s.client(direct=True, tls=off)
            await echo(r4, w4, b"no resume")
            assert sorted(reused(s)) == [False, False, True, True] and not off._sessions
            for w in (w1, w2, w3, w4):
                w.close()
        # a server that speaks TLS 1.2 only: its sessions are not kept (resuming TLS 1.2 would
        # reuse the first handshake's keys), so every link makes a full handshake
        sctx12 = tls.server_context(cert, key)
        sctx12.maximum_version = ssl.TLSVersion.TLSv1_2
        async with Setup(Backend("echo"), ssl=sctx12) as s:
            ct12 = tls.client_context(fingerprint=fp)
            open12 = []
            for k in range(2):
                rk, wk = await s.client(direct=True, tls=ct12)
                await echo(rk, wk, b"tls 1.2 #%d" % k)
                open12.append(wk)
            assert not ct12._sessions
            assert reused(s) == [False, False]
            for wk in open12:
                wk.close()
        # a restarted server (a new context, a new ticket key) is offered the old ticket
        async with Setup(Backend("echo"), ssl=tls.server_context(cert, key)) as s:
            ct.remember("127.0.0.1", s.server_port, old)
            r5, w5 = await s.client(direct=True, tls=ct)
            await echo(r5, w5, b"restarted")
            assert reused(s) == [False]
            w5.close()
            await asyncio.sleep(0.2)

    run_async("uvloop", main(), timeout=60)


def test_ticket_keys_are_renewed_every_lifetime(tmp_path, monkeypatch, caplog):
    """A server makes new TLS session ticket keys every ``ticket_key_lifetime`` (and says
    so): a client whose ticket was sealed before makes a full handshake on its next link, and
    the session goes on. With 0, the keys live as long as the context, as OpenSSL has them."""
    monkeypatch.setenv("ICAFAST_TLS_IO", "auto")
    needs_tls_pipe("the ticket keys cannot be reached without the compiled pipe")
    from icafast import tlspipe

    cert, key, fp = _pair(tmp_path)
    caplog.set_level("INFO", logger="icafast")

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter, data: bytes) -> None:
        w.write(data)
        assert await asyncio.wait_for(r.readexactly(len(data)), 10) == data

    async def main() -> None:
        sctx = tls.server_context(cert, key)
        async with Setup(Backend("echo"), ssl=sctx, ticket_key_lifetime=0.5) as s:
            cev: list = []
            ct = tls.client_context(fingerprint=fp)
            r, w = await s.client(events=cev, tls=ct)
            await echo(r, w, b"first")  # (its ticket, sealed with the first keys)
            first = tlspipe.ticket_keys(sctx)
            # a renewal after that ticket, and at least two in all (each sets the next)
            n = max(s.server.counters["tls_ticket_key_renewals"] + 1, 2)
            assert await wait_for(lambda: s.server.counters["tls_ticket_key_renewals"] >= n, 10)
            assert tlspipe.ticket_keys(sctx) != first
            s.proxy.reset()
            assert await wait_for(lambda: links_up(cev) == 2, 10)
            (runner,) = s.server.sessions_by_id.values()
            assert not runner.link.ssl_object.session_reused
            await echo(r, w, b"after the renewal")
            w.close()
        assert sum("new session ticket keys" in m for m in caplog.messages) >= 2
        assert s.server._ticket_timer is None  # (closed: no renewal left to run)
        never = tls.server_context(cert, key)
        kept = tlspipe.ticket_keys(never)
        async with Setup(Backend("echo"), ssl=never, ticket_key_lifetime=0) as s:
            assert s.server._ticket_timer is None
            r, w = await s.client(tls=tls.client_context(fingerprint=fp))
            await echo(r, w, b"kept")
            w.close()
        assert tlspipe.ticket_keys(never) == kept

    run_async("uvloop", main(), timeout=60)
    with pytest.raises(ValueError, match="ticket_key_lifetime"):
        RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", 1)], ticket_key_lifetime=-1)


def test_contexts_trust_only_what_they_are_given(tmp_path):
    """No system certificate authorities: a client with ``ca`` trusts that CA alone; a pinned
    client and a server trust none (their verification is the pin, or client_ca)."""
    ca, _ = _make_ca(tmp_path)
    cert, key, fp = _pair(tmp_path / "srv")
    assert tls.client_context(ca=ca).context.cert_store_stats()["x509_ca"] == 1
    assert tls.client_context(fingerprint=fp).context.cert_store_stats()["x509"] == 0
    assert tls.server_context(cert, key).cert_store_stats()["x509"] == 0
    assert tls.server_context(cert, key, client_ca=ca).cert_store_stats()["x509_ca"] == 1



def test_quiet_tls_links_give_back_their_record_buffers(tmp_path):
    """The compiled pipe keeps OpenSSL's record buffers while a link is busy; the session's
    timers (keepalives here) ask it to free them, and the session goes on after."""
    if not uses_pipe():
        pytest.skip("TLS runs in the event loop's transport here")
    cert, key, fp = _pair(tmp_path)

    class Counting:
        def __init__(self, pipe) -> None:
            self.pipe, self.idle_calls = pipe, 0

        def __getattr__(self, name):
            return getattr(self.pipe, name)

        def idle(self) -> bool:
            self.idle_calls += 1
            return self.pipe.idle()

    async def main() -> None:
        async with Setup(Backend("echo"), ssl=tls.server_context(cert, key)) as s:
            r, w = await s.client(tls=tls.client_context(fingerprint=fp))
            w.write(b"x" * 100_000)
            assert await r.readexactly(100_000) == b"x" * 100_000
            runner = s.only_session()
            spy = runner.link.tls = Counting(runner.link.tls)
            # (keepalive every 0.1 s: a quiet second is ten timer firings or so)
            assert await wait_for(lambda: spy.idle_calls >= 3, 10)
            w.write(b"after")
            assert await r.readexactly(5) == b"after"

    run_async("uvloop", main())


@pytest.mark.parametrize("tls_io", ["auto", "loop"])
def test_silent_and_garbage_tls_clients_are_dropped(tmp_path, tls_io, monkeypatch):
    """Connections that never finish the TLS handshake: silent ones are closed after the
    handshake timeout, one that sends garbage at once; a real client still gets in."""
    monkeypatch.setenv("ICAFAST_TLS_IO", tls_io)
    cert, key, fp = _pair(tmp_path)

    async def main() -> None:
        from icafast.protocol import Config

        cfg = Config(keepalive_interval=0.1, dead_timeout=0.4, handshake_timeout=0.5)
        async with Setup(Backend("echo"), config=cfg, ssl=tls.server_context(cert, key)) as s:
            silent = [await asyncio.open_connection("127.0.0.1", s.server_port)
                      for _ in range(5)]
            gr, gw = await asyncio.open_connection("127.0.0.1", s.server_port)
            gw.write(b"GET / HTTP/1.0\r\n\r\n" * 20)  # not a ClientHello
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for r, w in [(gr, gw), *silent]:  # each is closed by the server
                await read_until_closed(r, 5)
                w.close()
            assert loop.time() - t0 < 4  # (the handshake timeout is 0.5 s)
            assert not s.server.sessions_by_id and not s.backend.conns
            r, w = await s.client(config=cfg, tls=tls.client_context(fingerprint=fp))
            w.write(b"in")
            assert await r.readexactly(2) == b"in"

    run_async("uvloop", main())


@pytest.mark.parametrize("tls_io", ["auto", "loop"])
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_renewed_certificate_serves_new_links_and_sessions_go_on(tmp_path, loop, tls_io,
                                                                    monkeypatch):
    """``set_ssl``: what ``icafast serve`` does on SIGHUP. New links get the new context
    (certificate and client CA); the links already made keep theirs, and a session resumes
    over a link secured by the new one, its stream intact. Both ways of running TLS: either
    way each new link is secured with the context of the moment."""
    monkeypatch.setenv("ICAFAST_TLS_IO", tls_io)
    from cryptography import x509

    here = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server_ca, issue = _make_ca(tmp_path, "server CA")
    old, new = issue("server", here, "old"), issue("server", here, "renewed")
    ca1, issue1 = _make_ca(tmp_path, "client CA one")
    ca2, issue2 = _make_ca(tmp_path, "client CA two")
    c1, c2 = issue1("client", [], "client1"), issue2("client", [], "client2")
    fp_old, fp_new = tls.fingerprint_of_pem(old[0]), tls.fingerprint_of_pem(new[0])

    async def main() -> None:
        first = tls.server_context(*old, client_ca=ca1)
        async with Setup(Backend("echo"), ssl=first) as s:
            assert await asyncio.to_thread(presented_fingerprint, s.server_port, *c1) == fp_old
            cev: list = []
            r, w = await s.client(events=cev, tls=tls.client_context(ca=server_ca, cert=c1[0],
                                                                     key=c1[1]))
            w.write(b"before")
            assert await r.readexactly(6) == b"before"

            s.server.set_ssl(tls.server_context(*new, client_ca=ca1))  # a renewed certificate
            assert await asyncio.to_thread(presented_fingerprint, s.server_port, *c1) == fp_new
            w.write(b"same link")  # (the link made before goes on)
            assert await r.readexactly(9) == b"same link"
            assert links_up(cev) == 1
            s.proxy.reset()  # the session resumes, over a link with the new certificate
            assert await wait_for(lambda: links_up(cev) == 2, 10)
            w.write(b"resumed")
            assert await r.readexactly(7) == b"resumed"
            assert len(s.backend.conns) == 1
            # its TLS session too, where links run TLS on the pipe: the new context took the
            # ticket keys of the one before (the same client CA); on the loop's transport the
            # client offers none
            (runner,) = s.server.sessions_by_id.values()
            assert runner.link.ssl_object.session_reused is (tls_io == "auto" and uses_pipe())

            s.server.set_ssl(tls.server_context(*new, client_ca=ca2))  # another client CA
            config = dataclasses.replace(FAST, connect_retry=0.5)
            with pytest.raises(ConnectionError):  # (a client the old CA signed: refused)
                await open_session("127.0.0.1", s.server_port, config=config,
                                   tls=tls.client_context(ca=server_ca, cert=c1[0], key=c1[1]))
            r2, w2 = await open_session("127.0.0.1", s.server_port, config=FAST,
                                        tls=tls.client_context(ca=server_ca, cert=c2[0],
                                                               key=c2[1]))
            w2.write(b"second CA")
            assert await r2.readexactly(9) == b"second CA"
            w.write(b"still")  # the first session's link, made before, still carries it
            assert await r.readexactly(5) == b"still"
            assert len(s.backend.conns) == 2
            w2.close()
            # Its next link is refused, TLS session ticket or not (a resumed TLS session
            # shows no certificate: a ticket sealed before the change must not let it in).
            s.proxy.reset()
            await asyncio.sleep(1.0)  # (FAST: an attempt every 0.2 s at most)
            assert links_up(cev) == 2, cev
            s.server.set_ssl(first)  # and back
            assert await asyncio.to_thread(presented_fingerprint, s.server_port, *c1) == fp_old

            with pytest.raises(ValueError):  # TLS stays TLS
                s.server.set_ssl(None)  # type: ignore[arg-type]

    run_async(loop, main())


def _ticket_client(port: int, cctx: ssl.SSLContext, session: ssl.SSLSession | None = None,
                   wait: float = 0.5) -> tuple[ssl.SSLSession | None, bool, bool]:
    """A TLS 1.3 client, as any program could be, that may offer a ``session`` (a ticket):
    (its session, whether it was resumed, whether the server refused it after the handshake,
    which it waits ``wait`` seconds for)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            cctx.wrap_socket(raw, session=session) as conn:
        conn.settimeout(wait)
        try:  # (the server sends nothing of its own: its ticket, or its alert; the event
            # loop's TLS transport closes without an alert)
            refused = conn.recv(1) == b""
        except TimeoutError:
            refused = False
        except (ssl.SSLError, ConnectionError):
            refused = True
        return conn.session, conn.session_reused, refused


@pytest.mark.parametrize("tls_io", ["auto", "loop"])
def test_a_ticket_sealed_before_another_client_ca_lets_no_one_in(tmp_path, tls_io,
                                                                 monkeypatch):
    """A resumed TLS session shows no certificate: after ``set_ssl`` with another client CA,
    a ticket the server sealed before must not let a client the old CA signed back in."""
    monkeypatch.setenv("ICAFAST_TLS_IO", tls_io)
    cert, key, _ = _pair(tmp_path / "srv")
    ca1, issue1 = _make_ca(tmp_path, "client CA one")
    ca2, _ = _make_ca(tmp_path, "client CA two")
    cctx = looking_tls_client(*issue1("client", [], "client1"))  # (one context: its tickets)

    async def main() -> None:
        first = tls.server_context(cert, key, client_ca=ca1)
        async with Setup(Backend("echo"), ssl=first) as s:
            port = s.server_port
            session, reused, refused = await asyncio.to_thread(_ticket_client, port, cctx)
            assert session is not None and not reused and not refused
            again = await asyncio.to_thread(_ticket_client, port, cctx, session)
            # (the ticket resumes while CA one is trusted; where the compiled module cannot
            # run, such a server issues no tickets: a full handshake)
            assert again[1] is (first.num_tickets > 0) and not again[2]
            s.server.set_ssl(tls.server_context(cert, key, client_ca=ca2))
            _, reused, refused = await asyncio.to_thread(_ticket_client, port, cctx, session,
                                                         10.0)
            assert not reused and refused

    run_async("uvloop", main())


def _replace(src: str, dst: str) -> None:
    """Put a copy of ``src`` at ``dst`` as a certificate renewal does: written beside it, then
    renamed over it."""
    tmp = dst + ".new"
    Path(tmp).write_bytes(Path(src).read_bytes())
    os.chmod(tmp, 0o600)
    os.replace(tmp, dst)


@pytest.mark.parametrize("tls_io", ["auto", "loop"])
def test_a_client_takes_its_renewed_certificate_at_its_next_link(tmp_path, tls_io,
                                                                 monkeypatch, caplog):
    """A client certificate renewed on disk (a short-lived one, say) is loaded again for the
    next link, with no restart, which would end the sessions: the session resumes with it.
    Files that do not load leave the one loaded before, with one warning."""
    monkeypatch.setenv("ICAFAST_TLS_IO", tls_io)
    caplog.set_level(logging.INFO, logger="icafast")
    ca, issue = _make_ca(tmp_path)
    old, new = issue("client", [], "old"), issue("client", [], "new")
    _, other_key = issue("client", [], "other")
    cert, key = str(tmp_path / "client.crt"), str(tmp_path / "client.key")
    _replace(old[0], cert)
    _replace(old[1], key)
    scert, skey, fp = _pair(tmp_path / "srv")

    async def main() -> None:
        async with Setup(Backend("echo"), ssl=tls.server_context(scert, skey,
                                                                 client_ca=ca)) as s:
            def shown() -> str:  # the client certificate the session's current link showed
                link = s.only_session().link
                return tls.fingerprint_of_der(link.ssl_object.getpeercert(binary_form=True))

            cev: list = []
            ctls = tls.client_context(fingerprint=fp, cert=cert, key=key)
            r, w = await s.client(events=cev, tls=ctls)
            w.write(b"old")
            assert await r.readexactly(3) == b"old"
            assert shown() == tls.fingerprint_of_pem(old[0])
            assert ctls.current_context() is ctls.context  # (nothing changed: the same)

            _replace(new[0], cert)
            _replace(new[1], key)
            s.proxy.reset()
            assert await wait_for(lambda: links_up(cev) == 2, 10)
            w.write(b"new")
            assert await r.readexactly(3) == b"new"
            assert shown() == tls.fingerprint_of_pem(new[0])

            _replace(other_key, key)  # not the certificate's key: kept what was loaded
            for k in (3, 4):
                s.proxy.reset()
                assert await wait_for(lambda k=k: links_up(cev) == k, 10)
            w.write(b"kept")
            assert await r.readexactly(4) == b"kept"
            assert shown() == tls.fingerprint_of_pem(new[0])
            assert len(s.backend.conns) == 1

    run_async("uvloop", main())
    said = [r.getMessage() for r in caplog.records if "changed" in r.getMessage()]
    assert said == [f"TLS: {cert}, {key} changed: loaded again for new links",
                    f"TLS: {cert}, {key} changed but does not load (KEY_VALUES_MISMATCH); new "
                    "links keep what was loaded before"], said


def test_a_certificate_replaced_under_pinned_clients(tmp_path):
    """A server whose pinned certificate is replaced (a new key: a new fingerprint): clients
    that pin both the old and the new one (``--tls-fingerprint OLD,NEW``) resume across the
    change; a client that pins only the old one is refused, and the error names every pin."""
    old_cert, old_key, old_fp = _pair(tmp_path / "old")
    new_cert, new_key, new_fp = _pair(tmp_path / "new")
    assert old_fp != new_fp
    assert tls.pinned(f" {old_fp.upper()} ,{tls.pretty_fingerprint(new_fp)},{old_fp}") == (
        old_fp, new_fp)
    assert tls.pinned([new_fp]) == (new_fp,) and tls.pinned(None) == ()
    with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
        tls.pinned(f"{old_fp},,{new_fp}")

    async def main() -> None:
        async with Setup(Backend("echo"), ssl=tls.server_context(old_cert, old_key)) as s:
            cev: list = []
            both = tls.client_context(fingerprint=f"{old_fp},{new_fp}")
            assert both.fingerprint == old_fp and both.fingerprints == (old_fp, new_fp)
            r, w = await s.client(events=cev, tls=both)
            w.write(b"old")
            assert await r.readexactly(3) == b"old"
            s.server.set_ssl(tls.server_context(new_cert, new_key))
            s.proxy.reset()
            assert await wait_for(lambda: links_up(cev) == 2, 10)
            w.write(b"new")
            assert await r.readexactly(3) == b"new"
            config = dataclasses.replace(FAST, connect_retry=0.5)
            with pytest.raises(ConnectionError) as err:
                await open_session("127.0.0.1", s.server_port, config=config,
                                   tls=tls.client_context(fingerprint=old_fp))
            assert tls.pretty_fingerprint(old_fp) in str(err.value), str(err.value)
            other = _pair(tmp_path / "other")[2]
            with pytest.raises(ConnectionError) as err:
                await open_session("127.0.0.1", s.server_port, config=config,
                                   tls=tls.client_context(fingerprint=[old_fp, other]))
            assert (f"pinned {tls.pretty_fingerprint(old_fp)} or "
                    f"{tls.pretty_fingerprint(other)}") in str(err.value), str(err.value)
            assert len(s.backend.conns) == 1

    run_async("uvloop", main())


def test_a_server_without_tls_takes_no_context(tmp_path):
    cert, key, _ = _pair(tmp_path)
    server = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", 1)])
    with pytest.raises(ValueError, match="without TLS"):
        server.set_ssl(tls.server_context(cert, key))
    assert server.ssl is None


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_wrong_fingerprint_is_refused_and_never_falls_back(tmp_path, loop):
    cert, key, fp = _pair(tmp_path)
    wrong = ("00" if fp[:2] != "00" else "11") + fp[2:]

    async def main() -> None:
        async with Setup(Backend("echo"), ssl=tls.server_context(cert, key)) as s:
            with pytest.raises(ConnectionError, match="fingerprint"):
                await open_session("127.0.0.1", s.server_port, config=FAST,
                                   tls=tls.client_context(fingerprint=wrong),
                                   fallback=("127.0.0.1", s.backend.port))
            assert not s.backend.conns  # no plain-text fallback happened

    run_async(loop, main())


@pytest.mark.parametrize("tls_io", ["auto", "loop"])
def test_a_server_that_never_answers_the_tls_handshake(tmp_path, tls_io, monkeypatch):
    """A listener that accepts and then says nothing: each link attempt ends at the handshake
    timeout and counts as a failed connect (the client retries until ``connect_retry``, then
    gives up), and the listener saw every attempt's connection closed."""
    monkeypatch.setenv("ICAFAST_TLS_IO", tls_io)
    _, _, fp = _pair(tmp_path)
    config = dataclasses.replace(FAST, handshake_timeout=0.3, connect_retry=0.5)

    async def main() -> None:
        conns: list[asyncio.StreamWriter] = []
        closed = 0

        async def mute(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nonlocal closed
            conns.append(w)
            try:
                await r.read()  # (the ClientHello, then the client's close)
            except ConnectionError:
                pass
            closed += 1

        srv = await asyncio.start_server(mute, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        t0 = asyncio.get_running_loop().time()
        try:
            with pytest.raises(ConnectionError, match="no link within|handshake"):
                await open_session("127.0.0.1", port, config=config,
                                   tls=tls.client_context(fingerprint=fp))
            took = asyncio.get_running_loop().time() - t0
            assert 0.5 <= took < 5, took
            assert len(conns) >= 2  # (retried)
            # every attempt's connection was closed by the client (not left open)
            assert await wait_for(lambda: closed == len(conns), 5), (closed, len(conns))
        finally:
            for w in conns:
                w.close()
            srv.close()
            await srv.wait_closed()
            await asyncio.sleep(0.05)

    run_async("uvloop", main(), timeout=30)


def test_ca_verification_and_hostname(tmp_path):
    ca, issue = _make_ca(tmp_path)
    scert, skey = issue("server", [__import__("cryptography").x509.IPAddress(
        ipaddress.ip_address("127.0.0.1"))], "server")

    async def main() -> None:
        async with Setup(Backend("echo"), ssl=tls.server_context(scert, skey)) as s:
            r, w = await open_session("127.0.0.1", s.server_port, config=FAST,
                                      tls=tls.client_context(ca=ca))
            w.write(b"verified")
            assert await r.readexactly(8) == b"verified"
            w.close()
            # a name the certificate does not carry is refused
            with pytest.raises(ConnectionError):
                await open_session("127.0.0.1", s.server_port, config=FAST,
                                   tls=tls.client_context(ca=ca, server_hostname="other.test"))
            # a CA that did not sign it is refused
            other_ca, _ = _make_ca(tmp_path, "other CA")
            with pytest.raises(ConnectionError):
                await open_session("127.0.0.1", s.server_port, config=FAST,
                                   tls=tls.client_context(ca=other_ca),
                                   fallback=("127.0.0.1", s.backend.port))
            assert len(s.backend.conns) == 1

    run_async("uvloop", main())


def test_client_certificates(tmp_path):
    ca, issue = _make_ca(tmp_path)
    ccert, ckey = issue("client", [], "client")
    cert, key, fp = _pair(tmp_path / "srv")

    async def main() -> None:
        sctx = tls.server_context(cert, key, client_ca=ca)
        async with Setup(Backend("echo"), ssl=sctx) as s:
            ctls = tls.client_context(fingerprint=fp, cert=ccert, key=ckey)
            writers = []
            for _ in range(2):  # (the second resumes the first's TLS session)
                r, w = await open_session("127.0.0.1", s.server_port, config=FAST, tls=ctls)
                w.write(b"mtls")
                assert await r.readexactly(4) == b"mtls"
                writers.append(w)
            if uses_pipe():  # (no tickets where the compiled module cannot check them)
                assert sorted(ru.link.ssl_object.session_reused
                              for ru in s.server.sessions_by_id.values()) == [
                                  False, bool(sctx.num_tickets)]
            for w in writers:
                w.close()
            with pytest.raises(ConnectionError):
                await open_session("127.0.0.1", s.server_port, config=FAST,
                                   tls=tls.client_context(fingerprint=fp))
            assert len(s.backend.conns) == 2

    run_async("uvloop", main())


def test_a_server_that_requires_client_certificates_takes_tls13_only(tmp_path):
    """TLS 1.2 resumes by session ID from the server's cache, where no check sees that the
    client's certificate has expired: a server with client certificates refuses TLS 1.2 (one
    without them still takes it), and icafast's own client gets TLS 1.3 from it."""
    ca, issue = _make_ca(tmp_path)
    ccert, ckey = issue("client", [], "client")
    cert, key, fp = _pair(tmp_path / "srv")

    def handshake(sctx: ssl.SSLContext, cctx: ssl.SSLContext) -> str:
        cin, cout, sin, sout = (ssl.MemoryBIO() for _ in range(4))
        c = cctx.wrap_bio(cin, cout, server_hostname=None)
        srv = sctx.wrap_bio(sin, sout, server_side=True)
        for _ in range(10):
            for side in (c, srv):
                try:
                    side.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            sin.write(cout.read())
            cin.write(sout.read())
            if c.version() and srv.version():
                break
        return str(c.version())

    def client(maximum: ssl.TLSVersion) -> ssl.SSLContext:
        cctx = tls.client_context(fingerprint=fp, cert=ccert, key=ckey).context
        cctx.check_hostname = False
        cctx.verify_mode = ssl.CERT_NONE  # (the pin is checked by the link; here: versions)
        cctx.maximum_version = maximum
        return cctx

    assert handshake(tls.server_context(cert, key, client_ca=ca),
                     client(ssl.TLSVersion.MAXIMUM_SUPPORTED)) == "TLSv1.3"
    with pytest.raises(ssl.SSLError):
        handshake(tls.server_context(cert, key, client_ca=ca), client(ssl.TLSVersion.TLSv1_2))
    assert handshake(tls.server_context(cert, key),
                     client(ssl.TLSVersion.TLSv1_2)) == "TLSv1.2"


@pytest.mark.skipif(not uses_pipe(), reason="a server on the event loop's TLS transport sends "
                    "no alert when it refuses a certificate (the loop drops it)")
def test_a_refused_client_certificate_is_said_so(tmp_path):
    """A client the server refused for its certificate (none given, or one its
    --tls-client-ca did not sign) logged "connection closed by peer (TLS close_notify)" on
    every attempt (TLS 1.3: the server's alert comes after the client's handshake), and its
    session ended without a word on certificates."""
    ca, issue = _make_ca(tmp_path)
    other_ca, other_issue = _make_ca(tmp_path, "other CA")
    bad_cert, bad_key = other_issue("client", [], "badclient")
    cert, key, fp = _pair(tmp_path / "srv")
    config = dataclasses.replace(FAST, connect_retry=0.5)

    async def main() -> None:
        async with Setup(Backend("echo"),
                         ssl=tls.server_context(cert, key, client_ca=ca)) as s:
            for ctls, said in (
                    (tls.client_context(fingerprint=fp), "the server requires a client "
                     "certificate: give --tls-client-cert and --tls-client-key"),
                    (tls.client_context(fingerprint=fp, cert=bad_cert, key=bad_key),
                     "the server refused this client's certificate")):
                with pytest.raises(ConnectionError) as err:
                    await open_session("127.0.0.1", s.server_port, config=config, tls=ctls)
                assert said in str(err.value), str(err.value)
                assert "close_notify" not in str(err.value)
            assert not s.backend.conns

    run_async("uvloop", main())


@pytest.mark.parametrize("tls_io", ["auto", "loop"])
def test_the_server_logs_why_it_refused_a_client_certificate(tmp_path, tls_io, monkeypatch,
                                                              caplog):
    """A client the server refuses for its certificate (none, or one its client CA did not
    sign): the server's log names the client and OpenSSL's reason, on either way of running
    TLS. The event loop's TLS transport used to end such a handshake without a word in the
    log (the loop dropped it before the server heard of the connection)."""
    monkeypatch.setenv("ICAFAST_TLS_IO", tls_io)
    ca, _issue = _make_ca(tmp_path)
    _other_ca, other_issue = _make_ca(tmp_path, "other CA")
    bad_cert, bad_key = other_issue("client", [], "badclient")
    cert, key, fp = _pair(tmp_path / "srv")
    config = dataclasses.replace(FAST, connect_retry=0.5)
    caplog.set_level("INFO", logger="icafast")

    async def main() -> None:
        async with Setup(Backend("echo"),
                         ssl=tls.server_context(cert, key, client_ca=ca)) as s:
            for ctls in (tls.client_context(fingerprint=fp),
                         tls.client_context(fingerprint=fp, cert=bad_cert, key=bad_key)):
                with pytest.raises(ConnectionError):
                    await open_session("127.0.0.1", s.server_port, config=config, tls=ctls)
            assert await wait_for(lambda: s.server.counters["tls_handshakes_failed"] >= 2, 5)
            assert not s.backend.conns and not s.server.sessions_by_id

    run_async("uvloop", main())
    said = [r.getMessage() for r in caplog.records
            if r.getMessage().startswith("TLS handshake from 127.0.0.1:")]
    assert any("PEER_DID_NOT_RETURN_A_CERTIFICATE" in m.upper()
               or "peer did not return a certificate" in m for m in said), said
    assert any("CERTIFICATE_VERIFY_FAILED" in m.upper() or "unknown ca" in m.lower()
               for m in said), said


def test_plain_client_cannot_talk_to_tls_server(tmp_path):
    cert, key, _ = _pair(tmp_path)

    async def main() -> None:
        backend = await Backend("echo").start()
        srv = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", backend.port)], FAST,
                          ssl=tls.server_context(cert, key))
        await srv.start()
        with pytest.raises(ConnectionError):
            await open_session(*srv.addresses[0], config=FAST)
        assert not srv.sessions_by_id and not backend.conns
        await srv.close()
        await backend.close()

    run_async("uvloop", main())


def test_server_log_names_a_tls_mismatch(tmp_path, caplog):
    """The server's log of a client whose TLS setting is not its own said only "wrong version
    number" (a plain-text client on a TLS server) or "not an icafast client (first byte
    0x16)" (a TLS client on a --no-tls server); the client's log had a hint, the server's none."""
    cert, key, fp = _pair(tmp_path)

    async def main() -> None:
        backend = await Backend("echo").start()
        for server_tls, client_tls in ((tls.server_context(cert, key), None),
                                       (None, tls.client_context(fingerprint=fp))):
            srv = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", backend.port)], FAST,
                              ssl=server_tls)
            await srv.start()
            with pytest.raises(ConnectionError):
                await open_session(*srv.addresses[0], config=FAST, tls=client_tls)
            await srv.close()
        await backend.close()

    with caplog.at_level("INFO", logger="icafast"):
        run_async("uvloop", main())
    assert ("a TLS handshake: the client runs with TLS, the default, this server with --no-tls, "
            "or in a program without ssl=)" in caplog.text), caplog.text
    if uses_pipe():  # (the event loop's TLS transport shows the server no byte it read)
        assert ("an icafast client without TLS: it runs with --no-tls, or in a program without "
                "tls=, this server with TLS)" in caplog.text), caplog.text


def test_cli_tls_by_default(tmp_path):
    from test_cli import _Proc

    backend = __import__("socket").socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen(4)
    sport, local = free_port(), free_port()
    server = _Proc(["serve", "--listen", f"127.0.0.1:{sport}", "--backend",
                    f"127.0.0.1:{backend.getsockname()[1]}", "--state-dir",
                    str(tmp_path / "state"), "--control", str(tmp_path / "ctl.sock")])
    client = None
    try:
        server.wait_for("listening on")
        out = "".join(server.lines)
        assert "(TLS)" in out
        fp = re.search(r"--tls-fingerprint ([0-9a-f]{64})", out).group(1)
        # without a way to trust the server the client refuses to start
        p = subprocess.run([PY, "-m", "icafast", "connect", "--listen", f"127.0.0.1:{local}",
                            "--server", f"127.0.0.1:{sport}"], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode != 0 and "unverified" in p.stderr
        client = _Proc(["connect", "--listen", f"127.0.0.1:{local}", "--server",
                        f"127.0.0.1:{sport}", "--tls-fingerprint", fp])
        client.wait_for("listening on")
        import socket

        with socket.create_connection(("127.0.0.1", local), timeout=10) as app:
            backend.settimeout(10)
            conn, _ = backend.accept()
            with conn:
                conn.sendall(b"over tls\n")
                assert app.recv(100) == b"over tls\n"
    finally:
        if client is not None:
            client.stop()
        server.stop()
        backend.close()


def test_server_warns_without_tls_on_non_loopback():
    from test_cli import _Proc

    port = free_port()
    server = _Proc(["serve", "--no-tls", "--listen", f"0.0.0.0:{port}", "--backend",
                    "127.0.0.1:9", "--control", f"/tmp/icafast-test-{os.getpid()}.sock"])
    try:
        server.wait_for("listening on")
        assert "WITHOUT TLS" in "".join(server.lines)
    finally:
        server.stop()


def test_a_private_key_every_user_can_read_is_warned_of(tmp_path):
    import socket as socket_

    cert, key, _ = tls.ensure_self_signed(str(tmp_path / "pair"))
    busy = socket_.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:  # (the server stops at its listen, after its TLS settings are read)
        args = ["serve", "--listen", f"127.0.0.1:{busy.getsockname()[1]}", "--control",
                str(tmp_path / "c.sock"), "--tls-cert", cert, "--tls-key", key]
        p = _tls_start(*args)
        assert p.returncode == 1 and "private key" not in p.stderr, p.stderr
        os.chmod(key, 0o640)  # (a group that may read it: the administrator's choice)
        p = _tls_start(*args)
        assert p.returncode == 1 and "private key" not in p.stderr, p.stderr
        os.chmod(key, 0o644)
        p = _tls_start(*args)
        assert p.returncode == 1, p.stderr
        assert f"the private key {key} can be read by every user" in p.stderr, p.stderr
    finally:
        busy.close()
