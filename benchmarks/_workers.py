"""Load generators and backends for ``python -m benchmarks.relay``, each run as its own process:
``python -m benchmarks._workers COMMAND ...``. Every command prints one JSON object (its result)
as the last line of its standard output; long-running ones print ``ready`` first.

Commands:

- ``bulk-server`` / ``bulk-client``: a built-in sender/sink (upload: the client sends, the server
  counts and hashes; download: the server sends a seeded pattern); used for the byte check of
  every chain, and for the timed bulk runs when iperf3 is not installed.
- ``echo-server`` / ``rr-client``: request/response round trips (64 bytes by default).
- ``redis-check``: SET/GET of a random 1 KiB value through a chain (RESP by hand).
- ``proxy``: a reset-injecting TCP proxy (icafast.faults.FaultProxy) driven over a control port:
  ``hold`` (blackhole the live connections), ``reset`` (RST both sides of the held ones; replies
  with the monotonic time of the reset), ``count``.
- ``resume-one`` / ``resume-many``: resume latency through that proxy, one session (via the
  ``icafast connect`` port) or many sessions at once (library API ``open_session``).
- ``idle-backend`` / ``idle-clients``: many idle sessions for the scale workload.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

CHUNK = 1 << 20


def _out(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


def _nodelay(s: socket.socket) -> None:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _listener(port: int, backlog: int = 4096) -> socket.socket:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(backlog)
    return ls


def _serve_threads(port: int, handler: Any) -> None:
    ls = _listener(port)
    _ready()
    while True:
        conn, _ = ls.accept()
        _nodelay(conn)
        threading.Thread(target=handler, args=(conn,), daemon=True).start()


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        b = s.recv(n - len(buf))
        if not b:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += b
    return bytes(buf)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100, in steps of 0.001):
    the value of rank ceil(q / 100 * n), counted from 1. Computed in integers: in floating
    point 99.9 / 100 * 10000 is 9990.000000000002, whose ceiling is one rank too high."""
    n = len(sorted_values)
    if not n:
        return float("nan")
    rank = -(-round(q * 1000) * n // 100_000)  # ceil(q * n / 100), exactly
    return sorted_values[max(0, min(n - 1, rank - 1))]


# -- bulk ----------------------------------------------------------------------------------------
def _pattern(seed: int) -> bytes:
    return random.Random(seed).randbytes(CHUNK)


def _chunks(size: int, seed: int, verify: bool):
    """The stream: 1 MiB blocks of a seeded pattern, each stamped with its index (so that a
    reordering of whole blocks changes the hash). Without ``verify`` the same block repeats."""
    block = _pattern(seed)
    mv = memoryview(block)
    i = 0
    left = size
    while left > 0:
        n = min(CHUNK, left)
        if verify:
            yield struct.pack("<Q", i) + block[8:n] if n > 8 else struct.pack("<Q", i)[:n]
        else:
            yield mv[:n]
        left -= n
        i += 1


def _bulk_handler(conn: socket.socket) -> None:
    try:
        hdr = _recv_exact(conn, 14)
        op, verify, size, seed = hdr[:1], hdr[1], *struct.unpack("<QI", hdr[2:])
        if op == b"U":
            h = hashlib.sha256()
            buf = bytearray(CHUNK)
            mv = memoryview(buf)
            total = 0
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                total += n
                if verify:
                    h.update(mv[:n])
            conn.sendall(struct.pack("<Q", total) + (h.digest() if verify else bytes(32)))
        elif op == b"D":
            for c in _chunks(size, seed, bool(verify)):
                conn.sendall(c)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)
    except OSError:
        pass
    finally:
        conn.close()


def cmd_bulk_server(a: argparse.Namespace) -> None:
    _serve_threads(a.port, _bulk_handler)


