"""``icafast connect --stdio``: one reliable session carried over two file descriptors (the
process's standard input and output), as ``ssh -W``, ``nc`` or ``socat - TCP:...`` carry a
connection, so that it can serve as an ssh ``ProxyCommand``.

The session's application side is one end of a socket pair, relayed by the event loop as a
``--listen`` session's application connection is; two threads copy between the other end and
the descriptors with blocking reads and writes. So the descriptors can be anything a process
may be given (pipes, sockets, terminals, regular files) and are left in the mode they are in
(no ``O_NONBLOCK`` put on a pipe or terminal that others share), and back-pressure is the
kernel's: a thread blocked on a slow standard output stops reading the socket pair, whose
buffer fills, and the session stops acknowledging, as for a slow application connection; a
session whose replay buffer is full (its link down, or slow) stops reading the socket pair,
and the thread stops reading standard input.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import stat
import threading
from collections.abc import Callable
from typing import Any

from .. import events as ev
from ..protocol import Config
from ..tls import ClientTLS
from ._relay import Endpoint, StatusCallback, format_hostport
from .client import SHUTDOWN_REASON, SHUTDOWN_WAIT, _check_peer, _ClientRunner

log = logging.getLogger("icafast")

__all__ = ["StdioSession"]

#: bytes per read and write of each copying thread
CHUNK = 256 * 1024
#: after an abortive end, how long what was received before it may take to reach the output
ABORT_FLUSH_WAIT = 1.0


def _error_text(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _wait_ready(fd: int, write: bool) -> None:
    """Block until ``fd`` is ready: for a descriptor that another process sharing it made
    non-blocking. (poll, not select: select fails on a descriptor numbered FD_SETSIZE (1024)
    or more, as a process holding many sockets gives.)"""
    poller = select.poll()
    poller.register(fd, select.POLLOUT if write else select.POLLIN)
    poller.poll()


#: what ``poll`` reports, asked for nothing, on a socket whose peer has closed
_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL
#: a socket's peer has shut down its writing (Linux)
_RDHUP = getattr(select, "POLLRDHUP", 0)


def _read_into(fd: int, buf: bytearray) -> int:
    """One read (BlockingIOError from a descriptor that another process sharing it made
    non-blocking, when it has nothing: the caller polls again)."""
    if _readv is not None:
        return _readv(fd, [buf])
    data = os.read(fd, len(buf))  # (no readv: a copy more)
    buf[:len(data)] = data
    return len(data)


_readv = getattr(os, "readv", None)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            _wait_ready(fd, write=True)
            continue
        view = view[n:]


def _is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


class StdioSession:
    """One session whose application stream is read from ``stdin_fd`` and written to
    ``stdout_fd`` (descriptors it owns from ``start()`` on, and closes: the output once the
    backend's stream has ended, which the reader sees as end of file).

    ``wait()`` returns the exit status once the session is over (0 after a graceful end, when
    all that was received has been written), ``close()`` ends it as ``icafast connect`` ends its
    sessions when it stops. ``error`` says why the status is not 0."""

    def __init__(self, server: tuple[str, int], config: Config | None = None, *,
                 stdin_fd: int = 0, stdout_fd: int = 1,
                 fallback: tuple[str, int] | None = None,
                 on_status: StatusCallback | None = None, tls: ClientTLS | None = None) -> None:
        _check_peer("server", *server)
        if fallback is not None:
            _check_peer("fallback", *fallback)
        self.server = server
        self.config = config or Config()
        self.fallback = fallback
        self.on_status = on_status
        self.tls = tls
        self.in_fd = stdin_fd
        self.out_fd = stdout_fd
        self.error: str | None = None
        self.runner: _ClientRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._app: socket.socket | None = None  # the threads' end of the socket pair
        self._out_done: asyncio.Future[None] | None = None  # the output thread has ended
        self._failure: str | None = None  # standard input or output failed
        self._threads_left = 2
        self._input_closed = False  # the input thread is done with stdin_fd (under _lock)
        self._link_gone: asyncio.Future[None] | None = None  # the last link has closed
        self._lock = threading.Lock()

    async def start(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self._out_done = loop.create_future()
        app, relay = socket.socketpair()
        runner = self.runner = _ClientRunner(loop, self.server, self.config, self.fallback,
                                             self._status, tls=self.tls)
        try:
            await loop.connect_accepted_socket(lambda: Endpoint(runner), relay)
        except BaseException:
            app.close()
            relay.close()
            raise
        if self.in_fd == self.out_fd:
            # one descriptor both ways (a connected socket): each thread closes the one it
            # uses when done, so the output gets a copy of its own; the input's end of file
            # would otherwise close it under the thread still writing to it
            self.out_fd = os.dup(self.out_fd)
        self._app = app
        log.info("standard input and output -> server %s", format_hostport(*self.server))
        for name, target in (("stdin", self._copy_in), ("stdout", self._copy_out)):
            threading.Thread(target=target, name=f"icafast {name}", daemon=True).start()

    def _status(self, e: ev.Event, engine: Any) -> None:
        if isinstance(e, ev.SessionClosed):
            # the link that carries the session's CLOSE lingers until the server has it
            # (icafast.aio._relay._linger): the process must not end before, or its exit would
            # reset the link and the CLOSE could be lost (the server would hold the session,
            # and its backend connection, until the reliability timeout)
            link = self.runner.link if self.runner is not None else None
            if link is not None and link.transport is not None and not link.closed:
                assert self._loop is not None
                gone = self._link_gone = self._loop.create_future()
                before = link.on_lost

                def lost() -> None:
                    if before is not None:
                        before()
                    if not gone.done():
                        gone.set_result(None)

                link.on_lost = lost
        if self.on_status is not None:
            self.on_status(e, engine)

    # -- the copying threads -----------------------------------------------------------------
    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the event loop (from a thread)."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # (the loop is closed: the process exits)
            self._loop.call_soon_threadsafe(fn, *args)

    def _thread_ended(self) -> None:
        with self._lock:
            self._threads_left -= 1
            last = self._threads_left == 0
        if last and self._app is not None:  # (no thread uses the socket any more)
            self._app.close()

    def _copy_in(self) -> None:
        """Standard input to the session, until end of file (then a half-close), or until the
        session is over: the event loop has closed its end of the socket pair (an abortive end,
        ``close()``), which no read of standard input waits for (a producer that keeps it open
        would otherwise hold this thread, the descriptor and the socket for good)."""
        app = self._app
        assert app is not None
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        poller = select.poll()
        poller.register(self.in_fd, select.POLLIN)
        poller.register(app.fileno(), 0)  # (only its end: POLLHUP)
        try:
            while True:
                ready = dict(poller.poll())
                if ready.get(app.fileno(), 0) & _GONE:
                    log.debug("standard input: the session is over, no more read")
                    return
                if self.in_fd not in ready:
                    continue
                try:
                    n = _read_into(self.in_fd, buf)
                except BlockingIOError:  # (another reader of a shared descriptor was first)
                    continue
                except OSError as e:
                    self._call(self._stdio_failed, f"cannot read standard input: "
                                                   f"{_error_text(e)}")
                    return
                if not n:
                    log.debug("standard input: end of file")
                    with contextlib.suppress(OSError):
                        app.shutdown(socket.SHUT_WR)
                    return
                try:
                    app.sendall(view[:n])
                except OSError:  # the session ended (the event loop tells how)
                    return
        finally:
            with self._lock:  # (input_at_end() polls the descriptor under the lock)
                self._input_closed = True
                with contextlib.suppress(OSError):
                    os.close(self.in_fd)
            self._thread_ended()

    def _copy_out(self) -> None:
        """The session to standard output, until the backend's stream ends (or the session)."""
        app = self._app
        assert app is not None
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        failure = None
        try:
            while True:
                try:
                    n = app.recv_into(buf)
                except OSError:  # (reset: the session was aborted with input unread)
                    break
                if not n:
                    break
                try:
                    _write_all(self.out_fd, view[:n])
                except OSError as e:
                    failure = f"cannot write to standard output: {_error_text(e)}"
                    break
        finally:
            # the end of the stream: end of file for the reader (a socket shared with standard
            # input, as inetd gives, is half-closed: closing this descriptor would not do it)
            if _is_socket(self.out_fd):
                with contextlib.suppress(OSError):
                    s = socket.socket(fileno=self.out_fd)
                    try:
                        s.shutdown(socket.SHUT_WR)
                    finally:
                        s.detach()
            with contextlib.suppress(OSError):
                os.close(self.out_fd)
            self._thread_ended()
            self._call(self._output_ended, failure)

    def input_at_end(self) -> bool:
        """Whether standard input has ended: read to its end, or its writer gone (a pipe or
        socket whose every writer has closed it, with what they wrote perhaps still unread).
        As ssh ends: it closes its ProxyCommand's standard input, then sends SIGHUP at once."""
        with self._lock:
            if self._input_closed:
                return True
            poller = select.poll()
            poller.register(self.in_fd, select.POLLIN | _RDHUP)
            ready = poller.poll(0)
        return any(mask & (_GONE | _RDHUP) for _fd, mask in ready)

    # -- in the event loop -------------------------------------------------------------------
    def _stdio_failed(self, reason: str) -> None:
        """Standard input or output failed: the session ends abortively, closed on the server
        as when the client stops (the CLOSE goes on the link, or on a new one if the session
        is disconnected, for SHUTDOWN_WAIT at most)."""
        if self._failure is None:
            self._failure = reason
        runner = self.runner
        if runner is None or runner.closed_future.done():
            return
        if not runner._done:  # noqa: SLF001 - (else relaying to the fallback address)
            # (a session that had its CLOSE sent at once has ended: its link lingers until
            # the server has it, see _status)
            if runner.stop(reason):
                assert self._loop is not None
                self._loop.call_later(SHUTDOWN_WAIT, runner.finish_stop, reason)
            return
        runner.finish_stop(reason)  # (the fallback connection ends with this one)

    def _output_ended(self, failure: str | None) -> None:
        if failure is not None:
            self._stdio_failed(failure)
        if self._out_done is not None and not self._out_done.done():
            self._out_done.set_result(None)

    async def wait(self) -> int:
        """Until the session is over: 0 after a graceful end (once all that was received
        went to the output), else 1 (``error`` says why)."""
        runner = self.runner
        if runner is None or self._out_done is None:
            raise RuntimeError("StdioSession.start() first")
        # (relaying to the fallback address instead, the runner gives the end of that
        # connection as the session's)
        # (not awaited itself: a cancelled wait() must not cancel it, close() waits on it)
        await asyncio.wait({runner.closed_future})
        closed: ev.SessionClosed = runner.closed_future.result()
        error = None if closed.graceful else closed.reason
        gone = self._link_gone
        if gone is not None and not gone.done():
            await asyncio.wait({gone}, timeout=SHUTDOWN_WAIT)
        # what was received goes out before the exit: after a graceful end, all of it; after
        # an abortive one (a reset loses what was not read), what comes within a moment
        await asyncio.wait({self._out_done}, timeout=None if error is None else ABORT_FLUSH_WAIT)
        if self._failure is not None:
            error = self._failure
        self.error = error
        return 0 if error is None else 1

    async def close(self, timeout: float = SHUTDOWN_WAIT) -> None:
        """End the session as a stopping ``icafast connect`` ends its sessions: CLOSE to the
        server (which then closes the backend connection at once), waiting at most
        ``timeout`` seconds for it to be taken."""
        runner = self.runner
        if runner is None:
            return
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        if runner.stop(SHUTDOWN_REASON):
            await asyncio.wait({runner.closed_future}, timeout=max(0.0, end - loop.time()))
        gone = runner.last_link_gone
        if gone is not None and not gone.done():
            await asyncio.wait({gone}, timeout=max(0.0, end - loop.time()))
        runner.finish_stop(SHUTDOWN_REASON)
