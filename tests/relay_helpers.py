"""Helpers for the loopback integration tests: event-loop runner, backends, a full setup."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import pytest

from icafast import events as ev
from icafast.aio import Mapping, RelayClient, RelayServer, open_session
from icafast.faults import FaultProxy
from icafast.protocol import Config


def _no_fd() -> int | None:
    return None


#: where a stuck test's tracebacks go (a file descriptor), or None for the test's stderr;
#: conftest.py points it at pytest's own fault handler's copy of the terminal's stderr
stuck_dump_fd: Callable[[], int | None] = _no_fd

FAST = Config(keepalive_interval=0.1, dead_timeout=0.4, reliability_timeout=20.0,
              handshake_timeout=2.0, reconnect_initial=0.02, reconnect_max=0.2,
              connect_retry=1.0)


def dump_stuck_state(fd: int | None) -> None:
    """What Python's fault handler cannot show of a stuck process, written to ``fd`` (or
    stderr): each thread's kernel wait channel, the open file descriptors, the loopback TCP
    sockets' states and, when gdb is installed, every thread's native stack (a loop blocked in
    libuv shows only its Python frame otherwise)."""
    lines = ["", f"== icafast test: state of stuck process {os.getpid()}"]
    try:
        for tid in sorted(os.listdir("/proc/self/task"), key=int):
            base = f"/proc/self/task/{tid}"
            with open(f"{base}/comm") as comm, open(f"{base}/wchan") as wchan:
                lines.append(f"thread {tid} {comm.read().strip()} waits in {wchan.read() or '-'}")
        for name in sorted(os.listdir("/proc/self/fd"), key=int):
            with contextlib.suppress(OSError):
                lines.append(f"fd {name} -> {os.readlink(f'/proc/self/fd/{name}')}")
        for table in ("tcp", "tcp6"):
            with open(f"/proc/self/net/{table}") as f:
                lines.append(f"/proc/net/{table}:\n" + f.read().rstrip())
    except OSError as exc:  # not Linux, or /proc is not mounted
        lines.append(f"(/proc: {exc})")
    gdb = shutil.which("gdb")
    if gdb is None:
        lines.append("(gdb is not installed: no native stacks)")
    else:
        try:
            r = subprocess.run([gdb, "-batch", "-nx", "-p", str(os.getpid()),
                                "-ex", "thread apply all bt 40"],
                               capture_output=True, text=True, timeout=30)
            lines.append(r.stdout.rstrip() + r.stderr[-2000:].rstrip())
        except (OSError, subprocess.TimeoutExpired) as exc:
            lines.append(f"(gdb failed: {exc})")
    os.write(2 if fd is None else fd, ("\n".join(lines) + "\n").encode(errors="replace"))


def run_async(kind: str, coro: Coroutine[Any, Any, Any], timeout: float = 120.0) -> Any:
    """Run ``coro`` on a fresh uvloop or asyncio loop, bounded in time."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    loop: asyncio.AbstractEventLoop
    if kind == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(bounded())
    finally:
        try:
            from icafast.aio._relay import LINGER, RUNNERS

            for r in list(RUNNERS):  # sessions a failed test left running
                if r.loop is loop:
                    r.abort("test finished")
            loop.run_until_complete(asyncio.sleep(0.1))  # let closing transports finish
            # links lingering after a CLOSE end when their peer closes, or at LINGER at most
            loop.run_until_complete(_lingering_ended(loop, LINGER + 1.0))
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            import faulthandler
            import gc

            gc.collect()
            # Bounded too: should closing the loop ever block (it waits for every handle to
            # close), the run ends within a minute with every thread's traceback (on the
            # terminal: see conftest.py) instead of hanging until the CI job's limit.
            # The native state goes first (a thread: the stuck loop does not hold the GIL).
            fd = stuck_dump_fd()
            native = threading.Timer(20, dump_stuck_state, (fd,))
            native.daemon = True
            native.start()
            faulthandler.dump_traceback_later(60, exit=True, file=2 if fd is None else fd)
            # A transport still open here is reported, not raised: uvloop's close() warns of
            # each open handle before it closes it, and a warning raised as an error (as
            # pytest.ini has them) skips that close, so close() waits on the handle for good.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ResourceWarning)
                try:
                    loop.close()
                finally:
                    native.cancel()
                    faulthandler.cancel_dump_traceback_later()
                # What the closed loop still referenced (its selector's or handles'
                # transports) is garbage now: collected here, a transport this test left
                # unclosed fails this test and not whichever test runs into it later.
                gc.collect()
            leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
            assert not leaks, f"left open when the test's loop closed: {leaks}"


