"""What the event loop's TLS transport costs per record, against driving ``ssl.SSLObject`` with
memory BIOs by hand (tried as a measurement, not as a change: see benchmarks/README.md,
"Where the time goes (encrypted path)").

``python -m benchmarks.experiments.tls_echo [--rounds N] [--count N] [--pin]``

A TLS echo server on 127.0.0.1 in its own process, in one of three forms, all on uvloop, and
a plain TCP one for reference (``plain``: what TLS adds is the difference):

- ``transport``: ``loop.create_server(ssl=ctx)``, a plain ``Protocol`` echoing what
  ``data_received`` gets (uvloop's ``SSLProtocol`` under it: what icafast's links use);
- ``bio``: a plain TCP server whose protocol owns an ``SSLObject`` over two ``MemoryBIO``s:
  ``incoming.write(raw)``, ``read()`` until the BIO is empty, ``write()`` the echo,
  ``outgoing.read()`` to the transport (what a TLS layer inside icafast's adapter would do);
- ``bio-raw``: the same through the ``SSLObject``'s underlying C object (no Python-level
  wrapper methods), the least a layer on Python's ``ssl`` module could cost;
- ``pipe``: the handshake as in ``bio``, then icafast's compiled TLS pipe
  (``icafast._tlsio.TLSPipe``: OpenSSL's calls from C, what icafast's links use since
  ``9d47bfb``), writing to the transport itself.

A blocking TLS client sends ``--count`` 64-byte messages one at a time (after 1,000 for
warm-up). Reported per form, median over ``--rounds`` (forms interleaved): the round trip p50
and the server's CPU time per round trip (user + system, from ``getrusage`` in the server).
Each decrypt + encrypt pair of the server is what one icafast relay does per round trip and
direction. The servers set glibc's heap thresholds as ``icafast serve`` does
(``icafast.heap.tune_malloc``), so that the transport's 256 KiB read buffers do not fault.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .._chains import tls_files

FORMS = ("plain", "transport", "bio", "bio-raw", "pipe")


def serve(form: str, cert: str, key: str) -> None:
    """The server process: print the port, echo one connection, print its CPU seconds."""
    import asyncio
    import resource

    import uvloop

    from icafast.heap import tune_malloc

    tune_malloc()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport

        def data_received(self, data: bytes) -> None:
            self.t.write(data)  # type: ignore[attr-defined]

        def connection_lost(self, exc: Exception | None) -> None:
            if not done.done():
                done.set_result(None)

    class BioEcho(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport
            self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.obj = ctx.wrap_bio(self.inc, self.out, server_side=True)
            self.s = self.obj._sslobj if form == "bio-raw" else self.obj  # type: ignore[attr-defined]
            self.handshaking = True

        def data_received(self, data: bytes) -> None:
            if form == "pipe" and not self.handshaking:
                plain = self.pipe.open(data)
                if plain:
                    self.pipe.send(plain)
                return
            self.inc.write(data)
            if self.handshaking:
                try:
                    self.obj.do_handshake()
                    self.handshaking = False
                except ssl.SSLWantReadError:
                    pass
                out = self.out.read()
                if out:
                    self.t.write(out)  # type: ignore[attr-defined]
                if self.handshaking:
                    return
                if form == "pipe":  # the records from here on go through the pipe
                    from icafast._tlsio import TLSPipe

                    self.pipe = TLSPipe(self.obj, self.inc, self.out)
                    self.pipe.attach(self.t.write)  # type: ignore[attr-defined]
                    data = b""
            if form == "pipe":
                plain = self.pipe.open(data)
                if plain:
                    self.pipe.send(plain)
                return
            s, inc = self.s, self.inc
            while True:
                try:
                    plain = s.read(262144)
                except ssl.SSLWantReadError:
                    break
                if not plain:
                    break
                s.write(plain)
                if not inc.pending and not s.pending():
                    break
            out = self.out.read()
            if out:
                self.t.write(out)  # type: ignore[attr-defined]

        def connection_lost(self, exc: Exception | None) -> None:
            if not done.done():
                done.set_result(None)

    async def main() -> None:
        global done
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        if form in ("plain", "transport"):
            srv = await loop.create_server(Echo, "127.0.0.1", 0,
                                           ssl=ctx if form == "transport" else None)
        else:
            srv = await loop.create_server(BioEcho, "127.0.0.1", 0)
        print(srv.sockets[0].getsockname()[1], flush=True)
        await asyncio.wait_for(done, 600)
        r = resource.getrusage(resource.RUSAGE_SELF)
        print(f"{r.ru_utime + r.ru_stime:.6f}", flush=True)

    uvloop.run(main())


def client(port: int, count: int, tls: bool) -> list[float]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s = ctx.wrap_socket(raw) if tls else raw
    msg = b"x" * 64
    lat = []
    for i in range(1000 + count):
        t = time.perf_counter()
        s.sendall(msg)
        got = 0
        while got < len(msg):
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("server closed")
            got += len(chunk)
        if i >= 1000:
            lat.append(time.perf_counter() - t)
    s.close()
    return lat


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.tls_echo",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--pin", action="store_true", help="server and client on CPU 0 (taskset)")
    p.add_argument("--serve", choices=FORMS, help=argparse.SUPPRESS)
    p.add_argument("--cert", help=argparse.SUPPRESS)
    p.add_argument("--key", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve:
        serve(a.serve, a.cert, a.key)
        return 0
    if a.pin:
        os.sched_setaffinity(0, {0})  # the client here; the server inherits it
    p50: dict[str, list[float]] = {f: [] for f in FORMS}
    cpu: dict[str, list[float]] = {f: [] for f in FORMS}
    with tempfile.TemporaryDirectory(prefix="icafast-tls-echo-") as d:
        files = tls_files(Path(d))
        cert, key = str(files.cert), str(files.key)
        for _ in range(a.rounds):
            for form in FORMS:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.experiments.tls_echo", "--serve", form,
                     "--cert", cert, "--key", key], stdout=subprocess.PIPE, text=True)
                try:
                    assert proc.stdout is not None
                    port = int(proc.stdout.readline())
                    lat = client(port, a.count, form != "plain")
                    server_cpu = float(proc.stdout.readline())
                    proc.wait(30)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                p50[form].append(statistics.median(lat) * 1e6)
                cpu[form].append(server_cpu / (1000 + a.count) * 1e6)
    print(f"{'form':10} {'p50 µs':>8} {'server CPU µs per round trip':>30}  ({a.rounds} rounds, "
          f"{'pinned' if a.pin else 'unpinned'}; medians)")
    for form in FORMS:
        print(f"{form:10} {statistics.median(p50[form]):8.1f} {statistics.median(cpu[form]):30.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
