"""Connecting to a server whose name has several addresses: Happy Eyeballs (RFC 8305).

An event loop's ``create_connection(host, port)`` tries the addresses of a name one after the
other, each until the kernel gives up on it (minutes, for an address whose packets vanish).
uvloop's takes no ``happy_eyeballs_delay``. So a client whose server name has an address that
does not answer first (an IPv6 route that a network announces but drops, the classic case of a
laptop that roams onto a new network) spent every link attempt, bounded by the handshake
timeout, on that address and never reached the next: no new session and no resume, until the
reliability timeout ended the session.

:func:`connect` resolves the name. A single address is the event loop's own connect, as
before. Several go to :func:`dial`, which orders them by alternating families (RFC 8305 4:
IPv6, IPv4, IPv6, ...), with the address that last worked first, and starts a connection to
the next address when the one before has failed or has not connected within
:data:`ATTEMPT_DELAY` (250 ms, the RFC's default). The first to connect wins; the others are
closed.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from ._relay import format_hostport

__all__ = ["ATTEMPT_DELAY", "connect", "connect_on", "dial", "interleave"]

#: RFC 8305's Connection Attempt Delay: how long one connect has alone before the next starts
ATTEMPT_DELAY = 0.25

AddrInfo = tuple[Any, ...]  # (family, type, proto, canonname, sockaddr) as getaddrinfo gives


async def resolve(loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[AddrInfo]:
    """The TCP addresses of ``host`` (the hook tests replace to give a name any addresses).
    An address written as such is read at once; only a name goes to the resolver, in a
    thread (a resume with many at once would otherwise queue behind the event loop's few
    resolver threads for what needs no lookup)."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                  proto=socket.IPPROTO_TCP, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:  # (a name)
        pass
    return await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                  proto=socket.IPPROTO_TCP)


def interleave(infos: list[AddrInfo], first: Any = None) -> list[AddrInfo]:
    """``infos`` in the order to try them: ``first`` (a socket address) if among them, then
    families alternating from the first address's family, each family in the resolver's
    order (which already sorts by RFC 6724's preferences)."""
    infos = list(dict.fromkeys(infos))  # (a resolver may give an address twice)
    if first is not None:
        infos.sort(key=lambda info: info[4] != first)  # (stable: the rest keep their order)
    families: dict[Any, list[AddrInfo]] = {}
    for info in infos:
        families.setdefault(info[0], []).append(info)
    queues = list(families.values())
    ordered: list[AddrInfo] = []
    while queues:
        for queue in queues:
            ordered.append(queue.pop(0))
        queues = [q for q in queues if q]
    return ordered


async def _connect_one(loop: asyncio.AbstractEventLoop, info: AddrInfo) -> socket.socket:
    family, type_, proto, _name, address = info
    sock = socket.socket(family, type_, proto)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


def _failure(errors: list[tuple[AddrInfo, BaseException]]) -> BaseException:
    """What to raise when no address connected: the error itself when there was one address
    (or every address failed alike), else one OSError that names each address's."""
    texts = {str(e) for _info, e in errors}
    if len(errors) == 1 or len(texts) == 1:
        return errors[0][1]
    return OSError("; ".join(f"{format_hostport(*info[4][:2])}: {e}" for info, e in errors))


async def connect(loop: asyncio.AbstractEventLoop, factory: Any, host: str, port: int, *,
                  first: Any = None, delay: float = ATTEMPT_DELAY,
                  **kw: Any) -> tuple[asyncio.BaseTransport, Any]:
    """``loop.create_connection(factory, host, port, **kw)``, by Happy Eyeballs over the
    addresses of ``host`` when it has several (``first``: a socket address to try before the
    others, as the one that worked last time: the transport's ``peername``). A single address
    is the event loop's own connect (its C path on uvloop: a resume is a new connection, and
    a thousand at once take 15 % longer through ``dial``'s Python sockets). Raises OSError
    when no address connects; the caller bounds the time."""
    infos = await resolve(loop, host, port)
    if len(infos) == 1 and not _scoped(infos[0]):
        return await loop.create_connection(factory, infos[0][4][0], infos[0][4][1], **kw)
    return await connect_on(loop, factory, await dial(loop, host, port, first=first,
                                                      delay=delay, infos=infos), **kw)


def _scoped(info: AddrInfo) -> bool:
    """An IPv6 address with a zone (a link-local one): its address text alone loses it."""
    return info[0] == socket.AF_INET6 and bool(info[4][3])


async def dial(loop: asyncio.AbstractEventLoop, host: str, port: int, *,
               first: Any = None, delay: float = ATTEMPT_DELAY,
               infos: list[AddrInfo] | None = None) -> socket.socket:
    """A connected (non-blocking) TCP socket to ``host``:``port``, by Happy Eyeballs over
    its addresses (``first``: a socket address to try before the others, as the one that
    worked last time; ``infos``: the addresses, if resolved already). Raises OSError when
    none connects; the caller bounds the time."""
    infos = interleave(infos if infos is not None else await resolve(loop, host, port), first)
    if not infos:
        raise OSError(f"no address for {host}")
    if len(infos) == 1:
        return await _connect_one(loop, infos[0])
    errors: list[tuple[AddrInfo, BaseException]] = []
    running: dict[asyncio.Task[socket.socket], AddrInfo] = {}
    winner: socket.socket | None = None
    started = 0
    try:
        while winner is None:
            if started < len(infos):
                task = loop.create_task(_connect_one(loop, infos[started]))
                running[task] = infos[started]
                started += 1
            if not running:
                break
            done, _ = await asyncio.wait(running, timeout=delay if started < len(infos) else None,
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                info = running.pop(task)
                error = task.exception()
                if error is not None:
                    errors.append((info, error))
                elif winner is None:
                    winner = task.result()
                else:  # (two connected at once: the later one is not needed)
                    task.result().close()
            # (a failed attempt starts the next at once, a slow one after the delay)
    finally:
        for task in running:
            task.cancel()
        if running:
            # (each closes its socket as it is cancelled; one that connected meanwhile is
            # closed here)
            for result in await asyncio.gather(*running, return_exceptions=True):
                if isinstance(result, socket.socket):
                    result.close()
    if winner is None:
        raise _failure(errors)
    return winner


async def connect_on(loop: asyncio.AbstractEventLoop, factory: Any, sock: socket.socket,
                     **kw: Any) -> tuple[asyncio.BaseTransport, Any]:
    """``loop.create_connection(factory, sock=sock, **kw)``, the socket given up to the
    transport for good.

    On uvloop the transport's libuv handle owns the descriptor from the start, and the socket
    object is only detached when the transport closes, if it has been attached by then. It is
    attached only once the connection is made and the coroutine runs on: a link that was
    closed in between (reset by the peer at once, or closed by its protocol in
    ``connection_made``) left the object attached to nothing, holding a descriptor number that
    libuv had closed. Its garbage collection then closed that number a second time, whatever
    it had become by then (another session's connection, say). So on uvloop the object is
    detached here, in every case; asyncio's transport closes the object itself."""
    uvloop = type(loop).__module__.startswith("uvloop")
    try:
        made = await loop.create_connection(factory, sock=sock, **kw)
    finally:
        if uvloop:
            sock.detach()
    return made
