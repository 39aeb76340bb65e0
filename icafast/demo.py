"""``icafast demo``: a whole session-reliability setup on loopback, with faults.

    application  ->  icafast client  ->  fault proxy  ->  icafast server  ->  sample backend

Both ends stream pseudo-random bytes at each other while the proxy breaks the link (TCP resets,
silent blackholes, half-open links), the server hands its session over to a new server and the
client to a new client, as an upgrade in place does. At the end the SHA-256 of what each side
sent is compared with what the other side received, and the server is asked how many sessions
it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import signal
import tempfile
import time
from collections.abc import Awaitable
from typing import Any

from . import IMPLEMENTATION, logs, tls
from . import events as ev
from .aio import Mapping, RelayClient, RelayServer, loop_name
from .cli import STOP_SIGNALS
from .faults import FaultProxy
from .protocol import Config

CHUNK = 64 * 1024


class StreamStats:
    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.sent_hash = hashlib.sha256()
        self.recv_hash = hashlib.sha256()


async def pump_stream(writer: asyncio.StreamWriter, size: int, seed: int, rate: int,
                      stats: StreamStats, gate: tuple[int, asyncio.Event] | None = None) -> None:
    """Write ``size`` seeded pseudo-random bytes at ``rate`` bytes/s (0: as fast as possible),
    then half-close. With ``gate=(offset, event)``, wait for the event once ``offset`` bytes
    are written."""
    rng = random.Random(seed)
    start = time.monotonic()
    while stats.sent < size:
        n = min(CHUNK, size - stats.sent)
        if gate is not None and not gate[1].is_set():
            if stats.sent >= gate[0]:
                await gate[1].wait()  # (the pacing below then goes on at the rate)
            else:
                n = min(n, gate[0] - stats.sent)  # (a chunk must not carry us past the gate)
        chunk = rng.randbytes(n)
        writer.write(chunk)
        stats.sent_hash.update(chunk)
        stats.sent += len(chunk)
        await writer.drain()
        if rate:
            ahead = stats.sent / rate - (time.monotonic() - start)
            if ahead > 0:
                await asyncio.sleep(ahead)
            elif ahead < -0.05:
                start += -ahead  # after a stall, go on at the rate instead of bursting
    if writer.can_write_eof():
        writer.write_eof()


async def drain_stream(reader: asyncio.StreamReader, stats: StreamStats) -> None:
    while True:
        data = await reader.read(256 * 1024)
        if not data:
            return
        stats.recv_hash.update(data)
        stats.received += len(data)


class SampleBackend:
    """The built-in backend: streams ``size`` seeded bytes to each client and hashes what it
    receives (stands in for an ICA/SSH/RDP server on 127.0.0.1:1494)."""

    def __init__(self, size: int, rate: int, seed: int = 2) -> None:
        self.size = size
        self.rate = rate
        self.seed = seed
        self.stats: list[StreamStats] = []
        self.done = asyncio.Event()
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        st = StreamStats()
        self.stats.append(st)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await asyncio.gather(pump_stream(writer, self.size, self.seed, self.rate, st),
                                 drain_stream(reader, st))
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # (by close(): the handler ends normally, as asyncio.start_server's done callback
            # takes a cancelled handler for an error before Python 3.12)
            pass
        finally:
            writer.close()
            if task is not None:
                self._handlers.discard(task)
            self.done.set()

    async def close(self) -> None:
        """Stop listening and end the connections still streaming."""
        if self._server is not None:
            self._server.close()
        handlers = list(self._handlers)
        for t in handlers:
            t.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


async def _all_within(timeout: float, *aws: Awaitable[Any]) -> None:
    """Run ``aws`` concurrently until all are done, one fails (its exception is raised) or
    ``timeout`` seconds pass (TimeoutError). None is left running when this returns or raises,
    cancelled included, and no exception is left unretrieved."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, pending = await asyncio.wait(tasks, timeout=timeout,
                                           return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            t.result()
        if pending:
            raise asyncio.TimeoutError(f"not done within {timeout:g} s")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _amount(n: int) -> str:
    """Bytes for people: MiB from 1 MiB, KiB from 1 KiB, else bytes (a small --size is not
    "0.0 MiB")."""
    if n >= 1048576:
        return f"{n / 1048576:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} byte" + ("" if n == 1 else "s")


