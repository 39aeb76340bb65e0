"""``icafast connect``'s client over its lifetime: a clean stop closes its sessions on the
server, a certificate that does not verify is not retried, mismatched TLS settings are named."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

import pytest
from relay_helpers import (
    FAST,
    Backend,
    Setup,
    listening_client,
    run_async,
    tls_for,
    wait_for,
)

from icafast import events as ev
from icafast import tls
from icafast.aio import Mapping, RelayClient, RelayServer, open_session
from icafast.aio.client import SHUTDOWN_WAIT
from icafast.protocol import State

LOOPS = ["uvloop", "asyncio"]


def _records(caplog: pytest.LogCaptureFixture, text: str,
             level: int | None = None) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()
            and (level is None or r.levelno == level)]


async def _app_through(client: RelayClient) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An application connection through the client's listener, its session up (an echo)."""
    r, w = await asyncio.open_connection(*client.addresses[0])
    w.write(b"ping")
    assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
    return r, w


async def _reset_or_eof(reader: asyncio.StreamReader, timeout: float) -> None:
    """The client ended the application's connection within ``timeout`` seconds."""
    try:
        assert await asyncio.wait_for(reader.read(), timeout) == b""
    except ConnectionError:
        pass


# -- a clean stop ------------------------------------------------------------------------------
@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("tls_io", [None, "auto", "loop"])
def test_client_close_closes_its_sessions_on_the_server(loop, tls_io, tmp_path, monkeypatch,
                                                         caplog):
    """After ``RelayClient.close()`` (what SIGTERM and SIGINT run) the server has no session
    left (none DISCONNECTED, waiting for a client that will never resume it) and has closed
    the backend connection; the client says why."""
    caplog.set_level(logging.INFO, logger="icafast")
    if tls_io is not None:
        monkeypatch.setenv("ICAFAST_TLS_IO", tls_io)
    kw, ctls = tls_for(tmp_path, tls_io is not None)

    async def main() -> None:
        lp = asyncio.get_running_loop()
        async with Setup(Backend("echo"), **kw) as s:
            async with listening_client(("127.0.0.1", s.server_port), tls=ctls) as client:
                apps = [await _app_through(client) for _ in range(2)]
                assert len(s.server.sessions_by_id) == 2
                t0 = lp.time()
                await client.close()
                assert lp.time() - t0 < SHUTDOWN_WAIT + 0.5
                # the server ended both sessions and closed their backend connections
                assert await wait_for(lambda: not s.server.sessions_by_id
                                      and s.backend.closed == 2, 2.0), \
                    ([r.engine.state for r in s.server.sessions_by_id.values()],
                     s.backend.closed)
                for r, w in apps:
                    await _reset_or_eof(r, 2.0)
                    w.close()

    run_async(loop, main(), timeout=60)
    assert len(_records(caplog, "closed (client shutting down)")) == 2
    assert len(_records(caplog, "peer closed: client shutting down")) == 2  # (the server)
    assert not _records(caplog, "application connection closed")


@pytest.mark.parametrize("loop", LOOPS)
def test_client_close_returns_promptly_when_the_link_is_blackholed(loop, caplog):
    """A link that silently stopped carrying anything: ``close()`` waits at most
    ``SHUTDOWN_WAIT`` for the server to take the CLOSE, then ends the session anyway and
    leaves nothing open."""
    caplog.set_level(logging.INFO, logger="icafast")

    async def main() -> None:
        lp = asyncio.get_running_loop()
        async with Setup(Backend("echo")) as s:
            async with listening_client(("127.0.0.1", s.proxy.port)) as client:
                r, w = await _app_through(client)
                assert s.proxy.blackhole() == 1
                t0 = lp.time()
                await client.close()
                took = lp.time() - t0
                assert took < SHUTDOWN_WAIT + 0.5, took
                assert not client.runners
                await _reset_or_eof(r, 2.0)
                w.close()

    run_async(loop, main(), timeout=60)
    assert len(_records(caplog, "closed (client shutting down)")) == 1


