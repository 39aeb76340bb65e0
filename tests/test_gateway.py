"""Behind gateways and under hostile load: PROXY protocol (unit + real HAProxy), limits."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st
from relay_helpers import (
    FAST,
    Backend,
    Setup,
    free_port,
    read_until_closed,
    run_async,
    stop_process,
    tls_for,
    wait_for,
)

from icafast import tls
from icafast.errors import ProtocolError
from icafast.protocol import (
    REJECT_BAD_PROOF,
    REJECT_CLOSED,
    REJECT_RATE_LIMITED,
    ClientSession,
    State,
)
from icafast.proxyproto import V2_SIGNATURE, ProxyHeaderParser

# -- PROXY protocol parser ---------------------------------------------------------------------

V1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 2598\r\n"
V1_6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 2598\r\n"
V2_4 = (V2_SIGNATURE + bytes([0x21, 0x11]) + (12 + 7).to_bytes(2, "big")
        + bytes([192, 0, 2, 9, 198, 51, 100, 1]) + (4242).to_bytes(2, "big")
        + (2598).to_bytes(2, "big") + bytes([0x04, 0x00, 0x04]) + b"abcd")  # + a NOOP TLV
V2_6 = (V2_SIGNATURE + bytes([0x21, 0x21]) + (36).to_bytes(2, "big")
        + bytes.fromhex("20010db8000000000000000000000009") + bytes(16)
        + (5555).to_bytes(2, "big") + (2598).to_bytes(2, "big"))
V2_LOCAL = V2_SIGNATURE + bytes([0x20, 0x00, 0x00, 0x00])


@pytest.mark.parametrize("header,source,version", [
    (V1, ("192.0.2.7", 56324), 1),
    (V1_6, ("2001:db8::7", 4000), 1),
    (b"PROXY UNKNOWN\r\n", None, 1),
    (V2_4, ("192.0.2.9", 4242), 2),
    (V2_6, ("2001:db8::9", 5555), 2),
    (V2_LOCAL, None, 2),
    # LOCAL ignores the family byte; UNSPEC and UNIX leave the connection's own address
    (V2_SIGNATURE + bytes([0x20, 0x99, 0, 0]), None, 2),
    (V2_SIGNATURE + bytes([0x21, 0x00, 0, 0]), None, 2),
    (V2_SIGNATURE + bytes([0x21, 0x31]) + (216).to_bytes(2, "big") + bytes(216), None, 2),
])
def test_proxy_headers_whole_bytewise_and_with_trailing_data(header, source, version):
    for chunks in ([header + b"HELLO"], [bytes([c]) for c in header + b"HELLO"]):
        p = ProxyHeaderParser()
        rest = b""
        for c in chunks:
            rest += p.feed(c)
        assert p.done and p.source == source and p.version == version
        assert rest == b"HELLO"


@pytest.mark.parametrize("junk", [
    b"GET / HTTP/1.1\r\n", b"PROXY TCP4 999.1.1.1 1.1.1.1 1 2\r\n", b"PROXY TCP4 a b c\r\n",
    b"PROXY " + b"x" * 200, V2_SIGNATURE + bytes([0x31, 0x11, 0, 0]),
    V2_SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF]),
    V2_SIGNATURE + bytes([0x21, 0x11, 0, 4]) + b"1234",
])
def test_bad_proxy_headers_raise_protocol_error(junk):
    p = ProxyHeaderParser()
    with pytest.raises(ProtocolError):
        p.feed(junk)
        p.feed(b"\r\n" * 60)


@pytest.mark.parametrize("header,reason", [
    (V1[:-2] + b"\n", "ends in a bare LF: it must end in CRLF"),
    (b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n", "longer than 107 bytes"),
    (V2_SIGNATURE + bytes([0x21, 0x99, 0, 12]) + bytes(12),
     r"unknown address family \(byte 0x99\)"),
    (V2_SIGNATURE + bytes([0x21, 0x13, 0, 12]) + bytes(12),
     r"unknown transport protocol \(byte 0x13\)"),
])
def test_bad_proxy_headers_say_why(header, reason):
    """The spec's limits: a v1 line ends in CRLF within 107 bytes; a v2 PROXY header names one
    of the address families and transports the spec defines."""
    for chunks in ([header + b"HELLO"], [bytes([c]) for c in header + b"HELLO"]):
        p = ProxyHeaderParser()
        with pytest.raises(ProtocolError, match=reason):
            for c in chunks:
                p.feed(c)


@given(st.binary(max_size=300))
def test_proxy_parser_never_raises_anything_else(data):
    p = ProxyHeaderParser()
    try:
        p.feed(data)
    except ProtocolError:
        pass


# -- limits ------------------------------------------------------------------------------------


def test_failed_resumes_are_rate_limited_per_source():
    async def main() -> None:
        async with Setup(Backend("echo"), max_failed_resumes=3) as s:
            reader, writer = await s.client()
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            live = s.only_session()
            from test_relay import _handshake, _reject_code

            codes = []
            for _ in range(5):
                thief = ClientSession(FAST, 0.0)
                thief.session_id = live.engine.session_id
                thief._secret = os.urandom(32)
                thief._ever_established = True
                codes.append(_reject_code(await _handshake(s.server_port, None, thief)))
            assert codes == [REJECT_BAD_PROOF] * 3 + [REJECT_RATE_LIMITED] * 2
            assert live.engine.state is State.ACTIVE
            writer.write(b"y")
            assert await reader.readexactly(1) == b"y"
            # the session's own client, from the same address, still resumes (its proof
            # checks out): the cap does not lock it out
            assert s.proxy.reset() == 1
            assert await wait_for(lambda: live.engine.reconnects == 1
                                  and live.engine.state is State.ACTIVE, 5)
            writer.write(b"z")
            assert await reader.readexactly(1) == b"z"
            # and a RESUME of a session that ended is still told so (REJECT 4), not refused
            ended = ClientSession(FAST, 0.0)
            ended.session_id = live.engine.session_id
            ended._secret = os.urandom(32)
            ended._ever_established = True
            writer.close()
            assert await wait_for(lambda: not s.server.sessions_by_id, 5)
            assert _reject_code(await _handshake(s.server_port, None, ended)) == REJECT_CLOSED

    run_async("uvloop", main())


#: both ways of running a server's TLS: by the link (the compiled pipe where it runs) and by the
#: event loop's TLS transport (ICAFAST_TLS_IO=loop: where the pipe cannot run); either way the
#: server counts a connection in its handshake from the TCP connection on, its TLS handshake
#: included (a connection that never starts its TLS handshake is the cheapest flood)
_LINK_KINDS = pytest.mark.parametrize("tls_io", [None, "auto", "loop"],
                                      ids=["plain", "tls", "tls-loop"])


def _link_kind(tls_io: str | None, tmp_path, monkeypatch) -> tuple[dict, object]:
    if tls_io is not None:
        monkeypatch.setenv("ICAFAST_TLS_IO", tls_io)
    return tls_for(tmp_path, tls_io is not None)


@_LINK_KINDS
def test_handshake_flood_is_capped_and_slowloris_dropped(tls_io, tmp_path, monkeypatch):
    """More connections than ``max_handshakes`` in their handshakes: the rest are closed at
    once. With TLS that counts from the TCP connection, not from the end of the TLS
    handshake (a connection that never starts its TLS handshake is the cheapest flood)."""
    server_kw, client_tls = _link_kind(tls_io, tmp_path, monkeypatch)

    async def main() -> None:
        from icafast.protocol import Config

        cfg = Config(keepalive_interval=0.1, dead_timeout=0.4, handshake_timeout=0.5)
        async with Setup(Backend("echo"), config=cfg, max_handshakes=10, **server_kw) as s:
            silent = []
            for _ in range(30):  # connect and say nothing
                silent.append(await asyncio.open_connection("127.0.0.1", s.server_port))
            assert await wait_for(lambda: len(s.server._handshaking) == 10, 2)
            # the 20 beyond the limit are closed at once, long before the handshake timeout
            await asyncio.wait_for(asyncio.gather(*(read_until_closed(r, 0.3)
                                                    for r, _ in silent[10:])), 0.4)
            assert len(s.server._handshaking) == 10
            # all of them are gone after the handshake timeout
            assert await wait_for(lambda: not s.server._handshaking, 3)
            for r, w in silent:  # each was closed (reset, or REJECT then close)
                await read_until_closed(r, 3)
                w.close()
            # and a real client still gets in
            reader, writer = await s.client(config=cfg, tls=client_tls)
            writer.write(b"ok")
            assert await reader.readexactly(2) == b"ok"

    run_async("uvloop", main())


@_LINK_KINDS
def test_a_flood_from_one_source_leaves_room_for_others(tls_io, tmp_path, caplog, monkeypatch):
    """One host that fills every handshake slot with connections that say nothing (and opens
    a new one as each is closed) locked every other client out, resumes too: a session whose
    link broke could not come back until the flood stopped. Now a connection from another
    source takes the slot of the flood's oldest handshake; the flood's own are closed at once,
    as before. (The flood comes from 127.0.0.2, the client from 127.0.0.1.)"""
    server_kw, client_tls = _link_kind(tls_io, tmp_path, monkeypatch)

    async def main() -> None:
        from icafast.protocol import Config

        cfg = Config(keepalive_interval=0.1, dead_timeout=0.4, handshake_timeout=5.0)
        async with Setup(Backend("echo"), config=cfg, max_handshakes=10, **server_kw) as s:
            port = s.server_port
            flood = [await asyncio.open_connection("127.0.0.1", port,
                                                   local_addr=("127.0.0.2", 0))
                     for _ in range(10)]
            assert await wait_for(lambda: len(s.server._handshaking) == 10, 2)
            r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
            flood.append((r, w))
            await asyncio.wait_for(read_until_closed(r, 0.5), 1)  # (its own: closed at once)
            # another source gets in, while the flood's handshakes are still open (their
            # timeout is 5 s)
            reader, writer = await s.client(config=cfg, tls=client_tls, direct=True)
            writer.write(b"in")
            assert await reader.readexactly(2) == b"in"
            await asyncio.wait_for(read_until_closed(flood[0][0], 0.5), 1)  # the oldest went
            assert len(s.server._handshaking) == 9  # (the client's is a session now)
            assert set(s.server._by_source) == {"127.0.0.2"}
            counters = s.server.metrics()["counters"]
            assert counters["turned_away_full"] == 1 and counters["turned_away_evicted"] == 1
            for _, fw in flood:
                fw.close()
            assert await wait_for(lambda: not s.server._handshaking, 3)
            assert not s.server._by_source

    run_async("uvloop", main())
    said = [r.getMessage() for r in caplog.records if "handshake slot" in r.getMessage()]
    assert len(said) == 1 and "10 of them by 127.0.0.2" in said[0], said


def test_sessions_dropped_by_one_source_do_not_keep_others_out(caplog):
    """One host that opens sessions and drops them without a CLOSE kept the server at its
    limit for the reliability timeout: every other client was refused (REJECT 5). Now a
    new session from another source ends the oldest DISCONNECTED session of a source that
    holds more than it would, until the two hold as many; live sessions are never ended for
    it. (The dropped sessions come from 127.0.0.2, the others from 127.0.0.1.)"""
    from icafast.aio import open_session
    from icafast.faults import FaultProxy
    from icafast.protocol import Config

    async def main() -> None:
        cfg = Config(keepalive_interval=0.1, dead_timeout=0.4, reliability_timeout=60.0)
        async with Setup(Backend("echo"), config=cfg, max_sessions=4) as s:
            far = await FaultProxy("127.0.0.1", s.server_port, source_host="127.0.0.2").start()
            dropped: list = []
            mine: list = []
            try:
                for _ in range(4):
                    dropped.append(await open_session("127.0.0.1", far.port, config=cfg))
                assert await wait_for(lambda: len(s.server.sessions_by_id) == 4, 5)
                oldest = list(s.server.sessions_by_id)[0]
                far.refuse_new = True  # (their clients cannot come back)
                far.blackhole()
                assert await wait_for(lambda: all(
                    r.engine.state is State.DISCONNECTED
                    for r in s.server.sessions_by_id.values()), 5)
                for _ in range(2):  # 4 : 0, then 3 : 1 -> room each time
                    r, w = await s.client(config=cfg, direct=True)
                    w.write(b"in")
                    assert await r.readexactly(2) == b"in"
                    mine.append(w)
                assert oldest not in s.server.sessions_by_id
                by = {k: len(v) for k, v in s.server._sessions_by_source.items()}
                assert by == {"127.0.0.2": 2, "127.0.0.1": 2}
                with pytest.raises(ConnectionError, match="limit of 4 sessions"):
                    await s.client(config=cfg, direct=True)  # 2 : 2 -> no room
                assert s.server.metrics()["counters"]["sessions_evicted"] == 2
            finally:
                for w in mine + [w for _, w in dropped]:
                    w.close()
                await far.close()

    run_async("uvloop", main())
    said = [r.getMessage() for r in caplog.records if "to make room for others" in r.getMessage()]
    assert len(said) == 1 and "4 of them from 127.0.0.2" in said[0], said


def test_live_sessions_are_not_ended_to_make_room():
    """At the limit, with every session of the top source live, a new one is refused."""
    async def main() -> None:
        async with Setup(Backend("echo"), max_sessions=2) as s:
            kept = [await s.client(direct=True) for _ in range(2)]
            with pytest.raises(ConnectionError, match="limit of 2 sessions"):
                await s.client(direct=True)
            for r, w in kept:
                w.write(b"ok")
                assert await r.readexactly(2) == b"ok"
                w.close()
            assert s.server.counters["sessions_evicted"] == 0

    run_async("asyncio", main())


def test_behind_a_load_balancer_handshakes_count_from_their_proxy_header():
    """With --proxy-protocol every connection comes from the load balancer: each handshake
    counts as its PROXY header's client from that header on."""

    async def main() -> None:
        async with Setup(Backend("echo"), proxy_protocol=True, max_handshakes=4) as s:
            port = s.server_port
            conns = []
            for client in ("192.0.2.7", "192.0.2.7", "192.0.2.7", "192.0.2.8"):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(f"PROXY TCP4 {client} 198.51.100.1 4000 2598\r\n".encode())
                conns.append((r, w))

            def by_source() -> dict[str, int]:
                return {k: len(v) for k, v in s.server._by_source.items()}

            assert await wait_for(lambda: by_source() == {"192.0.2.7": 3, "192.0.2.8": 1}, 3)
            # a fifth: the load balancer's address holds none, so 192.0.2.7's oldest goes
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"PROXY TCP4 192.0.2.9 198.51.100.1 4000 2598\r\n")
            conns.append((r, w))
            await asyncio.wait_for(read_until_closed(conns[0][0], 0.5), 1)
            assert await wait_for(lambda: by_source() == {"192.0.2.7": 2, "192.0.2.8": 1,
                                                           "192.0.2.9": 1}, 3), by_source()
            for _, w in conns:
                w.close()
            assert await wait_for(lambda: not s.server._by_source, 3)

    run_async("uvloop", main())