def cmd_bulk_client(a: argparse.Namespace) -> None:
    verify = a.verify
    seed = random.randrange(1 << 32)
    s = socket.create_connection(("127.0.0.1", a.port), timeout=a.timeout)
    _nodelay(s)
    op = b"U" if a.dir == "up" else b"D"
    s.sendall(op + bytes([1 if verify else 0]) + struct.pack("<QI", a.size, seed))
    expect = hashlib.sha256()
    if verify:
        for c in _chunks(a.size, seed, True):
            expect.update(c)
    got = hashlib.sha256()
    t0 = time.perf_counter()
    if op == b"U":
        for c in _chunks(a.size, seed, verify):
            s.sendall(c)
        s.shutdown(socket.SHUT_WR)
        reply = _recv_exact(s, 40)
        t1 = time.perf_counter()
        total = struct.unpack("<Q", reply[:8])[0]
        ok = total == a.size and (not verify or reply[8:] == expect.digest())
    else:
        buf = bytearray(CHUNK)
        mv = memoryview(buf)
        total = 0
        while True:
            n = s.recv_into(buf)
            if not n:
                break
            total += n
            if verify:
                got.update(mv[:n])
        t1 = time.perf_counter()
        ok = total == a.size and (not verify or got.digest() == expect.digest())
    s.close()
    _out({"bytes": total, "seconds": t1 - t0, "rate": total / (t1 - t0), "ok": ok,
          "verified": verify})


# -- round trips ---------------------------------------------------------------------------------
def _echo_handler(conn: socket.socket) -> None:
    try:
        while True:
            b = conn.recv(65536)
            if not b:
                break
            conn.sendall(b)
    except OSError:
        pass
    finally:
        conn.close()


def cmd_echo_server(a: argparse.Namespace) -> None:
    _serve_threads(a.port, _echo_handler)


def cmd_rr_client(a: argparse.Namespace) -> None:
    """Round trips of ``--size`` bytes through one connection, or with ``--new-connections``
    each through a connection of its own (opened, one round trip, closed after the echo's
    end of stream: a whole session per round trip)."""
    s = socket.create_connection(("127.0.0.1", a.port), timeout=a.timeout)
    _nodelay(s)
    msg = bytearray(os.urandom(a.size))
    lat: list[float] = []
    ok = True
    clock = time.perf_counter_ns
    for i in range(a.warmup + a.count):
        struct.pack_into("<Q", msg, 0, i)
        want = bytes(msg)
        t0 = clock()
        if a.new_connections and i:
            s = socket.create_connection(("127.0.0.1", a.port), timeout=a.timeout)
            _nodelay(s)
        s.sendall(want)
        got = s.recv(a.size)
        while len(got) < a.size:
            more = s.recv(a.size - len(got))
            if not more:
                raise ConnectionError("echo closed")
            got += more
        t1 = clock()
        if got != want:
            ok = False
        if i >= a.warmup:
            lat.append((t1 - t0) / 1000.0)
        if a.new_connections:
            s.shutdown(socket.SHUT_WR)
            if s.recv(1):  # the chain ends the session: its end of stream comes back
                ok = False
            s.close()
    s.close()
    lat.sort()
    _out({"count": len(lat), "p50_us": percentile(lat, 50), "p99_us": percentile(lat, 99),
          "p999_us": percentile(lat, 99.9), "max_us": lat[-1], "ok": ok})


