"""The open-files limit a relay process raises at start-up (icafast.rlimits), on a stand-in
for the ``resource`` module (``icafast serve`` raising its own is in test_cli.py); and a
server that runs out of descriptors, as a real process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
from relay_helpers import Backend, free_port, open_files, stop_process, wait_for

from icafast.aio import open_session
from icafast.rlimits import (
    FD_MAX,
    SPARE,
    beyond_any_process,
    fds_needed,
    handshakes_within,
    raise_nofile,
    sessions_within,
    shortfall,
)

INF = -1


class FakeResource:
    RLIMIT_NOFILE = 7
    RLIM_INFINITY = INF

    def __init__(self, soft: int, hard: int, refuse: Exception | None = None) -> None:
        self.limits = (soft, hard)
        self.refuse = refuse
        self.calls: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == self.RLIMIT_NOFILE
        self.calls.append(limits)
        if self.refuse is not None:
            raise self.refuse
        soft, hard = limits
        assert hard == self.limits[1], "the hard limit is never changed"
        assert hard == INF or soft <= hard
        self.limits = limits


def test_what_no_process_can_have():
    """A descriptor is a C int: settings that need more are beyond any limit."""
    assert beyond_any_process(10_000, 1024) is None
    assert beyond_any_process((FD_MAX - SPARE) // 2) is None
    assert "more than any process can have (2147483647)" in beyond_any_process(
        (FD_MAX - SPARE) // 2 + 1)
    assert beyond_any_process(1, FD_MAX) is not None


def test_what_sessions_need():
    assert fds_needed(10_000, 1024) == 20_000 + 1024 + SPARE
    assert sessions_within(fds_needed(500, 64), 64) == 500
    assert sessions_within(fds_needed(500, 64) - 1, 64) == 499
    assert sessions_within(10, 64) == 0


def test_raised_to_what_is_needed_within_the_hard_limit():
    r = FakeResource(1024, 524_288)
    room, line = raise_nofile(10_000, 1024, resource_mod=r)
    assert room == 10_000 and r.limits == (fds_needed(10_000, 1024), 524_288)
    assert line == f"open files: limit raised from 1024 to {fds_needed(10_000, 1024)}"


def test_an_unlimited_hard_limit():
    r = FakeResource(1024, INF)
    assert raise_nofile(1000, resource_mod=r)[0] == 1000 and r.limits == (fds_needed(1000), INF)


@pytest.mark.parametrize("soft", [fds_needed(100), 1_000_000, INF])
def test_a_limit_that_is_enough_is_left_alone(soft):
    r = FakeResource(soft, INF)
    room, line = raise_nofile(100, resource_mod=r)
    assert room == 100 and r.calls == [] and "enough for 100 sessions" in line


def test_a_hard_limit_too_low_raises_as_far_as_it_goes_and_says_how_far():
    r = FakeResource(1024, 4096)
    room, line = raise_nofile(10_000, 1024, resource_mod=r)
    assert room == sessions_within(4096, 1024) == 1408 and r.limits == (4096, 4096)
    assert line == (f"open files: limit raised from 1024 to 4096, the hard limit 4096: room "
                    f"for {room} sessions, not 10000; raise the hard limit to "
                    f"{fds_needed(10_000, 1024)} (systemd: LimitNOFILE=; a shell: ulimit -n)")


def test_handshakes_take_at_most_half_of_a_low_limit():
    """A hard limit of 1,024 (a common default) with the default 1,024 handshakes: the
    handshakes alone took more than the limit, so the room for sessions came out as none (and
    the server was lowered to one session, while its handshakes could still take every
    descriptor). The handshakes now get half of what is left beyond SPARE at most."""
    assert handshakes_within(1024, 1024) == (1024 - SPARE) // 2 == 384
    assert handshakes_within(4096, 1024) == 1024  # (room enough: unchanged)
    assert handshakes_within(100, 1024) == 1  # (at least one)
    r = FakeResource(1024, 1024)
    room, line = raise_nofile(10_000, 1024, resource_mod=r)
    assert room == sessions_within(1024, 384) == 192, line
    assert fds_needed(room, handshakes_within(1024, 1024)) <= 1024
    assert f"room for {room} sessions" in line


def test_soft_at_the_hard_limit_already():
    r = FakeResource(2048, 2048)
    room, line = raise_nofile(10_000, resource_mod=r)
    assert room == sessions_within(2048) and r.calls == []
    assert line.startswith(f"open files: limit 2048, the hard limit 2048: room for {room} "
                           "sessions")


def test_a_refused_raise_is_reported_not_raised():
    r = FakeResource(1024, 65_536, refuse=ValueError("not allowed"))
    room, line = raise_nofile(10_000, resource_mod=r)
    assert room == sessions_within(1024) and r.limits == (1024, 65_536) and len(r.calls) == 1
    assert line.startswith("open files: limit 1024 (raising it failed: not allowed), the hard "
                           f"limit 65536: room for {room} sessions")


def test_shortfall_says_what_a_limit_leaves_room_for():
    assert shortfall(100, resource_mod=FakeResource(fds_needed(100), fds_needed(100))) is None
    assert shortfall(10**6, resource_mod=FakeResource(INF, INF)) is None
    r = FakeResource(1024, 1 << 20)
    text = shortfall(10_000, 64, resource_mod=r)
    assert r.calls == [] and text == (
        f"open files: this process may open 1024, room for {sessions_within(1024, 64)} "
        "sessions, not max_sessions 10000: beyond that, sessions fail with 'Too many open "
        f"files'; raise the limit to {fds_needed(10_000, 64)} "
        "(icafast.rlimits.raise_nofile) or lower max_sessions")


def test_a_server_warns_when_the_limit_has_no_room_for_its_sessions(caplog):
    """The library changes no limit of the process that embeds it, but says so at start when
    its max_sessions cannot be reached."""
    import resource

    from icafast.aio import Mapping, RelayServer

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        pytest.skip("no limit on open files here")

    async def main(max_sessions: int) -> list[str]:
        caplog.clear()
        server = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", 9)], max_sessions=max_sessions,
                             max_handshakes=16)
        await server.start()
        await server.close()
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    with caplog.at_level("WARNING", logger="icafast"):
        fits = sessions_within(soft, 16)
        assert not [m for m in asyncio.run(main(fits)) if "open files" in m]
        warned = [m for m in asyncio.run(main(fits + 1)) if "open files" in m]
        assert warned == [shortfall(fits + 1, 16)]


_CROWDED_SERVER = """
import asyncio, logging, resource, sys
from icafast.aio import Mapping, RelayServer, run

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