async def _lingering_ended(loop: asyncio.AbstractEventLoop, limit: float) -> None:
    from icafast.aio._relay import LINGERING

    for _ in range(int(limit / 0.05)):  # bounded
        if not any(lp is loop and link.transport is not None
                   and not link.transport.is_closing() for link, lp in list(LINGERING.items())):
            return
        await asyncio.sleep(0.05)


def stop_process(p: subprocess.Popen, close_pipes: bool = True) -> None:
    """Stop a process this test started, by its pid: SIGTERM, then SIGKILL after 10 s; close
    its pipes (unless a reader thread still has to finish with them)."""
    if p.poll() is None:
        os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
    if not close_pipes:
        return
    for f in (p.stdin, p.stdout, p.stderr):
        if f is not None:
            f.close()


@contextlib.contextmanager
def open_files(want: int) -> Iterator[None]:
    """Let this process open ``want`` files while the block runs: its soft limit raised as far
    as the hard limit allows (the test is skipped where that is not enough), then put back."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"the hard limit on open files ({hard}) is below {want}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_fd_count() -> int:
    """How many file descriptors this process has open (Linux: /proc/self/fd)."""
    return len(os.listdir("/proc/self/fd"))


def looking_tls_client(cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A TLS client context that verifies nothing (a test only looks at what the server
    presents), showing ``cert`` when asked for a certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def presented_fingerprint(port: int, cert: str | None = None, key: str | None = None) -> str:
    """The SHA-256 fingerprint of the certificate the TLS server on 127.0.0.1:``port``
    presents to a new connection (which shows ``cert`` when asked for one). Blocking: from a
    test running the server on its event loop, call it in a thread."""
    from icafast import tls

    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            looking_tls_client(cert, key).wrap_socket(raw) as conn:
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return tls.fingerprint_of_der(der)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections while the block runs: bound, not listening.
    (A port merely free, as ``free_port`` gives, may be taken meanwhile, and a connection to
    it can even succeed by itself: when the kernel picks that very port as its source, TCP's
    simultaneous open connects it to itself.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


class Stats:
    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.sent_hash = hashlib.sha256()
        self.recv_hash = hashlib.sha256()
        self.eof = False


async def send_stream(writer: asyncio.StreamWriter, size: int, seed: int, st: Stats,
                      chunk: int = 256 * 1024, eof: bool = True,
                      gate: tuple[int, asyncio.Event] | None = None) -> None:
    """Send ``size`` seeded bytes; with ``gate=(offset, event)`` wait for the event at offset."""
    rng = random.Random(seed)
    while st.sent < size:
        if gate is not None and st.sent >= gate[0]:
            await gate[1].wait()
        data = rng.randbytes(min(chunk, size - st.sent))
        writer.write(data)
        st.sent_hash.update(data)
        st.sent += len(data)
        await writer.drain()
    if eof:
        writer.write_eof()


async def recv_stream(reader: asyncio.StreamReader, st: Stats) -> None:
    while True:
        data = await reader.read(512 * 1024)
        if not data:
            st.eof = True
            return
        st.recv_hash.update(data)
        st.received += len(data)


class Backend:
    """Loopback backend. mode: 'echo' (with ``delay``: a pause before each read, a slow
    reader), 'stream' (send ``size`` seeded bytes, hash what arrives), 'stall' (accept, never
    read until ``release`` is set), 'banner'."""

    def __init__(self, mode: str = "echo", size: int = 0, seed: int = 2,
                 banner: bytes = b"", delay: float = 0.0) -> None:
        self.mode = mode
        self.delay = delay
        self.size = size
        self.seed = seed
        self.banner = banner
        self.conns: list[Stats] = []
        self.closed = 0
        self.release = asyncio.Event()
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Backend:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        st = Stats()
        self.conns.append(st)
        self.writers.append(writer)
        try:
            if self.banner:
                writer.write(self.banner)
            if self.mode == "echo":
                while True:
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    data = await reader.read(256 * 1024)
                    if not data:
                        break
                    st.received += len(data)
                    st.recv_hash.update(data)
                    writer.write(data)
                    await writer.drain()
                writer.write_eof()
            elif self.mode == "stream":
                await asyncio.gather(send_stream(writer, self.size, self.seed, st),
                                     recv_stream(reader, st))
            elif self.mode == "stall":
                with contextlib.suppress(asyncio.CancelledError):
                    await self.release.wait()
                await recv_stream(reader, st)
            else:
                await recv_stream(reader, st)
        except (ConnectionError, OSError, RuntimeError):
            pass  # the relay reset us (tests do that on purpose)
        finally:
            self.closed += 1
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self.writers:
            w.close()


@contextlib.contextmanager
def unanswering_backend(host: str = "127.0.0.1", port: int = 0) -> Iterator[tuple[str, int]]:
    """The address of a listener whose connections never complete (on ``host``:``port``, an
    IPv4 or IPv6 address; port 0: any): its accept queue is full (it accepts nothing), so the
    kernel drops further SYNs, as for an address whose route is broken, and a connect to it
    waits until its deadline."""
    full = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    full.bind((host, port))
    full.listen(0)
    fillers = []
    try:
        for _ in range(4):  # more than the accept queue takes: the rest hang in SYN_SENT
            c = socket.socket(full.family)
            c.setblocking(False)
            c.connect_ex(full.getsockname())
            fillers.append(c)
        yield full.getsockname()
    finally:
        for c in fillers:
            c.close()
        full.close()


def needs_tls_pipe(why: str) -> None:
    """For a test that needs the compiled TLS pipe (``icafast.tlspipe.uses_pipe``): where it
    cannot run, the test skips saying ``why``, and fails under ``ICAFAST_REQUIRE_COMPILED=1``
    (CI: it must run)."""
    from icafast.tlspipe import uses_pipe

    if uses_pipe():
        return
    if os.environ.get("ICAFAST_REQUIRE_COMPILED") == "1":
        pytest.fail("the compiled TLS pipe cannot run here")
    pytest.skip(why)


def tls_for(tmp_path: Any, on: bool) -> tuple[dict[str, Any], Any]:
    """TLS for a test's server and client, or none (``on`` false): the keyword arguments for
    ``Setup`` (its ``RelayServer``) and the client's ``ClientTLS`` (or None), which pins the
    certificate made in ``tmp_path``."""
    if not on:
        return {}, None
    from icafast import tls

    cert, key, _ = tls.ensure_self_signed(str(tmp_path))
    return ({"ssl": tls.server_context(cert, key)},
            tls.client_context(fingerprint=tls.fingerprint_of_pem(cert)))


class Setup:
    """backend <- RelayServer <- FaultProxy; clients connect through the proxy."""

    def __init__(self, backend: Backend, config: Config = FAST, **server_kw: Any) -> None:
        self.backend = backend
        self.config = config
        self.server_kw = server_kw
        self.events: list[ev.Event] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: RelayServer
        self.proxy: FaultProxy

    async def __aenter__(self) -> Setup:
        await self.backend.start()
        self.server = RelayServer([Mapping("127.0.0.1", 0, "127.0.0.1", self.backend.port)],
                                  self.config, on_status=lambda e, _s: self.events.append(e),
                                  **self.server_kw)
        await self.server.start()
        self.proxy = await FaultProxy("127.0.0.1", self.server.addresses[0][1]).start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for w in self.writers:
            w.close()
        await self.proxy.close()
        await self.server.close()
        await self.backend.close()

    @property
    def server_port(self) -> int:
        return self.server.addresses[0][1]

    async def client(self, config: Config | None = None, events: list[Any] | None = None,
                     direct: bool = False, **kw: Any
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        port = self.server_port if direct else self.proxy.port
        sink = events if events is not None else []
        r, w = await open_session("127.0.0.1", port, config=config or self.config,
                                  on_status=lambda e, _s: sink.append(e), **kw)
        self.writers.append(w)
        return r, w

    def only_session(self) -> Any:
        (r,) = self.server.sessions_by_id.values()
        return r


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> None:
    """Read and drop until the peer closes (or resets) the connection; a read that waits
    ``timeout`` seconds for the close fails the test (asyncio.TimeoutError)."""
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    except ConnectionError:
        pass


def links_up(events: list[Any]) -> int:
    """How many LinkUp events a session's status callback has seen."""
    return sum(1 for e in events if isinstance(e, ev.LinkUp))


async def wait_for(cond: Any, timeout: float = 10.0, step: float = 0.01) -> bool:
    """Poll ``cond()`` until true; bounded in time."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if cond():
            return True
        await asyncio.sleep(step)
    return bool(cond())


@contextlib.asynccontextmanager
async def raw_connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader,
                                                            asyncio.StreamWriter]]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield r, w
    finally:
        w.close()


@contextlib.asynccontextmanager
async def listening_client(server: tuple[str, int], config: Config = FAST,
                           **kw: Any) -> AsyncIterator[RelayClient]:
    """``icafast connect``'s client on a free loopback port, relaying to ``server``; closed
    on the way out (again, if the test closed it already)."""
    client = RelayClient(("127.0.0.1", 0), server, config, **kw)
    await client.start()
    try:
        yield client
    finally:
        await client.close()

