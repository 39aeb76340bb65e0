"""A server name with several addresses (icafast.aio.dial, RFC 8305 Happy Eyeballs).

The event loop's ``create_connection(host, port)`` tried a name's addresses one after the
other, each until the kernel gave up on it. With a first address whose packets vanish (an
IPv6 route a network announces but drops), every link attempt ended at the handshake timeout
on that address: the session was never opened, or never resumed. The names here are given
their addresses by replacing the resolver; the connections are real, on loopback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import socket
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from relay_helpers import (
    FAST,
    Backend,
    Setup,
    links_up,
    open_fd_count,
    run_async,
    unanswering_backend,
    wait_for,
)

from icafast import events as ev
from icafast.aio import dial as dial_module
from icafast.aio import open_session
from icafast.aio.dial import connect_on, dial, interleave

LOOPS = ["uvloop", "asyncio"]
#: the handshake timeout of these tests: the old code spent each whole attempt on the first
#: address, and no attempt within connect_retry reached the second
CONFIG = dataclasses.replace(FAST, handshake_timeout=3.0, connect_retry=4.0)


def _info(host: str, port: int) -> tuple[Any, ...]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = (host, port, 0, 0) if family == socket.AF_INET6 else (host, port)
    return (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address)


@pytest.fixture
def name_with(monkeypatch):
    """``name_with(host, ...)``: from then on, every name resolves to these addresses, in this
    order (the port is the one asked for)."""
    def give(*hosts: str) -> None:
        async def resolve(loop: Any, host: str, port: int) -> list[tuple[Any, ...]]:
            return [_info(h, port) for h in hosts]

        monkeypatch.setattr(dial_module, "resolve", resolve)
    return give


@given(st.lists(st.tuples(st.sampled_from([socket.AF_INET, socket.AF_INET6]),
                          st.integers(1, 6)), max_size=12),
       st.one_of(st.none(), st.integers(1, 6)))
def test_interleave_alternates_families_and_puts_the_last_address_first(addrs, first):
    infos = [(fam, socket.SOCK_STREAM, 6, "", (f"h{n}", 1)) for fam, n in addrs]
    first_address = None if first is None else (f"h{first}", 1)
    out = interleave(infos, first_address)
    # each address once, none lost; the one that worked last (if there) first
    expected = sorted(dict.fromkeys(infos), key=lambda i: i[4] != first_address)
    assert sorted(out, key=repr) == sorted(expected, key=repr)
    if expected:
        assert out[0] == expected[0]
    # each family in the resolver's order; the families alternate while both have some left
    for fam in (socket.AF_INET, socket.AF_INET6):
        assert [i for i in out if i[0] == fam] == [i for i in expected if i[0] == fam]
    fams = [i[0] for i in out]
    both = min(fams.count(socket.AF_INET), fams.count(socket.AF_INET6))
    assert all(fams[k] != fams[k + 1] for k in range(2 * both - 1)), fams


@pytest.mark.parametrize("dead", ["127.0.0.2", "::1"])
@pytest.mark.parametrize("loop", LOOPS)
def test_a_name_whose_first_address_drops_packets_still_connects_and_resumes(loop, dead,
                                                                             name_with):
    """The first address drops everything (another IPv4 address, or IPv6 as on a network
    whose IPv6 route is broken): the session opens on the second within the attempt delay,
    and resumes there after a break."""
    async def main() -> None:
        async with Setup(Backend("echo"), CONFIG) as s:
            port = s.server_port
            name_with(dead, "127.0.0.1")
            events: list[Any] = []
            with unanswering_backend(dead, port):
                r, w = await open_session("server.test", port, config=CONFIG,
                                          on_status=lambda e, _s: events.append(e))
                s.writers.append(w)
                w.write(b"one")
                assert await asyncio.wait_for(r.readexactly(3), 10) == b"one"
                runner = s.only_session()
                assert runner.link is not None
                runner.link.close(abort=True)  # (the server resets the link)
                assert await wait_for(lambda: links_up(events) == 2, timeout=10), events
                w.write(b"two")
                assert await asyncio.wait_for(r.readexactly(3), 10) == b"two"
            assert [e.resumed for e in events if isinstance(e, ev.LinkUp)] == [False, True]

    run_async(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_name_whose_addresses_all_refuse_says_so_for_each(loop, name_with):
    async def main() -> None:
        with socket.socket() as taken:  # (a port nothing listens on, at either address)
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
        name_with("127.0.0.3", "127.0.0.1")
        with pytest.raises(ConnectionError) as caught:
            await open_session("server.test", port,
                               config=dataclasses.replace(CONFIG, connect_retry=0.3))
        text = str(caught.value)
        assert f"127.0.0.3:{port}: " in text and f"127.0.0.1:{port}: " in text, text

    run_async(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_dial_cancelled_or_lost_leaves_no_socket_open(loop, name_with):
    """Attempts still running when the race is decided, or when the caller gives up (the
    handshake timeout), are closed."""
    async def main() -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            port = listener.getsockname()[1]
            with unanswering_backend("127.0.0.2", port), unanswering_backend("127.0.0.3", port):
                gc.collect()
                before = open_fd_count()
                name_with("127.0.0.2", "127.0.0.3")
                for _ in range(3):
                    with pytest.raises(asyncio.TimeoutError):
                        await asyncio.wait_for(dial(asyncio.get_running_loop(), "x", port,
                                                    delay=0.05), 0.3)
                assert open_fd_count() == before
                name_with("127.0.0.2", "127.0.0.3", "127.0.0.1")
                sock = await asyncio.wait_for(
                    dial(asyncio.get_running_loop(), "x", port, delay=0.05), 5)
                assert sock.getpeername() == ("127.0.0.1", port)
                sock.close()
                await asyncio.sleep(0.05)  # (the cancelled attempts close their sockets)
                assert open_fd_count() == before

    run_async(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_link_closed_as_it_is_made_leaves_no_socket_object_behind(loop):
    """uvloop attaches the socket object to its transport only after the connection is made;
    a transport closed before that (here by its protocol, in ``connection_made``) left the
    object holding a descriptor number libuv had closed, which its garbage collection closed
    again (another connection's, by then). ``connect_on`` leaves the object with nothing."""
    class Closing(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            transport.abort()

    async def main() -> None:
        running = asyncio.get_running_loop()
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            port = listener.getsockname()[1]
            # (what the loop opens once, on its first connection: uvloop opens /dev/null)
            await connect_on(running, Closing, await dial(running, "127.0.0.1", port))
            await asyncio.sleep(0.05)
            gc.collect()
            before = open_fd_count()
            socks = []
            for _ in range(20):
                sock = await dial(running, "127.0.0.1", port)
                await connect_on(running, Closing, sock)
                socks.append(sock)
            await asyncio.sleep(0.1)  # (the transports close)
            assert open_fd_count() == before
            assert all(s.fileno() == -1 for s in socks)  # (nothing left to close again)

    run_async(loop, main())