@pytest.mark.parametrize("loop", LOOPS)
def test_client_close_delivers_the_close_of_a_disconnected_session(loop, caplog):
    """A session whose link broke and whose next attempt is seconds away: the stopping
    client tries a link at once, resumes and closes the session on the server."""
    caplog.set_level(logging.INFO, logger="icafast")
    slow = dataclasses.replace(FAST, reconnect_initial=10.0, reconnect_max=20.0)

    async def main() -> None:
        lp = asyncio.get_running_loop()
        async with Setup(Backend("echo")) as s:
            async with listening_client(("127.0.0.1", s.proxy.port), slow) as client:
                _r, w = await _app_through(client)
                (runner,) = client.runners
                s.proxy.refuse_new = True
                assert s.proxy.reset() == 1
                # the first attempt (at once) is refused; the next one is 5 s away at least
                assert await wait_for(lambda: runner.engine._attempt >= 1  # noqa: SLF001
                                      and runner.link is None
                                      and runner.engine.state is State.DISCONNECTED, 5)
                assert await wait_for(
                    lambda: s.only_session().engine.state is State.DISCONNECTED, 5)
                s.proxy.refuse_new = False
                t0 = lp.time()
                await client.close()
                assert lp.time() - t0 < SHUTDOWN_WAIT + 0.5
                assert await wait_for(lambda: not s.server.sessions_by_id
                                      and s.backend.closed == 1, 2.0)
                w.close()

    run_async(loop, main(), timeout=60)
    assert _records(caplog, "peer closed: client shutting down")


# -- certificates that do not verify -----------------------------------------------------------
def _wrong(fp: str) -> str:
    return ("00" if fp[:2] != "00" else "11") + fp[2:]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("tls_io", ["auto", "loop"])
@pytest.mark.parametrize("failure", ["fingerprint", "ca", "name"])
def test_a_certificate_that_does_not_verify_is_not_retried(loop, tls_io, failure, tmp_path,
                                                           monkeypatch, caplog):
    """A pinned fingerprint that does not match, a certificate no trusted CA signed, a name
    the certificate does not carry: no attempt would fare better. One attempt, one ERROR
    line, and the application's connection is reset at once (not after ``connect_retry``)."""
    caplog.set_level(logging.INFO, logger="icafast")
    monkeypatch.setenv("ICAFAST_TLS_IO", tls_io)
    cert, key, _ = tls.ensure_self_signed(str(tmp_path / "server"))
    other, _, _ = tls.ensure_self_signed(str(tmp_path / "other"))
    ctls = {"fingerprint": tls.client_context(fingerprint=_wrong(tls.fingerprint_of_pem(cert))),
            "ca": tls.client_context(ca=other),
            "name": tls.client_context(ca=cert, server_hostname="other.test")}[failure]
    config = dataclasses.replace(FAST, connect_retry=10.0)

    async def main() -> None:
        lp = asyncio.get_running_loop()
        async with Setup(Backend("echo"), ssl=tls.server_context(cert, key)) as s:
            async with listening_client(("127.0.0.1", s.server_port), config, tls=ctls) as client:
                t0 = lp.time()
                r, w = await asyncio.open_connection(*client.addresses[0])
                w.write(b"ping")
                await _reset_or_eof(r, 5.0)
                assert lp.time() - t0 < 1.0
                w.close()
                # the library API: the error at once, no fallback
                t0 = lp.time()
                with pytest.raises(ConnectionError, match="fingerprint|certificate"):
                    await open_session("127.0.0.1", s.server_port, config=config, tls=ctls,
                                       fallback=("127.0.0.1", s.backend.port))
                assert lp.time() - t0 < 1.0
                assert not s.backend.conns

    run_async(loop, main(), timeout=60)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2, [r.getMessage() for r in errors]  # one per session
    assert not _records(caplog, "reconnecting")


# -- mismatched TLS settings -------------------------------------------------------------------
async def _fails_with_retries(port: int, events: list[Any], client_tls: Any = None) -> None:
    config = dataclasses.replace(FAST, connect_retry=0.5)
    with pytest.raises(ConnectionError) as exc:
        await open_session("127.0.0.1", port, config=config, tls=client_tls,
                           on_status=lambda e, _s: events.append(e))
    # still retried (a server's settings may change), and the hint is in the error too
    assert sum(isinstance(e, ev.ReconnectDue) for e in events) >= 2
    assert "tls" in str(exc.value).lower()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("tls_io", ["auto", "loop"])