def test_per_source_limits_count_an_ipv6_site_as_one_source():
    from icafast.aio.server import source_block

    assert source_block("192.0.2.7:4000") == "192.0.2.7"
    assert source_block("[2001:db8:1:2:3:4:5:6]:4000") == "2001:db8:1:2::/64"
    assert source_block("[2001:db8:1:2:ffff::1]:1") == source_block("[2001:db8:1:2::9]:2")
    assert source_block("[2001:db8:1:3::9]:2") != source_block("[2001:db8:1:2::9]:2")
    assert source_block("[::ffff:192.0.2.7]:4000") == "192.0.2.7"
    assert source_block("[fe80::1%eth0]:22") == "fe80::/64"
    assert source_block("?") == "?" and source_block("") == "?"


# -- a real HAProxy in front, terminating TLS and sending PROXY v2 -------------------------------

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy")
                                      else None)


@pytest.mark.skipif(HAPROXY is None, reason="HAProxy is not installed (Debian package "
                    "'haproxy'; .ci/run installs it) -- PROXY v2 + TLS gateway test NOT RUN")
def test_sessions_resume_through_haproxy_tls_and_proxy_v2(tmp_path):
    cert, key, _ = tls.ensure_self_signed(str(tmp_path / "pki"))
    fp = tls.fingerprint_of_pem(cert)
    combined = tmp_path / "haproxy.pem"
    with open(cert) as c, open(key) as k:
        combined.write_text(c.read() + k.read())
    front = free_port()

    async def main() -> None:
        async with Setup(Backend("echo"), proxy_protocol=True) as s:
            cfg = tmp_path / "haproxy.cfg"
            cfg.write_text(f"""
global
    maxconn 1000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:{front} ssl crt {combined}
    default_backend be
backend be
    server icafast 127.0.0.1:{s.server_port} send-proxy-v2
""")
            proc = subprocess.Popen([HAPROXY, "-f", str(cfg), "-db"], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            try:
                for _ in range(100):
                    try:
                        _r, w = await asyncio.open_connection("127.0.0.1", front)
                        w.close()
                        break
                    except OSError:
                        await asyncio.sleep(0.05)
                # the client talks TLS to HAProxy through the fault proxy
                s.proxy.target_port = front
                reader, writer = await s.client(tls=tls.client_context(fingerprint=fp))
                writer.write(b"hello")
                assert await reader.readexactly(5) == b"hello"
                r = s.only_session()
                # the NEW came with the HELLO, and the TCP peer is HAProxy, not the client: no
                # round trip sizes the new session's window (it stays the replay limit)
                assert r.engine.handshake_rtt is None
                assert r.engine.send_window == r.engine.config.replay_limit
                for k in range(6):
                    before = r.engine.reconnects
                    (s.proxy.reset if k % 2 == 0 else s.proxy.blackhole)()
                    assert await wait_for(lambda b=before: r.engine.reconnects > b
                                          and r.engine.state is State.ACTIVE, 10)
                    msg = f"after break {k}".encode()
                    writer.write(msg)
                    assert await reader.readexactly(len(msg)) == msg
                assert len(s.server.sessions_by_id) == 1 and len(s.backend.conns) == 1
                # the server sees the real client (the fault proxy's socket toward HAProxy),
                # not HAProxy's own connection
                (row,) = s.server.sessions()
                live = [p for p in s.proxy.pairs if not p.dead and not p.closed]
                names = {"{}:{}".format(*p.server.transport.get_extra_info("sockname")[:2])
                         for p in live if p.server and p.server.transport}
                assert row["client"] in names, (row["client"], names)
            finally:
                stop_process(proc)

    run_async("uvloop", main(), timeout=120)


def test_proxy_protocol_with_own_tls_is_refused(tmp_path):
    from icafast.aio import Mapping, RelayServer

    cert, key, _ = tls.ensure_self_signed(str(tmp_path))

    async def main() -> None:
        srv = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", 9)], FAST,
                          ssl=tls.server_context(cert, key), proxy_protocol=True)
        with pytest.raises(ValueError, match="terminate TLS"):
            await srv.start()

    run_async("uvloop", main())



