"""A fault-injecting TCP proxy for loopback tests and the demo.

Sits between client and server and breaks the links through it on demand:

- ``reset()``      both ends get a TCP reset (as after ``ss -K`` or a firewall REJECT);
- ``blackhole()``  bytes silently stop flowing both ways; neither end is told (a dead Wi-Fi,
                   a NAT that forgot the mapping, a pulled cable);
- ``half_open()``  the client's side is reset but the server's side stays open and silent, so
                   the server believes the old link is alive (the takeover case);
- ``corrupt()``    one byte of the next chunk each link carries toward the server is flipped
                   (a checksum or a TLS record's tag must catch it);
- ``refuse_new``   new connections are reset at once (server unreachable);
- ``blackhole_new`` new connections are accepted but nothing is forwarded.
"""

from __future__ import annotations

import asyncio
from typing import cast

from .aio._relay import abort_with_rst, tune_socket

__all__ = ["FaultProxy"]


class _Side(asyncio.Protocol):
    def __init__(self, pair: _Pair, name: str) -> None:
        self.pair = pair
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        tune_socket(self.transport)
        self.pair.made(self)

    def data_received(self, data: bytes) -> None:
        self.pair.forward(self, data)

    def eof_received(self) -> bool:
        self.pair.eof(self)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.lost(self, exc)

    def pause_writing(self) -> None:
        other = self.pair.other(self)
        if other is not None and other.transport is not None and not self.pair.dead:
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.pair.other(self)
        if other is not None and other.transport is not None and not self.pair.dead:
            other.transport.resume_reading()


class _Pair:
    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self, "client")
        self.server: _Side | None = None
        self.dead = False  # blackholed: read and discard
        self.closed = False
        self.bytes = 0
        self.corrupt_next = False  # flip a byte of the next client -> server chunk
        self.ended: set[_Side] = set()  # the sides that sent their EOF (passed on to the other)

    def other(self, side: _Side) -> _Side | None:
        return self.server if side is self.client else self.client

    def made(self, side: _Side) -> None:
        if side is self.client:
            self.proxy.pairs.add(self)
            if self.proxy.refuse_new:
                abort_with_rst(side.transport)
                return
            if self.proxy.blackhole_new:
                self.dead = True
                return
            assert side.transport is not None
            side.transport.pause_reading()
            loop = asyncio.get_running_loop()
            task = loop.create_task(self._connect())
            self.proxy._tasks.add(task)
            task.add_done_callback(self.proxy._tasks.discard)
        else:
            assert self.client.transport is not None and side.transport is not None
            early, self.client.early = self.client.early, []
            for chunk in early:
                side.transport.write(chunk)
            if not self.client.transport.is_closing():
                self.client.transport.resume_reading()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        server = self.server = _Side(self, "server")
        try:
            await loop.create_connection(
                lambda: server, self.proxy.target_host, self.proxy.target_port,
                local_addr=(self.proxy.source_host, 0) if self.proxy.source_host else None)
        except OSError:
            abort_with_rst(self.client.transport)

    def forward(self, side: _Side, data: bytes) -> None:
        if self.dead or self.closed:
            return
        other = self.other(side)
        if other is None or other.transport is None:
            side.early.append(data)  # arrived before the far side connected: keep it
            return
        if other.transport.is_closing():
            return
        self.bytes += len(data)
        if self.corrupt_next and side is self.client:
            self.corrupt_next = False
            b = bytearray(data)
            b[len(b) // 2] ^= 0x40
            data = bytes(b)
        other.transport.write(data)

    def eof(self, side: _Side) -> None:
        if self.dead or self.closed:
            return
        other = self.other(side)
        if other is not None and other.transport is not None and not other.transport.is_closing():
            other.transport.write_eof()
        self.ended.add(side)
        if len(self.ended) == 2:
            # Both directions ended (each side's EOF passed on): nothing more can flow and no
            # transport reports anything else, so the pair closes here, or its two sockets
            # would stay open until the proxy closes.
            for s in (self.client, self.server):
                if s is not None and s.transport is not None:
                    s.transport.close()
            self.closed = True
            self.proxy.pairs.discard(self)

    def lost(self, side: _Side, exc: Exception | None) -> None:
        if self.dead:
            return  # a blackholed link tells nobody anything
        other = self.other(side)
        if other is not None and other.transport is not None:
            if exc is None:
                other.transport.close()
            else:
                abort_with_rst(other.transport)
        self.closed = True
        self.proxy.pairs.discard(self)

    def reset(self) -> None:
        self.closed = True
        abort_with_rst(self.client.transport)
        if self.server is not None:
            abort_with_rst(self.server.transport)
        self.proxy.pairs.discard(self)

    def blackhole(self) -> None:
        self.dead = True

    def half_open(self) -> None:
        self.dead = True
        abort_with_rst(self.client.transport)

    def drop(self) -> None:
        for s in (self.client, self.server):
            if s is not None and s.transport is not None:
                s.transport.abort()


class FaultProxy:
    """TCP proxy ``listen -> target`` that can break its connections (see module doc)."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1",
                 listen_port: int = 0, source_host: str | None = None) -> None:
        self.target_host = target_host
        self.target_port = target_port
        #: the address its connections to the target come from (None: the system's choice)
        self.source_host = source_host
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.pairs: set[_Pair] = set()
        self.zombies: list[_Pair] = []  # blackholed/half-open pairs, closed at close()
        self.refuse_new = False
        self.blackhole_new = False
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> FaultProxy:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Pair(self).client, self.listen_host,
                                                self.listen_port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def _live(self) -> list[_Pair]:
        return [p for p in self.pairs if not p.dead and not p.closed]

    def reset(self) -> int:
        """Reset every live connection; returns how many."""
        live = self._live()
        for p in live:
            p.reset()
        return len(live)

    def blackhole(self) -> int:
        live = self._live()
        for p in live:
            p.blackhole()
            self.zombies.append(p)
        return len(live)

    def half_open(self) -> int:
        live = self._live()
        for p in live:
            p.half_open()
            self.zombies.append(p)
        return len(live)

    def corrupt(self) -> int:
        """Flip one byte in the next chunk each live link carries toward the server."""
        live = self._live()
        for p in live:
            p.corrupt_next = True
        return len(live)

    @property
    def live_connections(self) -> int:
        return len(self._live())

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for p in list(self.pairs) + self.zombies:
            p.drop()
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            await self._server.wait_closed()