def test_plain_client_against_tls_server_gets_a_hint(loop, tls_io, tmp_path, monkeypatch,
                                                     caplog):
    """A ``--no-tls`` client whose server runs TLS: the server closes the connection without
    a byte. Said once per session, not once per attempt."""
    caplog.set_level(logging.INFO, logger="icafast")
    monkeypatch.setenv("ICAFAST_TLS_IO", tls_io)
    kw, _ = tls_for(tmp_path, True)

    async def main() -> None:
        backend = await Backend("echo").start()
        srv = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", backend.port)], FAST, **kw)
        await srv.start()
        try:
            await _fails_with_retries(srv.addresses[0][1], [])
        finally:
            await srv.close()
            await backend.close()

    run_async(loop, main(), timeout=60)
    hints = _records(caplog, "drop --no-tls", logging.WARNING)
    assert len(hints) == 1, [r.getMessage() for r in hints]
    assert "without answering" in hints[0].getMessage()


@pytest.mark.parametrize("loop", LOOPS)
def test_open_session_given_up_closes_its_link_at_once(loop):
    """``open_session`` abandoned (cancelled, or a timeout around it) while the server has
    not answered: its link is closed then, not at the handshake timeout (10 s here)."""
    async def main() -> None:
        closed = asyncio.Event()
        writers: list[asyncio.StreamWriter] = []

        async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            writers.append(w)
            with contextlib.suppress(ConnectionError):
                await r.read()  # until the client closes its link
            closed.set()

        srv = await asyncio.start_server(silent, "127.0.0.1", 0)
        try:
            port = srv.sockets[0].getsockname()[1]
            config = dataclasses.replace(FAST, handshake_timeout=10.0)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(open_session("127.0.0.1", port, config=config), 0.3)
            await asyncio.wait_for(closed.wait(), 2)
        finally:
            for w in writers:
                w.close()
            srv.close()
            await srv.wait_closed()

    run_async(loop, main())


def test_one_link_reset_before_the_answer_gives_no_tls_hint(caplog):
    """A network that resets the first link before the server's answer is not a server that
    wants TLS: the hint on that needs a second such link."""
    caplog.set_level(logging.INFO, logger="icafast")

    async def main() -> None:
        async with Setup(Backend("echo")) as s:
            s.proxy.refuse_new = True  # the first link is reset as it connects

            def status(e: Any, _s: Any) -> None:
                if isinstance(e, ev.HandshakeRejected):
                    s.proxy.refuse_new = False

            reader, writer = await open_session(
                "127.0.0.1", s.proxy.port, config=dataclasses.replace(FAST, connect_retry=5.0),
                on_status=status)
            s.writers.append(writer)
            writer.write(b"in")
            assert await reader.readexactly(2) == b"in"

    run_async("uvloop", main())
    assert _records(caplog, "handshake failed: connection lost")
    assert not _records(caplog, "drop --no-tls"), [r.getMessage() for r in caplog.records]


def test_a_reject_after_silent_closes_is_not_blamed_on_tls(caplog):
    """Links closed without an answer (a server out of descriptors, or beyond its
    --max-handshakes, closes them at once), then a REJECT from the same plain-text server:
    the REJECT shows the server speaks plain text, so the error names the REJECT alone. It
    said "server is at its limit of 0 sessions (the server closed the connection without
    answering (if it runs TLS, the default, drop --no-tls))"."""
    caplog.set_level(logging.INFO, logger="icafast")

    async def main() -> None:
        async with Setup(Backend("echo"), max_sessions=0) as s:
            s.proxy.refuse_new = True  # the first links are reset as they connect
            rejected = []

            def status(e: Any, _s: Any) -> None:
                if isinstance(e, ev.HandshakeRejected):
                    rejected.append(e)
                    if len(rejected) == 2:
                        s.proxy.refuse_new = False

            with pytest.raises(ConnectionError) as exc:
                await open_session("127.0.0.1", s.proxy.port,
                                   config=dataclasses.replace(FAST, connect_retry=5.0),
                                   on_status=status)
            assert str(exc.value) == ("server rejected the session: server is at its limit of "
                                      "0 sessions"), str(exc.value)
            assert len(rejected) == 3 and rejected[-1].code != 0

    run_async("uvloop", main())