async def main():
    port, backend, limit = map(int, sys.argv[1:4])
    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    server = RelayServer([Mapping("127.0.0.1", port, "127.0.0.1", backend)])
    await server.start()
    print("listening", flush=True)
    await asyncio.Event().wait()

run(main())
"""


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_server_that_ran_out_of_descriptors_goes_on(tmp_path, loop):
    """A server (the library, which leaves its limit alone) that runs out of descriptors:
    connections that never start a handshake take every one it may open, so that accept()
    fails. The sessions it holds go on, and once the connections are gone new sessions open,
    on either event loop: under uvloop libuv then accepts and closes the connections waiting
    (those clients see the connection closed and try again), and the standard loop stops
    accepting for a second at a time. Neither closes the listener."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    # (the interpreter, uvloop and the listener hold about 20 of the 64; each session 2)
    limit, held, idle = 64, 8, 60
    port = free_port()
    log_path = tmp_path / "server.log"

    def logged(text: str) -> int:
        return log_path.read_text().count(text)

    async def main() -> None:
        backend = await Backend("echo").start()
        # (the log goes to a file: a pipe that nobody reads would stop the server once full)
        with open(log_path, "w") as log:
            p = subprocess.Popen([sys.executable, "-c", _CROWDED_SERVER, str(port),
                                  str(backend.port), str(limit)],
                                 stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "ICAFAST_LOOP": loop})
        sessions: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        idlers: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        async def session(i: int) -> None:
            r, w = await asyncio.wait_for(open_session("127.0.0.1", port), 20)
            sessions.append((r, w))
            await exchange(r, w, b"session %d\n" % i)

        async def exchange(r: asyncio.StreamReader, w: asyncio.StreamWriter, msg: bytes) -> None:
            w.write(msg)
            assert await asyncio.wait_for(r.readline(), 20) == msg

        async def closed_at_once(r: asyncio.StreamReader) -> bool:
            try:
                return await asyncio.wait_for(r.read(1), 1) == b""
            except ConnectionError:
                return True
            except asyncio.TimeoutError:
                return False

        try:
            assert await wait_for(lambda: logged("listening") or p.poll() is not None, 20)
            assert logged("listening"), log_path.read_text()
            for i in range(held):
                await session(i)
            # connections that say nothing: the server accepts them until it can open no more
            for _ in range(idle):
                idlers.append(await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), 20))
            shed = sum(await asyncio.gather(*(closed_at_once(r) for r, _ in idlers)))
            if loop == "uvloop":  # (libuv's answer to accept() failing so: close what waits)
                assert shed > 0
            else:
                assert logged("socket.accept() out of system resource")
                # (said once, without a traceback: the standard loop reports each failed
                # accept() of each try, hundreds a second with a traceback each, thousands
                # once its retries pile up)
                await asyncio.sleep(1.5)  # (a retry or two of the loop's)
                assert logged("socket.accept() out of system resource") == 1, (
                    log_path.read_text()[-3000:])
                assert "Traceback" not in log_path.read_text()
            # the sessions it holds still carry data both ways
            for i, (r, w) in enumerate(sessions):
                await exchange(r, w, b"again %d\n" % i)
            # the idle connections and the sessions end; then new sessions open
            for _, w in idlers + sessions:
                w.close()
            sessions.clear()
            assert await wait_for(
                lambda: logged(": closed (both directions finished)") == held, 20), (
                log_path.read_text()[-3000:])
            for i in range(5):
                await session(held + i)
            assert p.poll() is None
        finally:
            for _, w in idlers + sessions:
                w.close()
            stop_process(p)
            await backend.close()

    with open_files(2 * idle + 4 * held + 64):  # (this process: four per session, two per idle)
        asyncio.run(main())
