"""What a heap trim (``icafast.heap.trim_now_and_then``) costs a relay server's event loop.

``python -m benchmarks.experiments.heap_trim [--sessions N] [--keep K] [--size BYTES]`` starts
a server (``RelayServer`` with an echo backend, plain links) in a child process, prints its
heap and the time of two ``malloc_trim(0)`` calls made on its loop, then has a client process
open ``N`` sessions that each echo ``BYTES`` both ways (200 at a time), keep ``K`` of them
open and close the rest, and prints the same again: the first trim after the burst gives its
freed replay buffers back, the second shows what a trim costs with little to give back.
glibc only.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]


def _server(port: int) -> None:
    from icafast.aio import Mapping, RelayServer, run
    from icafast.protocol import Config

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2

    def rss_mib() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    async def main() -> None:
        backend = await asyncio.start_server(echo, "127.0.0.1", 0)
        bport = backend.sockets[0].getsockname()[1]
        srv = RelayServer([Mapping("127.0.0.1", port, "127.0.0.1", bport)], Config())
        await srv.start()

        def report() -> None:
            m = libc.mallinfo2()
            before = rss_mib()
            t0 = time.perf_counter()
            libc.malloc_trim(0)
            t1 = time.perf_counter()
            libc.malloc_trim(0)
            t2 = time.perf_counter()
            print(f"sessions {len(srv.sessions())}: heap {m.arena >> 20} MiB, of it free "
                  f"{m.fordblks >> 20} MiB in {m.ordblks} chunks; RSS {before} MiB -> "
                  f"{rss_mib()} MiB; trim {(t1 - t0) * 1e3:.2f} ms, again "
                  f"{(t2 - t1) * 1e3:.2f} ms", flush=True)

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, report)
        print("ready", flush=True)
        await asyncio.Event().wait()

    run(main())


def _client(port: int, sessions: int, size: int, keep: int) -> None:
    from icafast.aio import open_session, run

    async def one(i: int, sem: asyncio.Semaphore, kept: list[asyncio.StreamWriter]) -> None:
        async with sem:
            r, w = await open_session("127.0.0.1", port)
            data = os.urandom(size)
            w.write(data)
            await w.drain()
            if await r.readexactly(size) != data:
                raise AssertionError("echo differs")
            if i < keep:
                kept.append(w)
            else:
                w.close()

    async def main() -> None:
        sem = asyncio.Semaphore(200)
        kept: list[asyncio.StreamWriter] = []
        await asyncio.gather(*(one(i, sem, kept) for i in range(sessions)))
        print(f"done: {sessions} sessions, {len(kept)} kept open", flush=True)
        await asyncio.Event().wait()

    run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=3000)
    ap.add_argument("--keep", type=int, default=1500)
    ap.add_argument("--size", type=int, default=1 << 20)
    ap.add_argument("--role", choices=["server", "client"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role == "server":
        _server(a.port)
        return
    if a.role == "client":
        _client(a.port, a.sessions, a.size, a.keep)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    me = [sys.executable, "-m", "benchmarks.experiments.heap_trim", "--port", str(port)]
    srv = subprocess.Popen([*me, "--role", "server"], stdout=subprocess.PIPE, text=True)
    cli = None
    try:
        assert srv.stdout is not None
        if srv.stdout.readline().strip() != "ready":
            raise SystemExit("the server did not start")

        def probe() -> None:
            srv.send_signal(signal.SIGUSR1)
            print(" ", srv.stdout.readline().strip(), flush=True)  # type: ignore[union-attr]

        probe()
        cli = subprocess.Popen([*me, "--role", "client", "--sessions", str(a.sessions), "--size",
                                str(a.size), "--keep", str(a.keep)], stdout=subprocess.PIPE,
                               text=True)
        assert cli.stdout is not None
        print(cli.stdout.readline().strip(), flush=True)
        time.sleep(2)
        probe()
        probe()
    finally:
        for p in (cli, srv):
            if p is not None:
                p.send_signal(signal.SIGTERM)
        for p in (cli, srv):
            if p is not None:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


if __name__ == "__main__":
    main()