@pytest.mark.parametrize("loop", LOOPS)
def test_plain_client_told_when_the_server_answers_in_tls(loop, caplog):
    """A server that answers the plain-text HELLO with a TLS alert record: the bytes say
    it speaks TLS."""
    caplog.set_level(logging.INFO, logger="icafast")

    async def main() -> None:
        writers: list[asyncio.StreamWriter] = []

        async def alert(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            writers.append(w)
            await r.read(1)
            w.write(bytes.fromhex("15030300020232"))  # alert: fatal, decode_error
            await w.drain()
            w.close()

        srv = await asyncio.start_server(alert, "127.0.0.1", 0)
        try:
            await _fails_with_retries(srv.sockets[0].getsockname()[1], [])
        finally:
            for w in writers:
                w.close()
            srv.close()
            await srv.wait_closed()

    run_async(loop, main(), timeout=60)
    hints = _records(caplog, "the server speaks TLS: drop --no-tls", logging.WARNING)
    assert len(hints) == 1


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("tls_io", ["auto", "loop"])
@pytest.mark.parametrize("server", ["icafast", "closes"])
def test_tls_client_against_plain_server_gets_a_hint(loop, tls_io, server, tmp_path,
                                                     monkeypatch, caplog):
    """A TLS client whose server runs ``--no-tls`` (it answers the ClientHello with a plain
    REJECT), or a server that just closes the connection in the TLS handshake."""
    caplog.set_level(logging.INFO, logger="icafast")
    monkeypatch.setenv("ICAFAST_TLS_IO", tls_io)
    _, ctls = tls_for(tmp_path, True)

    async def main() -> None:
        if server == "icafast":
            backend = await Backend("echo").start()
            srv = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", backend.port)], FAST)
            await srv.start()
            try:
                await _fails_with_retries(srv.addresses[0][1], [], ctls)
            finally:
                await srv.close()
                await backend.close()
            return

        async def close_at_once(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.read(1)
            w.close()

        plain = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
        try:
            await _fails_with_retries(plain.sockets[0].getsockname()[1], [], ctls)
        finally:
            plain.close()
            await plain.wait_closed()

    run_async(loop, main(), timeout=60)
    hints = _records(caplog, "is the server running with --no-tls (in a program: a RelayServer "
                               "without ssl=)?", logging.WARNING)
    assert len(hints) == 1, [r.getMessage() for r in hints]


# -- what the log says -------------------------------------------------------------------------
def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_client_log_writes_ipv6_addresses_in_brackets(caplog):
    """The client's lines wrote IPv6 addresses without brackets ("listening on ::1:1494 ->
    server ::1:2598", "connect to ::1:2598 failed"), which is ambiguous and which --listen and
    --server refuse; the server's lines already bracket them ([::1]:2598)."""
    import socket

    caplog.set_level(logging.INFO, logger="icafast")
    refusing = socket.socket(socket.AF_INET6)  # bound, not listening: connections refused
    refusing.bind(("::1", 0))
    port = refusing.getsockname()[1]
    local: list[int] = []

    async def main() -> None:
        client = RelayClient(("::1", 0), ("::1", port), FAST, fallback=("::1", port))
        await client.start()
        try:
            local.append(client.addresses[0][1])
            r, w = await asyncio.open_connection("::1", local[0])
            await _reset_or_eof(r, 10)  # (the fallback is refused too)
            w.close()
        finally:
            await client.close()

    try:
        run_async("asyncio", main())
    finally:
        refusing.close()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"listening on [::1]:{local[0]} -> server [::1]:{port}" in text, text
    assert f"connect to [::1]:{port} failed" in text, text
    assert f"handshake with [::1]:{port} failed" in text, text
    assert f"to fallback [::1]:{port} WITHOUT" in text, text
    assert f"fallback [::1]:{port} failed too" in text, text
    assert "::1:" not in text.replace("[::1]:", ""), text


def test_a_failed_connect_is_logged_once_per_attempt(caplog):
    """Each refused attempt was logged twice at INFO, "connect to X failed: E" and then
    "handshake failed: E" (the engine's HandshakeRejected for it): with the reconnecting line,
    three lines per attempt through an outage."""
    from relay_helpers import refusing_port

    caplog.set_level(logging.INFO, logger="icafast")

    async def main(port: int) -> None:
        async with listening_client(("127.0.0.1", port)) as client:
            r, w = await asyncio.open_connection(*client.addresses[0])
            await _reset_or_eof(r, 10)  # (connect_retry, 1 s, runs out)
            w.close()

    with refusing_port() as port:
        run_async("asyncio", main(port))
    failed = _records(caplog, f"connect to 127.0.0.1:{port} failed")
    assert len(failed) >= 2, caplog.text
    assert len(_records(caplog, "reconnecting (attempt")) == len(failed) - 1, caplog.text
    assert not _records(caplog, "handshake failed"), caplog.text
    assert _records(caplog, "closed (could not connect: "), caplog.text


def test_reconnect_attempts_are_logged_at_info_the_first_few_then_every_tenth(caplog):
    """Every reconnect attempt was logged at INFO (with its failure): an outage as long as the
    reliability timeout wrote some eighty lines per session. The first three of an outage and
    then every tenth are INFO now, the others DEBUG; the status events are all still there."""
    from relay_helpers import refusing_port

    caplog.set_level(logging.DEBUG, logger="icafast")
    config = dataclasses.replace(FAST, connect_retry=1.5, reconnect_initial=0.005,
                                 reconnect_max=0.01)
    due: list[int] = []

    def on_status(e: Any, engine: Any) -> None:
        if isinstance(e, ev.ReconnectDue):
            due.append(e.attempt)

    async def main(port: int) -> None:
        async with listening_client(("127.0.0.1", port), config, on_status=on_status) as client:
            r, w = await asyncio.open_connection(*client.addresses[0])
            await _reset_or_eof(r, 10)  # (connect_retry runs out)
            w.close()

    with refusing_port() as port:
        run_async("asyncio", main(port))
    assert len(due) >= 25 and due == list(range(1, len(due) + 1)), due
    shown = [int(r.getMessage().split("attempt ")[1].split(")")[0])
             for r in _records(caplog, "reconnecting (attempt", logging.INFO)]
    assert shown == [n for n in due if n <= 3 or n % 10 == 0], shown
    assert len(_records(caplog, "reconnecting (attempt", logging.DEBUG)) == len(due) - len(shown)
    assert len(_records(caplog, "connect to 127.0.0.1", logging.INFO)) == len(shown) + 1
    assert _records(caplog, "until one succeeds, every 10th is logged", logging.INFO)
    assert _records(caplog, "closed (could not connect: ", logging.INFO), caplog.text


def test_a_session_the_server_no_longer_knows_says_why(caplog):
    """After a server restart, a client's resume was refused with "unknown session ID", and
    its session ended with "server rejected the session: unknown session ID", which tells the
    person reading the log nothing of why; it now says the server may have been restarted."""
    caplog.set_level(logging.INFO, logger="icafast")
    events: list[Any] = []

    async def main() -> None:
        async with Setup(Backend("echo")) as s:
            r, w = await s.client(events=events)
            w.write(b"ping")
            assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
            # the server forgets its sessions, as a restarted one has none, and the link breaks
            (runner,) = s.server.sessions_by_id.values()
            s.server.sessions_by_id.clear()
            assert runner.link is not None
            runner.link.close(abort=True)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(r.read(), 10)

    run_async("asyncio", main())
    (closed,) = [e for e in events if isinstance(e, ev.SessionClosed)]
    assert "unknown session" in closed.reason and "restarted" in closed.reason, closed
    assert _records(caplog, "this server does not know it: restarted since"), caplog.text


def test_sessions_disconnect_says_when_there_was_no_link_to_drop(tmp_path):
    """'icafast sessions --disconnect ID' of a session already DISCONNECTED printed the same
    'disconnect: ID' as one whose link it dropped, though it did nothing."""
    import subprocess
    import sys

    path = str(tmp_path / "control.sock")

    def disconnect(sid: str) -> str:
        p = subprocess.run([sys.executable, "-m", "icafast", "sessions", "--control", path,
                            "--disconnect", sid[:8]], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 0, p.stderr
        return p.stdout

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with Setup(Backend("echo"), control_path=path) as s:
            r, w = await s.client()
            w.write(b"ping")
            assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
            (sid,) = [k.hex() for k in s.server.sessions_by_id]
            assert await loop.run_in_executor(None, disconnect, sid) == f"disconnect: {sid}\n"
            assert await wait_for(lambda: s.server.sessions()[0]["reconnects"] == 1, 10)
            await s.proxy.close()  # the link breaks, and new ones are refused
            assert await wait_for(lambda: s.server.sessions()[0]["state"] == "DISCONNECTED", 10)
            out = await loop.run_in_executor(None, disconnect, sid)
            assert out == (f"disconnect: {sid} (it had no link: DISCONNECTED already, nothing "
                           "done)\n"), out

    run_async("asyncio", main())