async def demo(size: int = 32 * 1024 * 1024, breaks: int = 6, rate: int = 16 * 1024 * 1024,
               verbose: int = 0, quiet: bool = False, use_tls: bool = True) -> int:
    """Run the demonstration; return 0 when both streams arrived intact over one session, 1
    when not, and 128 + the signal number when SIGINT, SIGTERM or SIGHUP ended it (after the same
    shutdown as at the end: every connection closed, the temporary directory removed).

    ``quiet`` keeps only the RESULT line (and, on failure, the lines that say why)."""
    if size < 1 or breaks < 0 or rate < 0:
        raise ValueError(f"demo needs size >= 1, breaks >= 0 and rate >= 0 "
                         f"(got size={size}, breaks={breaks}, rate={rate})")
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    caught: list[int] = []

    def on_signal(signum: int) -> None:
        caught.append(signum)
        if task is not None:
            task.cancel()  # (again on a second signal: that one cuts the shutdown short)

    installed = []
    for sig in STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):  # (Windows; not main thread)
            continue
        installed.append(sig)
    try:
        async with contextlib.AsyncExitStack() as stack:
            return await _demo(stack, size, breaks, rate, quiet, use_tls)
    except asyncio.CancelledError:
        if not caught or task is None:
            raise
        if hasattr(task, "uncancel"):  # (Python 3.11+: these cancellations are handled here)
            for _ in caught:
                task.uncancel()
        print(f"  RESULT: interrupted by {signal.Signals(caught[0]).name}", flush=True)
        return 128 + caught[0]
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _demo(stack: contextlib.AsyncExitStack, size: int, breaks: int, rate: int,
                quiet: bool, use_tls: bool) -> int:
    """The demonstration; what it starts is stopped by ``stack`` when it ends."""
    def tell(*a: Any) -> None:
        try:
            print(*a, flush=True)
        except BrokenPipeError:  # (icafast demo | head: the demo goes on, and its exit
            logs.drop_stdout()  # status still says whether the session survived)

    def say(*a: Any) -> None:  # (progress: not with --quiet)
        if not quiet:
            tell(*a)

    cfg = Config(keepalive_interval=0.25, dead_timeout=1.0, reliability_timeout=60.0)
    backend = SampleBackend(size, rate)
    await backend.start()
    stack.push_async_callback(backend.close)
    server_ssl = client_tls = None
    if use_tls:
        # (the contexts hold the key and the certificate: the files are not needed after)
        with tempfile.TemporaryDirectory(prefix="icafast-demo-") as tmp:
            cert, key, _ = tls.ensure_self_signed(tmp)
            server_ssl = tls.server_context(cert, key)
            client_tls = tls.client_context(fingerprint=tls.fingerprint_of_pem(cert))
    server_replayed = 0  # what the server re-sent of the backend's stream on resumes

    def on_server_status(e: ev.Event, engine: Any) -> None:
        nonlocal server_replayed
        if isinstance(e, ev.LinkUp) and e.resumed:
            server_replayed += e.replayed

    def new_server() -> RelayServer:
        # (one session, resumed again and again: the limits a demo needs, which any process's
        # open-files limit has room for, not a production server's 10,000)
        return RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", backend.port)], cfg,
                           ssl=server_ssl, max_sessions=4, max_handshakes=16,
                           on_status=on_server_status)

    server = new_server()
    await server.start()
    stack.push_async_callback(server.close)
    proxy = await FaultProxy("127.0.0.1", server.addresses[0][1]).start()
    stack.push_async_callback(proxy.close)
    t0 = time.monotonic()

    def stamp() -> str:
        return f"[{time.monotonic() - t0:6.2f}s]"

    say(f"icafast demo (core: {IMPLEMENTATION}, loop: {loop_name()}, link: "
        f"{'TLS, server certificate pinned by fingerprint' if use_tls else 'plain text'})")
    resumes = 0
    replayed = 0
    ups = 0  # links established or resumed
    session_closed = asyncio.Event()
    reported = False  # the summary is out: what the shutdown does is not news

    def on_status(e: ev.Event, engine: Any) -> None:
        nonlocal resumes, replayed, ups
        if isinstance(e, ev.SessionClosed):
            session_closed.set()
        if isinstance(e, ev.LinkUp):
            ups += 1
        if reported:
            return
        if isinstance(e, ev.LinkLost):
            say(f"{stamp()} client: link lost ({e.reason})")
        elif isinstance(e, ev.LinkUp) and e.resumed:
            resumes += 1
            replayed += e.replayed
            say(f"{stamp()} client: resumed session {engine.session_id.hex()[:12]}.., "
                f"{e.replayed} bytes replayed")
        elif isinstance(e, ev.LinkUp):
            say(f"{stamp()} client: session {engine.session_id.hex()[:12]}.. established")

    def new_client() -> RelayClient:
        return RelayClient(("127.0.0.1", 0), ("127.0.0.1", proxy.port), cfg, tls=client_tls,
                           on_status=on_status)

    client = new_client()
    await client.start()
    stack.push_async_callback(client.close)
    say(f"  app -> client 127.0.0.1:{client.addresses[0][1]} -> fault proxy "
        f"127.0.0.1:{proxy.port} -> server 127.0.0.1:{server.addresses[0][1]} -> sample "
        f"backend 127.0.0.1:{backend.port}")
    say(f"  streaming {_amount(size)} each way"
        + (f" at {_amount(rate)}/s" if rate else "") + f", {breaks} link breaks; keepalive "
        f"{cfg.keepalive_interval}s, dead timeout {cfg.dead_timeout}s")

    app = StreamStats()
    kinds = ["reset", "blackhole", "half-open", "hand-over", "client hand-over"]
    counts = dict.fromkeys(kinds, 0)

    async def hand_over() -> int:
        """The server hands its session to a new server, which takes its listener and the
        backend connection (what ``icafast serve`` does on SIGUSR2, into the program it execs)."""
        nonlocal server
        data, fds = await server.hand_over()
        server = new_server()
        await server.start(handover=(data, fds))
        stack.push_async_callback(server.close)
        return len(server.sessions_by_id)

    async def hand_over_client() -> int:
        """The client hands its session to a new client, which takes its listener and the
        application's connection (what ``icafast connect`` does on SIGUSR2)."""
        nonlocal client
        data, fds = await client.hand_over()
        client = new_client()
        await client.start(handover=(data, fds))
        stack.push_async_callback(client.close)
        return len(client.runners)

    # The last part of the upload (its last byte at least) waits for the last break, so
    # every break finds the session still open; break k comes once k/(breaks+1) of the
    # download arrived (all at once when the size is smaller than the number of breaks).
    breaks_done = asyncio.Event()
    gate = (size - max(1, size // (breaks + 2)), breaks_done)

    async def breaker() -> None:
        try:
            for k in range(breaks):
                target = (k + 1) * size // (breaks + 1)
                for _ in range(6000):
                    if app.received >= target:  # (target < size: reached at the latest)
                        break
                    await asyncio.sleep(0.01)
                kind = kinds[k % len(kinds)]
                # wait until the link broken last is back (resumed) before breaking it again:
                # a break of a link still in its handshake would not be a new break
                for _ in range(3000):
                    if ups >= k + 1 and proxy.live_connections:
                        break
                    await asyncio.sleep(0.01)
                counts[kind] += 1
                if kind == "hand-over":
                    n = await hand_over()
                    say(f"{stamp()} server: handed {n} session(s) over to a new server (as an "
                        f"upgrade in place does) at {_amount(app.received)} received")
                    continue
                if kind == "client hand-over":
                    n = await hand_over_client()
                    say(f"{stamp()} client: handed {n} session(s) over to a new client (as an "
                        f"upgrade in place does) at {_amount(app.received)} received")
                    continue
                n = {"reset": proxy.reset, "blackhole": proxy.blackhole,
                     "half-open": proxy.half_open}[kind]()
                say(f"{stamp()} proxy: {kind} of {n} connection(s) at {_amount(app.received)} "
                    f"received")
        finally:
            breaks_done.set()

    # (a generous bound, only there to end a demo that is stuck: the streams at their
    # rate, or at 8 MiB/s when unlimited, and a few dead timeouts for each break)
    timeout = max(120.0, 4 * size / (rate or 8 * 1024 * 1024)) + 10.0 * breaks
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", client.addresses[0][1])
        stack.callback(writer.close)
        await _all_within(timeout, pump_stream(writer, size, 1, rate, app, gate),
                          drain_stream(reader, app), breaker())
        await _all_within(30.0, backend.done.wait())
        # Both streams are in; the session ends once each side knows the other has its end
        # of stream, a round trip later. Torn down before that, the server would abort it
        # and the client would see its link lost and start reconnecting.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(session_closed.wait(), 5.0)
    except (asyncio.TimeoutError, OSError) as e:
        tell(f"  client: sent {app.sent} of {size} bytes, received {app.received}")
        tell(f"  RESULT: FAILED ({type(e).__name__}: {e})")
        return 1
    be = backend.stats[0]
    n_sessions = len(backend.stats)
    up_ok = app.sent == be.received and app.sent_hash.digest() == be.recv_hash.digest()
    down_ok = be.sent == app.received and be.sent_hash.digest() == app.recv_hash.digest()
    ok = up_ok and down_ok and n_sessions == 1
    reported = True
    summary = say if ok else tell  # (with --quiet, what failed is still shown)
    say("")
    summary(f"  client -> backend: sent {app.sent} bytes sha256 "
            f"{app.sent_hash.hexdigest()[:16]}..  received {be.received} sha256 "
            f"{be.recv_hash.hexdigest()[:16]}..  " + ("OK" if up_ok else "MISMATCH"))
    summary(f"  backend -> client: sent {be.sent} bytes sha256 "
            f"{be.sent_hash.hexdigest()[:16]}..  received {app.received} sha256 "
            f"{app.recv_hash.hexdigest()[:16]}..  " + ("OK" if down_ok else "MISMATCH"))
    summary(f"  link breaks: {counts['reset']} reset, {counts['blackhole']} blackhole, "
            f"{counts['half-open']} half-open, {counts['hand-over']} server hand-over, "
            f"{counts['client hand-over']} client hand-over; "
            f"resumes: {resumes}; bytes replayed: "
            f"{replayed} by the client, {server_replayed} by the server")
    summary(f"  backend connections: {n_sessions}"
            + (" (one session, never a new one)" if n_sessions == 1 else
               " (the session was not kept: the server made new ones)"))
    tell("  RESULT: " + ("the session survived every break, no byte lost, duplicated or "
                         "reordered" if ok else "FAILED"))
    return 0 if ok else 1