# -- redis ---------------------------------------------------------------------------------------
def _resp(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


def cmd_redis_check(a: argparse.Namespace) -> None:
    s = socket.create_connection(("127.0.0.1", a.port), timeout=a.timeout)
    _nodelay(s)
    f = s.makefile("rb")
    key = b"icafast-bench-%d" % random.randrange(1 << 30)
    value = os.urandom(1024)
    s.sendall(_resp(b"SET", key, value) + _resp(b"GET", key) + _resp(b"DEL", key))
    r1 = f.readline()
    hdr = f.readline()
    got = f.read(int(hdr[1:].strip())) if hdr.startswith(b"$") else b""
    f.read(2)
    r3 = f.readline()
    s.close()
    _out({"ok": r1 == b"+OK\r\n" and got == value and r3 == b":1\r\n"})


# -- the reset-injecting proxy -------------------------------------------------------------------
def cmd_proxy(a: argparse.Namespace) -> None:
    from icafast.aio import run

    run(_proxy(a))


async def _proxy(a: argparse.Namespace) -> None:
    from icafast.faults import FaultProxy, _Pair

    class Proxy(FaultProxy):
        async def start(self) -> FaultProxy:  # FaultProxy with a backlog for 1,000 at once
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(lambda: _Pair(self).client,
                                                    self.listen_host, self.listen_port,
                                                    reuse_address=True, backlog=4096)
            self.port = self._server.sockets[0].getsockname()[1]
            return self

    proxy = await Proxy("127.0.0.1", a.target, "127.0.0.1", a.listen).start()

    async def control(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while line := await r.readline():
            cmd = line.strip()
            if cmd == b"hold":
                reply = f"ok {proxy.blackhole()}"
            elif cmd == b"reset":
                t = time.monotonic()
                held = proxy.zombies
                proxy.zombies = []
                for p in held:
                    p.reset()
                reply = f"ok {len(held)} {t!r}"
            elif cmd == b"count":
                reply = f"ok {proxy.live_connections}"
            else:
                reply = "error"
            w.write(reply.encode() + b"\n")
        w.close()

    await asyncio.start_server(control, "127.0.0.1", a.control)
    _ready()
    await asyncio.Event().wait()


class _Ctl:
    def __init__(self, port: int) -> None:
        self.port = port

    async def open(self) -> _Ctl:
        self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def __call__(self, cmd: str) -> list[str]:
        self.w.write(cmd.encode() + b"\n")
        return (await asyncio.wait_for(self.r.readline(), 10)).decode().split()


async def _wait_port(port: int, timeout: float = 20.0) -> None:
    """Wait until something listens on ``port`` (without connecting: a probe connection
    would itself become a session)."""
    from ._chains import listening

    deadline = time.monotonic() + timeout
    while not listening(port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on {port}")
        await asyncio.sleep(0.02)


async def _read_marker(reader: asyncio.StreamReader, expect: bytes) -> tuple[bool, float]:
    data = await reader.readexactly(len(expect))
    return data == expect, time.monotonic()


async def _hold(ctl: _Ctl, want: int) -> int:
    """Blackhole the live links; wait (bounded) until ``want`` of them are live first."""
    n = 0
    for _ in range(400):
        n = int((await ctl("count"))[1])
        if n >= want:
            break
        await asyncio.sleep(0.005)
    return int((await ctl("hold"))[1])


def _stats_ms(values: list[float]) -> dict[str, float]:
    v = sorted(x * 1000 for x in values)
    return {"n": len(v), "p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99),
            "max_ms": v[-1] if v else float("nan")}


# -- resume, one session -------------------------------------------------------------------------
def cmd_resume_one(a: argparse.Namespace) -> None:
    from icafast.aio import run

    run(_resume_one(a))


async def _resume_one(a: argparse.Namespace) -> None:
    conns: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await conns.put((r, w))

    await asyncio.start_server(on_backend, "127.0.0.1", a.backend_port)
    _ready()
    await _wait_port(a.app_port)
    cr, cw = await asyncio.open_connection("127.0.0.1", a.app_port)
    _nodelay(cw.get_extra_info("socket"))
    cw.write(b"hello\n")
    br, bw = await asyncio.wait_for(conns.get(), 10)
    _nodelay(bw.get_extra_info("socket"))
    ok = await br.readexactly(6) == b"hello\n"
    ctl = await _Ctl(a.control_port).open()
    total, up, down, held = [], [], [], []
    for i in range(a.resets):
        held.append(await _hold(ctl, 1))
        mu, md = b"U%07d\n" % i, b"D%07d\n" % i
        cw.write(mu)
        bw.write(md)
        await asyncio.sleep(a.hold)
        t_reset = float((await ctl("reset"))[2])
        (ok1, t1), (ok2, t2) = await asyncio.wait_for(
            asyncio.gather(_read_marker(br, mu), _read_marker(cr, md)), 20)
        ok = ok and ok1 and ok2
        up.append(t1 - t_reset)
        down.append(t2 - t_reset)
        total.append(max(t1, t2) - t_reset)
    cw.close()
    bw.close()
    _out({"ok": ok and min(held) == 1, "resets": a.resets, "resume": _stats_ms(total),
          "client_to_backend": _stats_ms(up), "backend_to_client": _stats_ms(down)})


# -- resume, many sessions at once ---------------------------------------------------------------
def cmd_resume_many(a: argparse.Namespace) -> None:
    from icafast.aio import run

    run(_resume_many(a))


async def _resume_many(a: argparse.Namespace) -> None:
    from icafast.aio import open_session

    backends: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
    arrived = asyncio.Event()

    async def on_backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        sid = int((await r.readexactly(8))[1:7])
        backends[sid] = (r, w)
        if len(backends) == a.sessions:
            arrived.set()

    await asyncio.start_server(on_backend, "127.0.0.1", a.backend_port, backlog=4096)
    _ready()
    await _wait_port(a.server_port)
    sessions: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    t0 = time.monotonic()
    tls = None
    if a.tls_fingerprint:
        from icafast.tls import client_context

        tls = client_context(fingerprint=a.tls_fingerprint)
    for start in range(0, a.sessions, 100):
        batch = await asyncio.gather(*(open_session("127.0.0.1", a.server_port, tls=tls)
                                       for _ in range(start, min(a.sessions, start + 100))))
        for r, w in batch:
            w.write(b"S%06d\n" % len(sessions))
            sessions.append((r, w))
    await asyncio.wait_for(arrived.wait(), 60)
    open_s = time.monotonic() - t0
    ctl = await _Ctl(a.control_port).open()
    rounds = []
    ok = True
    for rnd in range(a.rounds):
        held = await _hold(ctl, a.sessions)
        for i, (_r, w) in enumerate(sessions):
            w.write(b"U%03d%06d\n" % (rnd, i))
            backends[i][1].write(b"D%03d%06d\n" % (rnd, i))
        await asyncio.sleep(a.hold)
        parts = await ctl("reset")
        t_reset = float(parts[2])
        reads = []
        for i, (r, _w) in enumerate(sessions):
            reads.append(_read_marker(backends[i][0], b"U%03d%06d\n" % (rnd, i)))
            reads.append(_read_marker(r, b"D%03d%06d\n" % (rnd, i)))
        res = await asyncio.wait_for(asyncio.gather(*reads), 60)
        ok = ok and held == a.sessions and int(parts[1]) == a.sessions and all(x[0] for x in res)
        per = [max(res[2 * i][1], res[2 * i + 1][1]) - t_reset for i in range(a.sessions)]
        st = _stats_ms(per)
        st["all_done_ms"] = st.pop("max_ms")
        st["held"] = held
        rounds.append(st)
    _out({"ok": ok, "sessions": a.sessions, "open_seconds": open_s, "rounds": rounds})
    os._exit(0)  # skip closing 1,000 sessions one by one


# -- a minimal forwarder: the floor for any relay written on Python + uvloop -------------------
#: every side whose connection is open: the event loop does not keep a transport that is not
#: reading alive, so after an end of stream a pair of sides would be garbage, collected with
#: its connections still open (and uvloop, which frees a transport's pending half-close with
#: it, then corrupted its heap: "double free or corruption", benchmarks/HISTORY.md)
_OPEN: set[_Fwd] = set()


class _Fwd(asyncio.Protocol):
    """One side of a minimal TCP forwarder (no framing, no checksum, no replay buffer): what
    remains is uvloop's and the interpreter's cost per read and write. An end of stream is
    passed on (half-close); once both directions have ended, or either connection is lost,
    both are closed."""

    def __init__(self, peer: _Fwd | None = None) -> None:
        self.peer = peer
        self.t: Any = None
        self.early: list[bytes] = []
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        _OPEN.add(self)
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        inbound = self.peer
        if inbound is not None:  # the outbound side: flush what arrived meanwhile
            inbound.peer = self
            if inbound.lost:  # (the client went before the backend answered)
                transport.close()
                return
            for b in inbound.early:
                transport.write(b)  # type: ignore[attr-defined]
            inbound.early.clear()
            if inbound.eof:
                transport.write_eof()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.peer is None or self.peer.t is None:
            self.early.append(data)
        else:
            self.peer.t.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.t is not None:
            if peer.eof:  # both directions have ended
                self.t.close()
                peer.t.close()
                return True
            peer.t.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        _OPEN.discard(self)
        if self.peer is not None and self.peer.t is not None:
            self.peer.t.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.t is not None:
            self.peer.t.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.t is not None:
            self.peer.t.resume_reading()


def cmd_forward(a: argparse.Namespace) -> None:
    from icafast.aio import run
    from icafast.heap import tune_malloc

    # the heap settings icafast's own relay processes run with: without them glibc maps and
    # unmaps uvloop's 256 KiB read buffer on every read until one large read raises its mmap
    # threshold, so the floor would move with what the chain happened to carry first
    tune_malloc()

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def inbound() -> _Fwd:
            side = _Fwd()
            side.task = loop.create_task(  # type: ignore[attr-defined]
                loop.create_connection(lambda: _Fwd(side), "127.0.0.1", a.target))
            return side

        await loop.create_server(inbound, "127.0.0.1", a.listen, backlog=4096)
        _ready()
        await asyncio.Event().wait()

    run(main())


# -- scale: many idle sessions -------------------------------------------------------------------
class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.t.write(data)  # type: ignore[attr-defined]


def cmd_idle_backend(a: argparse.Namespace) -> None:
    from icafast.aio import run

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(_Echo, "127.0.0.1", a.port, backlog=4096)
        _ready()
        await asyncio.Event().wait()

    run(main())


def cmd_idle_clients(a: argparse.Namespace) -> None:
    from icafast.aio import run

    run(_idle_clients(a))


async def _idle_clients(a: argparse.Namespace) -> None:
    from icafast import events as ev
    from icafast.aio import open_session

    loop = asyncio.get_running_loop()
    sessions: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    lost = 0
    failed = 0

    def on_status(e: Any, _eng: Any) -> None:
        nonlocal lost
        if isinstance(e, ev.LinkLost):
            lost += 1

    tls = None
    if a.tls_fingerprint:
        from icafast.tls import client_context

        tls = client_context(fingerprint=a.tls_fingerprint)

    async def one() -> bool:
        r, w = await open_session("127.0.0.1", a.server_port, on_status=on_status, tls=tls)
        sessions.append((r, w))
        return await exchange(r, w)

    async def exchange(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        msg = os.urandom(64)
        w.write(msg)
        return await asyncio.wait_for(r.readexactly(64), 30) == msg

    _ready()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        parts = line.split()
        if not parts or parts[0] == "quit":
            break
        if parts[0] == "open":
            want = int(parts[1])
            ok = True
            while len(sessions) < want:
                n = min(a.batch, want - len(sessions))
                res = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
                bad = [x for x in res if x is not True]
                failed += len(bad)
                ok = ok and not bad
                if bad and len(bad) == n:
                    break
            _out({"ok": ok, "sessions": len(sessions), "failed": failed, "lost": lost})
        elif parts[0] == "check":
            res = await asyncio.gather(*(exchange(r, w) for r, w in sessions),
                                       return_exceptions=True)
            _out({"ok": all(x is True for x in res), "sessions": len(sessions),
                  "failed": failed, "lost": lost})
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks._workers")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("bulk-server")
    s.add_argument("--port", type=int, required=True)
    s = sub.add_parser("bulk-client")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--dir", choices=["up", "down"], required=True)
    s.add_argument("--size", type=int, required=True)
    s.add_argument("--verify", action="store_true")
    s.add_argument("--timeout", type=float, default=60)
    s = sub.add_parser("echo-server")
    s.add_argument("--port", type=int, required=True)
    s = sub.add_parser("rr-client")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--count", type=int, default=10000)
    s.add_argument("--warmup", type=int, default=200)
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--timeout", type=float, default=30)
    s.add_argument("--new-connections", action="store_true",
                   help="a connection of its own for each round trip")
    s = sub.add_parser("redis-check")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--timeout", type=float, default=30)
    s = sub.add_parser("proxy")
    s.add_argument("--listen", type=int, required=True)
    s.add_argument("--target", type=int, required=True)
    s.add_argument("--control", type=int, required=True)
    s = sub.add_parser("resume-one")
    s.add_argument("--app-port", type=int, required=True)
    s.add_argument("--backend-port", type=int, required=True)
    s.add_argument("--control-port", type=int, required=True)
    s.add_argument("--resets", type=int, default=200)
    s.add_argument("--hold", type=float, default=0.01)
    s = sub.add_parser("resume-many")
    s.add_argument("--server-port", type=int, required=True)
    s.add_argument("--backend-port", type=int, required=True)
    s.add_argument("--control-port", type=int, required=True)
    s.add_argument("--sessions", type=int, default=1000)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--hold", type=float, default=0.05)
    s.add_argument("--tls-fingerprint", help="TLS links, the server's certificate pinned")
    s = sub.add_parser("forward")
    s.add_argument("--listen", type=int, required=True)
    s.add_argument("--target", type=int, required=True)
    s = sub.add_parser("idle-backend")
    s.add_argument("--port", type=int, required=True)
    s = sub.add_parser("idle-clients")
    s.add_argument("--server-port", type=int, required=True)
    s.add_argument("--batch", type=int, default=100)
    s.add_argument("--tls-fingerprint", help="TLS links, the server's certificate pinned")
    a = p.parse_args(argv)
    # Stopped with SIGINT (benchmarks.instructions lets callgrind write its counts so): a
    # process started from a non-interactive shell's background job inherits SIGINT ignored,
    # and Python then leaves it ignored, so make it interrupt here whatever the parent did.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    globals()["cmd_" + a.cmd.replace("-", "_")](a)


if __name__ == "__main__":
    main()
